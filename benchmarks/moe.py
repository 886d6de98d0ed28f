"""MoE layer forward+backward throughput: dropless (blocked, raw ragged_dot) vs dense vs capacity, by experts.

  python -m benchmarks.moe                              # the full table -> benchmarks/results/moe.md
  python -m benchmarks.moe --experts 8 --runs 3 --out /tmp/moe.md
  python -m benchmarks.moe --train-steps 0              # skip the training rows

Each cell is the median wall time of `--runs` calls of a jitted value_and_grad (w.r.t. the parameters and
the input) after one warm-up call. Routed experts only (shared_expert_enabled=False): the shared expert
costs the same in every mode. Dispatches: 'ragged' is the layer's dropless mode as it runs on this backend
(`moe_ragged`: moe_blocked on CPU, lax.ragged_dot elsewhere); 'ragged_dot' is the layer with `moe_ragged`
swapped for the raw `moe_ragged_dot`, for reference; 'dense' and 'capacity' as configured.
"work vs ideal" is the token rows the expert SwiGLUs process over the T x k routed ones: E / k for dense,
E x C / (T x k) for capacity, E for ragged_dot on CPU (XLA:CPU runs every expert over every assignment;
1 on other backends), sum_e ceil(count_e / M) x M / (T x k) for blocked, from this input's routing.
"XLA / model FLOPs" divides the FLOPs XLA counts for the compiled step (`compiled.cost_analysis()`) by
3 (forward + backward) x 2 x tokens x active params (`moe_active_params`); it is n/a for the blocked path,
whose while loops XLA's cost analysis counts once, not once per block.
`train_rows()` adds end-to-end training tokens/s of configs/moe.py and configs/mla.py when they exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_lines, write_lines
from mla_jax.config import ModelConfig, default_config, validate
from mla_jax.layers.moe import MoE, moe_active_params
from mla_jax.ops import moe as moe_ops
from mla_jax.trainer import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]

EXPERTS = (4, 8, 16)
DISPATCHES = ("ragged", "ragged_dot", "dense", "capacity")
HIDDEN, MOE_INTERMEDIATE, TOKENS, TOP_K = 384, 768, 2048, 2


def model_config(num_experts: int, dispatch: str) -> ModelConfig:
  c = default_config()
  m = c.model
  m.hidden_size = HIDDEN
  m.num_heads = 6
  m.num_experts = num_experts
  m.experts_per_tok = TOP_K
  m.moe_intermediate_size = MOE_INTERMEDIATE
  m.shared_expert_enabled = False
  m.moe_dispatch = dispatch
  validate(c)
  return ModelConfig.from_config(c, vocab_size=256)


def dispatch_context(dispatch: str):
  """'ragged_dot' traces the layer's dropless mode with the raw lax.ragged_dot implementation."""
  if dispatch == "ragged_dot":
    return mock.patch.object(moe_ops, "moe_ragged", moe_ops.moe_ragged_dot)
  return contextlib.nullcontext()


def work_vs_ideal(cfg: ModelConfig, dispatch: str, load_E: np.ndarray, tokens: int) -> float:
  """Expert-SwiGLU token rows processed / the tokens x k routed rows (see the module docstring)."""
  E, K = cfg.num_experts, cfg.experts_per_tok
  S = tokens * K
  if dispatch == "dense":
    return E / K
  if dispatch == "capacity":
    return E * moe_ops.capacity(tokens, K, E, cfg.capacity_factor) / S
  on_cpu = jax.default_backend() == "cpu"
  if dispatch == "ragged_dot" or not on_cpu:
    return float(E) if on_cpu else 1.0
  M = moe_ops.default_block_size(S, E)
  counts_E = np.rint(load_E * S).astype(np.int64)
  return float(np.sum(-(-counts_E // M)) * M / S)


def measure(cfg: ModelConfig, dispatch: str, tokens: int, runs: int) -> dict[str, Any]:
  """Median seconds of one jitted forward+backward, the FLOPs XLA counts for it, the routed load."""
  with dispatch_context(dispatch):
    return _measure(cfg, tokens, runs)


def _measure(cfg: ModelConfig, tokens: int, runs: int) -> dict[str, Any]:
  module = MoE(cfg)
  x_BTD = jax.random.normal(jax.random.PRNGKey(0), (1, tokens, cfg.hidden_size), jnp.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(1), x_BTD)
  load_E = np.asarray(jax.jit(module.apply)(params, x_BTD)[1]["load"])

  def loss(p, x):
    y_BTD, aux = module.apply(p, x)
    return jnp.sum(jnp.square(y_BTD)) + 0.01 * aux["load_balance"]

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x_BTD).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jax.block_until_ready(compiled(params, x_BTD))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x_BTD))
    times.append(time.perf_counter() - start)
  return {"seconds": float(np.median(times)), "xla_flops": float(cost.get("flops", float("nan"))), "load": load_E}


# ---- training rows ---------------------------------------------------------------------------------
# End-to-end training throughput of the two example configs through mla_jax.trainer.
# While a config file is missing, the row reads 'n/a'.
TRAIN_CONFIGS = ("moe", "mla")


def _load_config(name: str):
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_bench_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config("quick")
  except (ValueError, TypeError):
    return module.get_config()


def _train_tokens_per_s(name: str, steps: int) -> str:
  """Median tokens/s over the logged intervals after the first (which includes the warm-up)."""
  config = _load_config(name)
  t = config.trainer
  t.max_steps, t.num_epochs, t.log_interval = steps, 0, max(1, steps // 5)
  t.eval_steps, t.save_interval, config.sample.max_new_tokens = 0, steps, 0
  with tempfile.TemporaryDirectory() as workdir:
    with contextlib.redirect_stdout(io.StringIO()):
      train_and_evaluate(config, workdir, stream=io.StringIO())
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
  seq = t.seq_len or config.model.max_seq_len
  return f"{np.median(rates):,.0f} tok/s ({t.batch_size} x {seq} tokens, {steps} steps)" if rates else "n/a"


def train_rows(steps: int = 20) -> list[str]:
  """Markdown rows of training tokens/s for configs/moe.py and configs/mla.py, 'n/a' where missing."""
  rows = []
  for name in TRAIN_CONFIGS:
    if steps <= 0:
      value = "n/a (skipped)"
    elif not (ROOT / "configs" / f"{name}.py").exists():
      value = "n/a"
      print(f"configs/{name}.py is missing: n/a", file=sys.stderr)
    else:
      try:
        value = _train_tokens_per_s(name, steps)
      except Exception as e:
        value = f"n/a ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    rows.append(f"| configs/{name}.py | {value} |")
    print(rows[-1], flush=True)
  return rows


# -----------------------------------------------------------------------------------------------------


def dropless_name(tokens: int, experts: list[int]) -> str:
  """What the 'ragged' rows run on this backend, with moe_blocked's block sizes."""
  if jax.default_backend() != "cpu":
    return "lax.ragged_dot"
  sizes = sorted({moe_ops.default_block_size(tokens * TOP_K, e) for e in experts})
  return f"moe_blocked, blocks of {'/'.join(map(str, sizes))} rows"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.moe", description=__doc__.splitlines()[0])
  parser.add_argument("--experts", default=",".join(map(str, EXPERTS)))
  parser.add_argument("--dispatch", default=",".join(DISPATCHES))
  parser.add_argument("--tokens", type=int, default=TOKENS)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--train-steps", type=int, default=20, help="0 skips the training rows")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moe.md"))
  args = parser.parse_args(argv)
  experts = [int(s) for s in args.experts.split(",")]
  dispatches = args.dispatch.split(",")

  lines = (
    ["# MoE layer: forward + backward tokens/s", ""]
    + machine_lines()
    + [
      "",
      f"MoE layer, hidden {HIDDEN}, moe_intermediate {MOE_INTERMEDIATE}, top-{TOP_K}, {args.tokens} tokens, "
      f"float32, capacity_factor {default_config().model.capacity_factor}, no shared expert; "
      f"jit(value_and_grad) w.r.t. parameters and input, median of {args.runs} runs after a warm-up.",
      "",
      f"'ragged' is the dropless dispatch as it runs here ({dropless_name(args.tokens, experts)}); "
      "'ragged_dot' is the raw lax.ragged_dot implementation. work vs ideal: expert token rows processed / "
      "(tokens x k).",
      "",
      "| experts | dispatch | ms / step | tokens/s | work vs ideal | XLA GFLOP / step | XLA / model FLOPs |",
      "|---:|---|---:|---:|---:|---:|---:|",
    ]
  )
  print("\n".join(lines), flush=True)
  for num_experts in experts:
    for dispatch in dispatches:
      cfg = model_config(num_experts, "ragged" if dispatch == "ragged_dot" else dispatch)
      result = measure(cfg, dispatch, args.tokens, args.runs)
      model_flops = 3 * 2 * args.tokens * moe_active_params(cfg)
      work = work_vs_ideal(cfg, dispatch, result["load"], args.tokens)
      if dispatch == "ragged" and jax.default_backend() == "cpu":
        xla = "n/a | n/a"  # while loops: XLA's cost analysis counts the loop body once
      else:
        xla = f"{result['xla_flops'] / 1e9:.1f} | {result['xla_flops'] / model_flops:.2f}"
      row = (
        f"| {num_experts} | {dispatch} | {result['seconds'] * 1e3:.1f} | "
        f"{args.tokens / result['seconds']:,.0f} | {work:.2f} | {xla} |"
      )
      lines.append(row)
      print(row, flush=True)

  lines += ["", "## Training (mla_jax.train, end to end)", "", "| config | tokens/s |", "|---|---|"]
  print("\n".join(lines[-5:]), flush=True)
  lines += train_rows(args.train_steps)

  write_lines(args.out, lines)


if __name__ == "__main__":
  main()
