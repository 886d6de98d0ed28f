"""Mamba2 layer forward+backward: chunked SSD vs the sequential scan (and MLA when present) by length.

  python -m benchmarks.ssd                                  # the full table -> benchmarks/results/ssd.md
  python -m benchmarks.ssd --lengths 512,1024 --out /tmp/ssd.md

Each cell is the median wall time of `--runs` calls of a jitted value_and_grad (w.r.t. the parameters
and the input) after one warm-up call, and the temp bytes XLA reserves for it
(`compiled.memory_analysis().temp_size_in_bytes`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks.common import machine_lines, write_lines
from mla_jax.config import ModelConfig, default_config, validate
from mla_jax.layers.mamba2 import Mamba2Mixer, mamba2_flops_per_token

LENGTHS = (512, 1024, 2048, 4096, 8192)
SLOW_RUNS = 3  # at most this many timed runs for the sequential scan and MLA
HIDDEN, HEADS, HEAD_DIM, STATE, CHUNK, BATCH = 384, 48, 16, 64, 64, 1


def model_config(**model: Any) -> ModelConfig:
  c = default_config()
  m = c.model
  m.hidden_size = HIDDEN
  m.num_layers = 2
  m.num_heads = 6
  m.max_seq_len = max(LENGTHS)
  m.mamba_layers = (0,)
  m.mamba2_num_heads = HEADS
  m.mamba2_head_dim = HEAD_DIM
  m.mamba2_state_size = STATE
  m.mamba2_chunk_size = CHUNK
  for key, value in model.items():
    m[key] = value
  validate(c)
  return ModelConfig.from_config(c, vocab_size=256)


def measure(module: nn.Module, seq_len: int, runs: int, *extra: jax.Array) -> tuple[float, float]:
  """(median ms, temp MiB) of a jitted forward+backward of sum(y^2) w.r.t. parameters and input."""
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, seq_len, HIDDEN), jnp.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(1), x, *extra)

  def loss(p, v):
    y, _ = module.apply(p, v, *extra)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  jax.block_until_ready(compiled(params, x))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3, temp_mib


def mamba_row(seq_len: int, impl: str, runs: int) -> tuple[str, str]:
  ms, mib = measure(Mamba2Mixer(model_config(), ssd_impl=impl), seq_len, runs)
  return f"{ms:.1f}", f"{mib:.1f}"


# ---- MLA hook --------------------------------------------------------------------------------------
# The MLA layer lives in mla_jax/layers/mla.py (MLA(cfg)(x_BTD, positions_BT) -> (y_BTD, None)). It is
# imported here and only here; while it is missing, its columns read 'n/a'.
MLA_MODEL = dict(kv_latent_dim=128, q_latent_dim=0, d_rope=32)  # 6 heads of 64 at hidden 384


def mla_row(seq_len: int, runs: int = SLOW_RUNS) -> tuple[str, str]:
  try:
    from mla_jax.layers.mla import MLA
  except ImportError:
    print("mla_jax.layers.mla.MLA is not importable: n/a", file=sys.stderr)
    return "n/a", "n/a"
  positions_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (BATCH, seq_len))
  ms, mib = measure(MLA(model_config(**MLA_MODEL)), seq_len, runs, positions_BT)
  return f"{ms:.1f}", f"{mib:.1f}"


# -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.ssd", description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
  parser.add_argument("--runs", type=int, default=5, help="timed runs per cell (at least 1)")
  parser.add_argument(
    "--max-sequential",
    type=int,
    default=4096,
    help="longest length for the sequential scan; longer ones print 'skipped'",
  )
  parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ssd.md"))
  args = parser.parse_args(argv)
  if args.runs < 1:
    parser.error("--runs must be at least 1")
  lengths = [int(s) for s in args.lengths.split(",")]

  cfg = model_config()
  lines = (
    ["# Mamba2 (SSD) layer: forward + backward", ""]
    + machine_lines()
    + [
      "",
      f"Mamba2 mixer, hidden {HIDDEN}, {HEADS} heads x {HEAD_DIM}, state {STATE}, chunk {CHUNK}, "
      f"batch {BATCH}, float32; jit(value_and_grad) w.r.t. parameters and input, median of {args.runs} "
      f"runs ({min(args.runs, SLOW_RUNS)} for the sequential scan and MLA) after a warm-up; memory = XLA "
      f"temp bytes of the compiled step. MLA: {MLA_MODEL}, attention_impl auto. SSD forward matmul FLOPs per "
      f"token (`mamba2_flops_per_token`, every length here is a multiple of the chunk): "
      f"{mamba2_flops_per_token(cfg, CHUNK):,.0f}. The sequential scan is skipped above "
      f"{args.max_sequential}.",
      "",
      "| seq len | chunked ms | chunked temp MiB | sequential ms | sequential temp MiB | MLA ms | MLA temp MiB |",
      "|---:|---:|---:|---:|---:|---:|---:|",
    ]
  )
  print("\n".join(lines), flush=True)
  for seq_len in lengths:
    chunked = mamba_row(seq_len, "chunked", args.runs)
    if seq_len <= args.max_sequential:
      sequential = mamba_row(seq_len, "sequential", min(args.runs, SLOW_RUNS))
    else:
      sequential = ("skipped", "skipped")
    mla = mla_row(seq_len, min(args.runs, SLOW_RUNS))
    row = f"| {seq_len} | " + " | ".join(chunked + sequential + mla) + " |"
    lines.append(row)
    print(row, flush=True)

  write_lines(args.out, lines)


if __name__ == "__main__":
  main()
