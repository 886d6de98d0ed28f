r"""XLA:CPU's YNNPACK settings, measured on the seed-size train step and batch-1 decode: the evidence for
mla_jax.xla_options.

  python -m benchmarks.xla_cpu_options            # -> benchmarks/results/xla_cpu_options.md
  python -m benchmarks.xla_cpu_options --models mamba2 --rounds 3 --no_write

For each model (the seed-size shapes of benchmarks/profile_step.py: hidden 512, 8 layers, vocabulary
8192; AdamW at batch 4 x 256) the same jitted function is compiled three times, with
`xla_cpu_experimental_ynn_fusion_type` at XLA's default (every dot plus YNNPACK fusions of reductions
and elementwise work), at individual dots only, and off; then the three executables run in turn, --rounds
times, so that a drift of the machine's speed reaches all three alike. Train: one optimizer step.
Decode: one call of `Decoder.steps` producing 64 tokens after a 1024-token cache, batch 1, greedy.
Reported: the median per setting and its ratio to the default; the setting mla_jax.xla_options picks is
marked.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_lines, write_lines
from benchmarks.profile_step import RESULTS, seed_config, seed_train_step
from mla_jax import cache as cache_lib
from mla_jax.config import ModelConfig
from mla_jax.decode import Decoder
from mla_jax.model import init_params
from mla_jax.xla_options import DOTS_ONLY, NO_YNN, compiler_options

SETTINGS = {"XLA default": {}, "dots only": DOTS_ONLY, "off": NO_YNN}
PROMPT, NEW = 1024, 64


def _name(options) -> str:
  return next(name for name, value in SETTINGS.items() if value == (options or {}))


def _without_options(jitted, **jit_kwargs):
  """The function of an mla_jax jit re-jitted without its compiler options: each `compile(options)` of
  its lowering then sets exactly `options` (a compile adds to the jit's own options)."""
  return jax.jit(jitted.__wrapped__, **jit_kwargs)


def _interleaved(run_by_setting: dict, rounds: int) -> dict[str, float]:
  """Median seconds of each setting's run, the settings taking turns `rounds` times."""
  times = {name: [] for name in run_by_setting}
  for _ in range(rounds):
    for name, run in run_by_setting.items():
      times[name].append(run())
  return {name: float(np.median(t)) for name, t in times.items()}


def train_times(kind: str, rounds: int) -> dict[str, float]:
  step, state, batch = seed_train_step(kind)
  lowered = _without_options(step, donate_argnums=(0,)).lower(state, batch)
  runs, states = {}, {}
  for name, options in SETTINGS.items():
    compiled = lowered.compile(options)
    states[name] = jax.tree_util.tree_map(jnp.copy, state)

    def run(name=name, compiled=compiled):
      start = time.perf_counter()
      states[name], metrics = compiled(states[name], batch)
      jax.block_until_ready(metrics)
      return time.perf_counter() - start

    run()  # warm-up
    runs[name] = run
  return _interleaved(runs, rounds)


def seed_decode(kind: str, rejit=None):
  """The seed-size batch-1 greedy decode of `kind`: (`Decoder.steps` lowered for NEW tokens after a
  PROMPT-token cache, run(compiled) -> seconds of one call from a fresh cache). `rejit` maps the Decoder's
  jitted steps to the function to lower (default: as mla_jax compiles it)."""
  cfg = ModelConfig.from_config(seed_config(kind))
  params, _ = init_params(cfg, jax.random.PRNGKey(0), 8)
  variables, rng, slots = {"params": params}, jax.random.PRNGKey(0), PROMPT + NEW
  scalar, token = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
  caches = jax.eval_shape(lambda: cache_lib.init_caches(cfg, 1, slots))
  finished = jax.ShapeDtypeStruct((1,), jnp.bool_)
  steps = Decoder(cfg).steps if rejit is None else rejit(Decoder(cfg).steps)
  lowered = steps.lower(variables, token, scalar, scalar, caches, rng, scalar, finished, n=NEW)

  def run(compiled) -> float:
    fresh = cache_lib.init_caches(cfg, 1, slots)
    args = (variables, jnp.zeros((1,), jnp.int32), jnp.int32(PROMPT), jnp.int32(NEW), fresh, rng)
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args, jnp.int32(-1), jnp.zeros((1,), bool)))
    return time.perf_counter() - start

  return lowered, run


def decode_times(kind: str, rounds: int) -> dict[str, float]:
  rejit = lambda steps: _without_options(steps, donate_argnums=(4,), static_argnames=("n",))
  lowered, run = seed_decode(kind, rejit)
  runs = {}
  for name, options in SETTINGS.items():
    compiled = lowered.compile(options)
    run(compiled)  # warm-up
    runs[name] = lambda compiled=compiled: run(compiled)
  return _interleaved(runs, rounds)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.xla_cpu_options",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--models", default="mla,mla_moe,gqa,mamba2")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--no_write", action="store_true")
  args = parser.parse_args(argv)
  if args.rounds < 1:
    sys.exit("--rounds must be >= 1")
  if jax.default_backend() != "cpu":
    sys.exit("these are XLA:CPU options: run with JAX_PLATFORMS=cpu")
  names = list(SETTINGS)
  rows = []
  for kind in args.models.split(","):
    cfg = ModelConfig.from_config(seed_config(kind))
    works = (("train step", train_times, "ms", "sequence"), ("decode b=1", decode_times, "tok/s", "decode"))
    for work, measure, unit, purpose in works:
      seconds = measure(kind, args.rounds)
      picked = _name(compiler_options(cfg, purpose))
      value = {n: (1e3 * s if unit == "ms" else NEW / s) for n, s in seconds.items()}
      cells = []
      for n in names:
        ratio = seconds["XLA default"] / seconds[n]  # > 1: faster than the default
        mark = " **(picked)**" if n == picked else ""
        cells.append(f"{value[n]:,.0f} {unit} ({ratio:.2f}x){mark}")
      rows.append(f"| {kind} | {work} | " + " | ".join(cells) + " |")
      print(rows[-1], flush=True)
  if args.no_write:
    return
  lines = [
    "# XLA:CPU YNNPACK settings on the seed-size models (float32)",
    "",
    *machine_lines(),
    f"- command: `python -m benchmarks.xla_cpu_options --rounds {args.rounds}`",
    "",
    __doc__.split("\n\n", 2)[2].strip(),
    "",
    "Cells: the median, and in brackets the speed relative to XLA's default (above 1: faster).",
    "",
    "| model | work | " + " | ".join(names) + " |",
    "|---|---|" + "---:|" * len(names),
    *rows,
  ]
  write_lines(RESULTS / "xla_cpu_options.md", lines)
  print(f"wrote {RESULTS / 'xla_cpu_options.md'}")


if __name__ == "__main__":
  main()
