r"""Chunked against plain cross-entropy in the real train step: step time and compiled temporaries.

  python -m benchmarks.cross_entropy                 # -> benchmarks/results/cross_entropy.md
  python -m benchmarks.cross_entropy --chunks 0,1024 --steps 2 --no_memory

Times the real train step (`make_train_step`) on configs/mla.py's model (float32) at the `:quick` batch
(8 x 256, byte vocabulary 320) and at a large vocabulary (4 x 256, vocab 32768) for each
`trainer.loss_chunk_size` (0 = plain), then reports XLA's temporaries (`memory_analysis`) of the seed
shape (batch 2 x 2048) at vocabularies 32768 and 128354, compiled from abstract arguments only.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks.common import median_time, write_results
from configs import mla
from mla_jax.config import ModelConfig, validate
from mla_jax.model import LanguageModel, init_params
from mla_jax.optim import make_optimizer, make_schedule
from mla_jax.train_state import TrainState
from mla_jax.train_step import make_train_step

GiB = 1024**3


def _config(batch: int, seq_len: int, chunk: int):
  config = mla.get_config()
  t = config.trainer
  t.batch_size, t.seq_len, t.loss_chunk_size = batch, seq_len, chunk
  validate(config)
  return config


def step_fn(batch: int, seq_len: int, vocab: int, chunk: int):
  """One call runs one real train step (`make_train_step`, donated state) and waits for it."""
  config = _config(batch, seq_len, chunk)
  cfg = ModelConfig.from_config(config, vocab)
  model = LanguageModel(cfg)
  tx, schedule = make_optimizer(config.trainer, 1000), make_schedule(config.trainer, 1000)
  params, _ = init_params(cfg, jax.random.PRNGKey(0), seq_len)
  holder = {"state": TrainState.create(params, tx, jax.random.PRNGKey(1))}
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  batch_ = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  train_step = make_train_step(config, model, tx, schedule)

  def run():
    holder["state"], metrics = train_step(holder["state"], batch_)
    jax.block_until_ready(metrics["loss"])

  run()  # compiles
  return run


def step_seconds(batch: int, seq_len: int, vocab: int, chunks: list[int], rounds: int) -> list[float]:
  """Best time per chunk size over `rounds` rounds that each time every chunk size once (interleaved,
  so load from other processes falls on all of them alike)."""
  fns = [step_fn(batch, seq_len, vocab, c) for c in chunks]
  best = [float("inf")] * len(chunks)
  for _ in range(rounds):
    for i, fn in enumerate(fns):
      best[i] = min(best[i], median_time(fn, 1))
  return best


def temp_bytes(batch: int, seq_len: int, vocab: int, chunk: int) -> int:
  """Temporaries of the compiled train step, from abstract state and batch (nothing is allocated)."""
  config = _config(batch, seq_len, chunk)
  cfg = ModelConfig.from_config(config, vocab)
  model = LanguageModel(cfg)
  tx, schedule = make_optimizer(config.trainer, 1000), make_schedule(config.trainer, 1000)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), 8)[0])
  state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.PRNGKey(1)), params)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), np.int32)
  step = make_train_step(config, model, tx, schedule)
  compiled = step.lower(state, {"inputs": tokens, "targets": tokens}).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.cross_entropy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--chunks", default="0,256,512,1024")
  parser.add_argument("--steps", type=int, default=4, help="timing rounds (the best is reported)")
  parser.add_argument("--no_memory", action="store_true")
  parser.add_argument("--no_write", action="store_true")
  args = parser.parse_args(argv)
  chunks = [int(c) for c in args.chunks.split(",")]

  rows = [
    f"configs/mla.py model, float32, best of {args.steps} train steps after compilation (chunk sizes "
    "interleaved); "
    "chunk = trainer.loss_chunk_size in tokens (0: plain loss)",
    "",
    "| batch x seq | vocab | " + " | ".join(f"chunk {c} (s)" for c in chunks) + " |",
    "|---|---:|" + "---:|" * len(chunks),
  ]
  for batch, seq_len, vocab in ((8, 256, 320), (4, 256, 32768)):
    times = step_seconds(batch, seq_len, vocab, chunks, args.steps)
    rows.append(f"| {batch} x {seq_len} | {vocab} | " + " | ".join(f"{s:.3f}" for s in times) + " |")
    print(rows[-1], flush=True)
  if not args.no_memory:
    mem_chunks = chunks
    rows += [
      "",
      "Compiled train-step temporaries (`memory_analysis`), seed shape batch 2 x 2048, no remat",
      "",
      "| vocab | " + " | ".join(f"chunk {c} (GiB)" for c in mem_chunks) + " |",
      "|---:|" + "---:|" * len(mem_chunks),
    ]
    for vocab in (32768, 128354):
      temps = [temp_bytes(2, 2048, vocab, c) / GiB for c in mem_chunks]
      rows.append(f"| {vocab} | " + " | ".join(f"{t:.2f}" for t in temps) + " |")
      print(rows[-1], flush=True)
  table = "\n".join(rows)
  print(table)
  if not args.no_write:
    print("wrote", write_results("cross_entropy", "Chunked cross-entropy (CPU)", table))


if __name__ == "__main__":
  main()
