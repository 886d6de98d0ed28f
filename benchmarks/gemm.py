r"""The seed-size MLA model's matmuls alone: the train step's GEMMs in XLA and torch (oneMKL), and batch-1
decode's one-row products in both weight orientations. Float32, 2 threads.

  python -m benchmarks.gemm                    # -> benchmarks/results/gemm.md (torch column when installed)
  python -m benchmarks.gemm --runs 5 --no_write

Each projection of the seed-size MLA model of benchmarks/vs_transformers.py --size seed (hidden 512,
8 layers, vocabulary 8192, DeepSeek-V3 dense shape) at 4 x 256 = 1024 tokens runs three matmuls per
train step: forward x W [N, K] x [K, F], the input gradient dY W^T [N, F] x [F, K] and the weight
gradient X^T dY [K, N] x [N, F]. Each one is timed alone (XLA: a jitted jnp.dot of the transposed views,
so XLA picks its own layouts; torch: `a @ b` on the transposed views), best of --runs calls, and summed
over the step with each projection's count. Attention's batched score and value matmuls are left out
(transformers runs them in scaled_dot_product_attention). The sum is what the step's matmuls cost each
library when nothing else runs: a floor for the step that no change outside the GEMM kernels lowers.

Decode at batch 1 multiplies one row by every weight, so it streams the weights from memory. For each
weight shape [K, N] of the model, --gemv_mb of distinct weights (more than the caches hold) are multiplied
by one row in one jitted call, as x @ W over the row-major [K, N] (the model's layout) and as N dot
products over the rows of the stored transpose [N, K] (torch's Linear layout); the rate is weight bytes
per second.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import matmul_gflops, write_results
from benchmarks.vs_transformers import pin_threads

TOKENS = 4 * 256


def projections(cfg) -> list[tuple[str, int, int, int]]:
  """(name, K inputs, F outputs, count per step) of every projection of the MLA model `cfg`."""
  H, D, L = cfg.num_heads, cfg.hidden_size, cfg.num_layers
  C, R, Q = cfg.kv_latent_dim, cfg.d_rope, cfg.q_latent_dim
  return [
    ("q down (W_DQ)", D, Q, L),
    ("q up (W_UQ)", Q, H * (cfg.head_dim + R), L),
    ("kv down (W_DKV)", D, C + R, L),
    ("k up (W_UK)", C, H * cfg.head_dim, L),
    ("v up (W_UV)", C, H * cfg.v_head_dim, L),
    ("attention out (W_O)", H * cfg.v_head_dim, D, L),
    ("SwiGLU gate, up", D, cfg.intermediate_size, 2 * L),
    ("SwiGLU down", cfg.intermediate_size, D, L),
    ("LM head", D, cfg.vocab_size, 1),
  ]


def operands(N: int, K: int, F: int) -> dict[str, tuple[tuple[int, int], tuple[int, int], bool, bool]]:
  """matmul -> (a's stored shape, b's stored shape, transpose a, transpose b) for a @ b."""
  return {
    "forward X W": ((N, K), (K, F), False, False),
    "input grad dY W^T": ((N, F), (K, F), False, True),
    "weight grad X^T dY": ((N, K), (N, F), True, False),
  }


def best_time(fn, runs: int) -> float:
  fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def xla_seconds(a_shape, b_shape, ta: bool, tb: bool, runs: int) -> float:
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal(a_shape, np.float32))
  b = jnp.asarray(rng.standard_normal(b_shape, np.float32))
  dot = jax.jit(lambda a, b: jnp.dot(a.T if ta else a, b.T if tb else b))
  return best_time(lambda: dot(a, b).block_until_ready(), runs)


def torch_seconds(a_shape, b_shape, ta: bool, tb: bool, runs: int) -> float:
  import torch

  gen = torch.Generator().manual_seed(0)
  a = torch.randn(a_shape, generator=gen)
  b = torch.randn(b_shape, generator=gen)
  with torch.no_grad():
    return best_time(lambda: (a.t() if ta else a) @ (b.t() if tb else b), runs)


def gemv_gbs(K: int, N: int, total_mb: int, rows: bool, runs: int) -> float:
  """GB/s of one-row products over `total_mb` MB of distinct [K, N] weights, stored [K, N] or as rows [N, K]."""
  count = max(1, -(-total_mb * 2**20 // (4 * K * N)))
  keys = jax.random.split(jax.random.PRNGKey(0), count)
  shape = (N, K) if rows else (K, N)
  ws = [jax.random.normal(k, shape, jnp.float32) for k in keys]
  x = jax.random.normal(jax.random.PRNGKey(1), (1, K), jnp.float32)
  contract = ((1,), (1,)) if rows else ((1,), (0,))
  products = jax.jit(lambda x, ws: sum(jax.lax.dot_general(x, w, (contract, ((), ()))) for w in ws))
  seconds = best_time(lambda: products(x, ws).block_until_ready(), runs)
  return count * 4 * K * N / seconds / 1e9


def gemv_rows(cfg, total_mb: int, runs: int) -> list[str]:
  shapes = sorted({(K, F) for _, K, F, _ in projections(cfg)})
  out = []
  for K, N in shapes:
    row_major, rows = gemv_gbs(K, N, total_mb, False, runs), gemv_gbs(K, N, total_mb, True, runs)
    out.append(f"| {K} x {N} | {row_major:.1f} | {rows:.1f} | {rows / row_major:.2f}x |")
    print(out[-1], flush=True)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.gemm", description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=10, help="timed calls per matmul, best taken (default 10)")
  parser.add_argument("--threads", type=int, default=2, help="torch threads and CPUs the process may use (2)")
  parser.add_argument("--gemv_mb", type=int, default=256, help="MB of distinct weights per one-row product (256)")
  parser.add_argument("--no_write", action="store_true")
  args = parser.parse_args(argv)
  if args.runs < 1 or args.threads < 1 or args.gemv_mb < 1:
    parser.error("--runs, --threads and --gemv_mb must be >= 1")
  cpus = pin_threads(args.threads)
  try:
    import torch

    torch.set_num_threads(args.threads)
    blas = "oneMKL" if torch.backends.mkl.is_available() else "no MKL"
    torch_line = f"torch {torch.__version__} ({args.threads} threads, {blas})"
  except ImportError:
    torch = None
    torch_line = "torch not installed: XLA column only"
  from benchmarks.profile_step import seed_config
  from mla_jax.config import ModelConfig

  cfg = ModelConfig.from_config(seed_config("mla"))
  peak = matmul_gflops(1024)
  rows, totals = [], {"xla": 0.0, "torch": 0.0}
  for name, K, F, count in projections(cfg):
    for kind, (a_shape, b_shape, ta, tb) in operands(TOKENS, K, F).items():
      flops = 2 * TOKENS * K * F
      rows_a, inner = a_shape[::-1] if ta else a_shape
      cols_b = b_shape[0] if tb else b_shape[1]
      xla = xla_seconds(a_shape, b_shape, ta, tb, args.runs)
      th = torch_seconds(a_shape, b_shape, ta, tb, args.runs) if torch else float("nan")
      totals["xla"] += count * xla
      totals["torch"] += count * th
      rows.append(
        f"| {name} | {kind} | {rows_a}x{inner}x{cols_b} | {count} | {flops / xla / 1e9:,.0f} | "
        + (f"{flops / th / 1e9:,.0f} | {th / xla:.2f}x |" if torch else "- | - |")
      )
      print(rows[-1], flush=True)
  flops_step = sum(count * 3 * 2 * TOKENS * K * F for _, K, F, count in projections(cfg))
  body = [
    f"- {torch_line}; the process on CPUs {cpus}",
    f"- XLA float32 matmul peak (jitted 1024^3 jnp.dot, best of 5): {peak:.1f} GFLOP/s",
    f"- command: `{' '.join(['python -m benchmarks.gemm', *(sys.argv[1:] if argv is None else argv)])}`",
    "",
    "\n\n".join(p.replace("\n", " ") for p in __doc__.split("\n\n", 2)[2].strip().split("\n\n")),
    "",
    "| projection | matmul | rows x inner x columns | per step | XLA GFLOP/s | torch GFLOP/s | XLA speed / torch |",
    "|---|---|---|---:|---:|---:|---:|",
    *rows,
    "",
    f"Over one train step ({flops_step / 1e9:.1f} GFLOP of projections): XLA {1e3 * totals['xla']:,.0f} ms "
    f"({flops_step / totals['xla'] / 1e9:,.0f} GFLOP/s, {flops_step / totals['xla'] / 1e9 / peak:.0%} of the peak)"
    + (
      f", torch {1e3 * totals['torch']:,.0f} ms ({flops_step / totals['torch'] / 1e9:,.0f} GFLOP/s); "
      f"XLA takes {totals['xla'] / totals['torch']:.2f}x torch's time."
      if torch
      else "."
    ),
  ]
  print("\n".join(body[-1:]))
  body += [
    "",
    f"Batch-1 decode's one-row products, {args.gemv_mb} MB of distinct weights per call, weight GB/s "
    "(read bandwidth bounds both):",
    "",
    "| weight [K, N] | x @ W, [K, N] row-major | rows of W^T, [N, K] | rows / row-major |",
    "|---|---:|---:|---:|",
    *gemv_rows(cfg, args.gemv_mb, args.runs),
  ]
  if not args.no_write:
    path = write_results(
      "gemm", "The MLA train step's projection matmuls alone: XLA and torch (CPU, float32)", "\n".join(body)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
