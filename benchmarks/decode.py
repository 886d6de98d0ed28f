"""Decode tokens/s with a filled cache: GQA, MLA (expanded and absorbed) and the Mamba2 + MLA hybrid.

  python -m benchmarks.decode                                   # the full table -> benchmarks/results/decode.md
  python -m benchmarks.decode --lengths 512,2048 --batches 1 --out /tmp/decode.md

Models: configs/gqa.py (kv_heads 4), configs/mla.py (decoded with the expanded and the absorbed form) and
configs/hybrid.py, float32, byte vocabulary. For each batch and context length the caches are filled with
random values up to the context length (no real prefill) and the jitted single-token step that
`mla_jax.generate` uses (greedy, caches donated) runs `--warmup` times, then is timed over at least
`--min_steps` steps and `--min_time` seconds; tokens/s = batch x steps / time. The minimum bytes
per step are the weights (embedding table excluded: one row per token is gathered) plus every cache byte
up to the context length; the extra-copy table counts the whole-cache copies XLA adds to the compiled step.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_lines, write_results
from mla_jax import cache as cache_lib
from mla_jax.config import ModelConfig, validate
from mla_jax.data.tokenizer import ByteTokenizer, padded_vocab_size
from mla_jax.decode import Decoder
from mla_jax.model import count_params, init_params


def model_configs() -> dict[str, tuple[ModelConfig, str]]:
  from configs import gqa, hybrid, mla

  vocab = padded_vocab_size(ByteTokenizer.vocab_size)
  out = {}
  for name, module, mode in (
    ("GQA (kv_heads 4)", gqa, "absorbed"),
    ("MLA expanded", mla, "expanded"),
    ("MLA absorbed", mla, "absorbed"),
    ("hybrid (6 Mamba2 + 2 MLA absorbed)", hybrid, "absorbed"),
  ):
    config = module.get_config()
    validate(config)
    out[name] = (ModelConfig.from_config(config, vocab), mode)
  return out


def weight_bytes(cfg: ModelConfig, params) -> int:
  counts = count_params(cfg, params)
  return 4 * (
    counts["total"] - counts.get("embedding", 0) + (cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0)
  )


def filled_caches(cfg: ModelConfig, batch: int, slots: int, mode: str, seed: int):
  """Caches of `slots` slots holding random values (what a prefill would leave, statistically)."""
  shapes = jax.eval_shape(lambda: cache_lib.init_caches(cfg, batch, slots, jnp.float32, mode))
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  fill = jax.jit(
    lambda key: [0.5 * jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype) for i, s in enumerate(leaves)]
  )
  return jax.tree_util.tree_unflatten(treedef, fill(jax.random.PRNGKey(seed)))


def cache_copy_bytes(compiled_text: str, slots: int) -> int:
  """Bytes written by the copy and transpose instructions over cache-length arrays in a compiled program:
  whole-cache passes XLA adds on top of the reads the math needs (layout changes, copies for aliasing)."""
  total = 0
  for match in re.finditer(r"= f32\[([\d,]+)\]\{[\d,]*\} (?:copy|transpose)\(", compiled_text):
    dims = [int(x) for x in match.group(1).split(",")]
    if slots in dims:
      total += 4 * int(np.prod(dims))
  return total


def time_decode(
  cfg: ModelConfig,
  params,
  mode: str,
  batch: int,
  context: int,
  warmup: int,
  min_steps: int,
  min_time: float,
  max_steps: int,
):
  """(tokens/s, steps, compile s, extra copy bytes) of decode steps at positions context, context + 1, ...,
  timed until at least `min_steps` steps and `min_time` seconds (at most `max_steps` steps)."""
  decoder = Decoder(cfg, temperature=0.0, mla_decode=mode)
  variables = {"params": params}
  caches = filled_caches(cfg, batch, context + warmup + max_steps, mode, context)
  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  step = decoder.step.lower(
    variables, jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32), caches, rng
  ).compile()
  compile_s = time.perf_counter() - t0
  copies = cache_copy_bytes(step.as_text(), context + warmup + max_steps)
  token = jnp.zeros((batch,), jnp.int32)
  position = context
  for _ in range(warmup):
    token, caches = step(variables, token, jnp.int32(position), caches, rng)
    position += 1
  np.asarray(token)
  steps, t0 = 0, time.perf_counter()
  while steps < max_steps and (steps < min_steps or time.perf_counter() - t0 < min_time):
    token, caches = step(variables, token, jnp.int32(position), caches, rng)
    np.asarray(token)  # what generate does: each token reaches the host before the next step
    position += 1
    steps += 1
  elapsed = time.perf_counter() - t0
  del caches
  return batch * steps / elapsed, steps, compile_s, copies


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--min_steps", type=int, default=4)
  parser.add_argument("--min_time", type=float, default=0.5)
  parser.add_argument("--max_steps", type=int, default=32)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  batches = [int(x) for x in args.batches.split(",")]
  print("\n".join(machine_lines()), flush=True)

  load_start = os.getloadavg()
  models = model_configs()
  results: dict[tuple[str, int, int], float] = {}
  copies: dict[tuple[str, int, int], int] = {}
  info = {}
  start = time.perf_counter()
  for name, (cfg, mode) in models.items():
    params, _ = init_params(cfg, jax.random.PRNGKey(0))
    per_token = cache_lib.cache_summary(cfg, 1)["bytes_per_token"]
    fixed = cache_lib.cache_summary(cfg, 0)["total_bytes"]
    info[name] = {"cfg": cfg, "weights": weight_bytes(cfg, params), "per_token": per_token, "fixed": fixed}
    for batch in batches:
      for context in lengths:
        tok_s, steps, compile_s, copies[(name, batch, context)] = time_decode(
          cfg, params, mode, batch, context, args.warmup, args.min_steps, args.min_time, args.max_steps
        )
        results[(name, batch, context)] = tok_s
        print(
          f"{name:40s} batch {batch} context {context:5d}: {tok_s:8.1f} tokens/s ({steps} steps, compile "
          f"{compile_s:.1f}s, "
          f"{time.perf_counter() - start:.0f}s so far)",
          flush=True,
        )

  lines = [
    "Decode throughput with the cache filled to the context length: the jitted single-token step of "
    f"`mla_jax.generate` (greedy, caches donated), {args.warmup} warm-up steps, then steps timed until at least "
    f"{args.min_steps} steps and {args.min_time:g} s (at most {args.max_steps}), float32, "
    "byte vocabulary (320 padded). Each token is copied to the host before the next step, as when streaming.",
    f"Load average (1, 5, 15 min) at the start {', '.join(f'{x:.1f}' for x in load_start)}, at the end "
    f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}: above the 2 cores' count, other jobs shared the CPU.",
    "",
  ]
  for name, d in info.items():
    cfg = d["cfg"]
    kinds = ", ".join(cfg.mixer_kind(i) for i in range(cfg.num_layers))
    lines.append(
      f"- **{name}**: hidden {cfg.hidden_size}, {cfg.num_layers} layers ({kinds}), "
      f"{cfg.num_heads} heads of {cfg.head_dim}; weights read per step {d['weights'] / 2**20:.1f} MiB; "
      f"cache {d['per_token']:,} bytes/token/sequence"
      + (f" + {d['fixed'] / 2**10:.0f} KiB fixed Mamba2 state per sequence" if d["fixed"] else "")
    )
  header = "| model | batch | " + " | ".join(f"{n:,}" for n in lengths) + " |"
  rule = "|---|---:|" + "---:|" * len(lengths)
  lines += ["", "## Tokens/s (batch x steps / time)", "", header, rule]
  for batch in batches:
    for name in models:
      lines.append(f"| {name} | {batch} | " + " | ".join(f"{results[(name, batch, n)]:,.1f}" for n in lengths) + " |")
  lines += ["", "## Cache MiB at the context length (all sequences of the batch)", "", header, rule]
  for batch in batches:
    for name, d in info.items():
      lines.append(
        f"| {name} | {batch} | "
        + " | ".join(f"{(d['per_token'] * n + d['fixed']) * batch / 2**20:,.1f}" for n in lengths)
        + " |"
      )
  lines += [
    "",
    "## Minimum bytes read per step (weights + cache) and the bandwidth the measured rate implies",
    "",
    "| model | batch | " + " | ".join(f"{n:,}" for n in lengths) + " |",
    rule,
  ]
  for batch in batches:
    for name, d in info.items():
      cells = []
      for n in lengths:
        moved = d["weights"] + (d["per_token"] * n + d["fixed"]) * batch
        step_s = batch / results[(name, batch, n)]
        cells.append(f"{moved / 2**20:,.0f} MiB, {moved / step_s / 1e9:.1f} GB/s")
      lines.append(f"| {name} | {batch} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "## Extra whole-cache copies XLA adds per step (copy/transpose bytes over cache-length arrays, as a "
    "multiple of the cache size)",
    "",
    header,
    rule,
  ]
  for batch in batches:
    for name, d in info.items():
      size = lambda n: (d["per_token"] * (n + args.warmup + args.max_steps) + d["fixed"]) * batch
      lines.append(
        f"| {name} | {batch} | " + " | ".join(f"{copies[(name, batch, n)] / size(n):.1f}x" for n in lengths) + " |"
      )
  gqa, absorbed, expanded = "GQA (kv_heads 4)", "MLA absorbed", "MLA expanded"
  hybrid = next(n for n in models if n.startswith("hybrid"))
  lines += ["", "## Ratios", ""]
  for batch in batches:
    lines.append(
      f"- batch {batch}: MLA absorbed / GQA = "
      + ", ".join(f"{n:,}: {results[(absorbed, batch, n)] / results[(gqa, batch, n)]:.2f}x" for n in lengths)
    )
    lines.append(
      f"- batch {batch}: MLA absorbed / MLA expanded = "
      + ", ".join(f"{n:,}: {results[(absorbed, batch, n)] / results[(expanded, batch, n)]:.2f}x" for n in lengths)
    )
    fastest = [max(models, key=lambda m: results[(m, batch, n)]) for n in lengths]
    lines.append(f"- batch {batch}: fastest = " + ", ".join(f"{n:,}: {f}" for n, f in zip(lengths, fastest)))
    lines.append(
      f"- batch {batch}: hybrid / GQA = "
      + ", ".join(f"{n:,}: {results[(hybrid, batch, n)] / results[(gqa, batch, n)]:.2f}x" for n in lengths)
    )
  lines.append(f"\nTotal benchmark time {time.perf_counter() - start:.0f} s.")
  body = "\n".join(lines)
  if args.out:
    Path(args.out).write_text("# Decode throughput\n\n" + "\n".join(machine_lines()) + "\n\n" + body + "\n")
    path = args.out
  else:
    path = write_results("decode", "Decode throughput", body)
  print(body)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
