r"""Validation loss, perplexity and bits per byte of a training workdir's newest checkpoint.

  python -m mla_jax.evaluate --workdir=runs/mla [--data=PATH] [--batches=N] [--json=PATH]

Without --data the held-out split of the run's own data config is evaluated, in the batches the
training loop evaluates (the same windows, batch size and sequence length), so the loss equals the
run's last validation loss. With --data the whole file or folder (every file in it) is the evaluation
data. --batches caps the number of batches (default: trainer.eval_steps, or every window when that is 0;
0: every window). Bits per byte = total nats / ln 2 / the UTF-8 bytes the evaluated target tokens decode
to (for the byte tokenizer: the non-EOS targets). Prints a table and writes JSON (default
<workdir>/eval.json).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import numpy as np

from mla_jax import cli
from mla_jax import config as config_lib
from mla_jax.data import ByteTokenizer, eval_batches, load_corpus
from mla_jax.errors import DataError, UserError, WorkdirError


def target_bytes(tokenizer, targets_BT: np.ndarray) -> int:
  """UTF-8 bytes that the target tokens decode to: non-EOS tokens for bytes, else each row decoded."""
  targets_BT = np.asarray(targets_BT)
  if isinstance(tokenizer, ByteTokenizer):
    return int(np.sum(targets_BT < 256))
  eos = getattr(tokenizer, "eos_id", None)
  total = 0
  for row in targets_BT:
    ids = [int(t) for t in row if eos is None or int(t) != eos]
    total += len(tokenizer.decode(ids).encode("utf-8"))
  return total


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
  """Total nats / ln 2 / bytes (nan when there are no bytes)."""
  return nll_nats / math.log(2.0) / num_bytes if num_bytes else float("nan")


def evaluation_data(config, tokenizer, data: Optional[str]):
  """(tokens, description): the run's held-out split, or the whole of `data`."""
  data_cfg = config.data
  if data:
    data_cfg = config_lib.default_config().data
    data_cfg.update(dict(config.data))
    data_cfg.corpus, data_cfg.format, data_cfg.val_fraction = data, "auto", 0.0
    data_cfg.max_bytes = sys.maxsize
  corpus = load_corpus(data_cfg, tokenizer, config.model.vocab_size)
  if data:
    return corpus.train, f"{data} (all {len(corpus.train):,} tokens)"
  return corpus.val, f"held-out split of {config.data.corpus} ({len(corpus.val):,} tokens)"


def run_evaluate(workdir: str, data: Optional[str] = None, batches: Optional[int] = None,
                 json_path: Optional[str] = None, stream=sys.stdout) -> dict:
  """Evaluates the newest checkpoint in `workdir`; returns the JSON record it writes."""
  from mla_jax.generate import load  # pylint: disable=g-import-not-at-top
  from mla_jax.model import LanguageModel  # pylint: disable=g-import-not-at-top
  from mla_jax.train import evaluation_totals  # pylint: disable=g-import-not-at-top
  from mla_jax.train_step import make_eval_step  # pylint: disable=g-import-not-at-top

  if batches is not None and batches < 0:
    raise UserError(f"--batches must be >= 0, got {batches}")
  config, cfg, variables, tokenizer, step = load(workdir)
  tokens, description = evaluation_data(config, tokenizer, data)
  T = config_lib.seq_len(config)
  batch_size = config.trainer.batch_size
  if batches is None:
    batches = config.trainer.eval_steps
  windows = (len(tokens) - 1) // T
  if data and 0 < windows < batch_size:
    batch_size = windows  # a small file still gets one (smaller) batch
  source = data or "the held-out split"
  batch_list = eval_batches(tokens, batch_size, T, batches or sys.maxsize, source)
  if not batch_list:
    raise DataError(f"{source}: no evaluation batch of {batch_size} x {T} tokens")
  model_state = {k: v for k, v in variables.items() if k != "params"}
  eval_step = make_eval_step(LanguageModel(cfg), loss_chunk_size=config.trainer.get("loss_chunk_size", 0))
  nll, count = evaluation_totals(eval_step, variables["params"], model_state, batch_list)
  num_bytes = sum(target_bytes(tokenizer, b["targets"]) for b in batch_list)
  loss = nll / max(count, 1.0)
  record = {
      "workdir": os.path.abspath(workdir), "step": int(step), "data": description,
      "batches": len(batch_list), "batch_size": batch_size, "seq_len": T, "tokens": int(count),
      "bytes": num_bytes, "nll_nats": nll, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
      "bits_per_byte": bits_per_byte(nll, num_bytes),
  }
  rows = [("checkpoint", f"{record['workdir']} step {step}"), ("data", description),
          ("evaluated", f"{len(batch_list)} batches x {batch_size} x {T} = {int(count):,} tokens, {num_bytes:,} bytes"),
          ("loss (nats/token)", f"{loss:.6f}"), ("perplexity", f"{record['perplexity']:.4f}"),
          ("bits per byte", f"{record['bits_per_byte']:.6f}")]
  width = max(len(name) for name, _ in rows)
  stream.write("".join(f"{name:<{width}}  {value}\n" for name, value in rows))
  json_path = json_path or os.path.join(workdir, "eval.json")
  try:
    with open(json_path, "w") as f:
      json.dump(record, f, indent=2)
      f.write("\n")
  except OSError as e:
    raise WorkdirError(f"{json_path}: cannot write the results ({cli.one_line(e)})") from e
  stream.write(f"wrote {json_path}\n")
  stream.flush()
  return record


def main(argv: Optional[list[str]] = None) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Training workdir whose newest checkpoint is evaluated.")
  flags.DEFINE_string("data", None, "Text file, folder or token file evaluated whole (default: the run's "
                      "held-out split).")
  flags.DEFINE_integer("batches", None, "Batches to evaluate (default: trainer.eval_steps; 0: all).")
  flags.DEFINE_string("json", None, "Where to write the results (default: <workdir>/eval.json).")
  cli.parse_flags(argv)
  f = flags.FLAGS

  def go():
    if not f.workdir:
      raise UserError("--workdir is required")
    run_evaluate(f.workdir, f.data, f.batches, f.json)

  cli.run(go)


if __name__ == "__main__":
  main()
