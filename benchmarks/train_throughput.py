r"""Training throughput of the seed configs beside this machine's float32 matmul peak (a CPU "MFU").

  python -m benchmarks.train_throughput                  # -> benchmarks/results/train_throughput.md
  python -m benchmarks.train_throughput --configs mla --steps 3 --batch 4 --seq_len 128

Each row times the real jitted train step (`make_train_step`, AdamW, float32) on the config's model at a
CPU-sized batch, after compilation. Achieved FLOP/s uses `flops_per_token` (6 x active matmul params +
causal attention + SSD), the same count the trainer prints. The peak is the best of a few large float32
matmuls timed in the same run.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import matmul_gflops, train_step_seconds, write_results
from mla_jax.config import ModelConfig, validate
from mla_jax.model import count_params, flops_per_token, init_params

ROOT = Path(__file__).resolve().parents[1]

BYTE_VOCAB = 320  # the byte tokenizer's vocabulary padded to a multiple of 64, as in training


def measure(name: str, batch: int, seq_len: int, steps: int) -> dict:
  config = importlib.import_module(f"configs.{name}").get_config()
  config.trainer.batch_size, config.trainer.seq_len = batch, seq_len
  validate(config)
  cfg = ModelConfig.from_config(config, BYTE_VOCAB)
  params, _ = init_params(cfg, jax.random.PRNGKey(0), seq_len)
  tokens = np.random.default_rng(0).integers(0, 256, (batch, seq_len + 1)).astype(np.int32)
  seconds = train_step_seconds(config, params, tokens, steps, vocab_size=BYTE_VOCAB)
  flops = flops_per_token(cfg, params, seq_len)["total"]
  tok_s = batch * seq_len / seconds
  return {
    "name": name,
    "params": count_params(cfg, params),
    "seconds": seconds,
    "tok_s": tok_s,
    "flop_s": tok_s * flops,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.train_throughput",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--configs", default="gqa,mla,moe,mamba2,hybrid")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--no_write", action="store_true")
  args = parser.parse_args(argv)

  peak = max(matmul_gflops(n) for n in (1024, 2048)) * 1e9
  rows = [
    f"float32 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s",
    "",
    f"batch {args.batch} x {args.seq_len} tokens, byte vocabulary ({BYTE_VOCAB}), float32, median of "
    f"{args.steps} steps",
    "",
    "| config | params (total / active) | step (s) | tokens/s | achieved GFLOP/s | / matmul peak |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for name in args.configs.split(","):
    if not (ROOT / "configs" / f"{name}.py").exists():
      continue
    r = measure(name, args.batch, args.seq_len, args.steps)
    p = r["params"]
    rows.append(
      f"| {name} | {p['total'] / 1e6:.1f}M / {p['active'] / 1e6:.1f}M | {r['seconds']:.2f} | "
      f"{r['tok_s']:,.0f} | {r['flop_s'] / 1e9:.1f} | {r['flop_s'] / peak:.0%} |"
    )
    print(rows[-1], flush=True)
  table = "\n".join(rows)
  print(table)
  if not args.no_write:
    print("wrote", write_results("train_throughput", "Training throughput (CPU)", table))


if __name__ == "__main__":
  main()
