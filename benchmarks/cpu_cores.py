r"""The seed-size work on one CPU core against two: how much of the second core each kind of work uses.

  python -m benchmarks.cpu_cores            # -> benchmarks/results/cpu_cores.md
  python -m benchmarks.cpu_cores --models mla --rounds 3 --no_write

Every measurement runs in a child process pinned to the first N cores (os.sched_setaffinity before jax
is imported, so XLA's thread pools see N cores), N = 1 and N = 2 in turn, --passes times, so that a drift
of the machine's speed reaches both alike; each cell is the median over all passes. Measured per N:
- the read bandwidth: a jitted float32 `jnp.sum` over 512 MiB (best of 5);
- the matmul rate: a jitted [2048, 2048] x [2048, 2048] float32 `jnp.dot` (best of 5);
- batch-1 greedy decode of each seed-size model (benchmarks/profile_step.py's shapes: hidden 512, 8
  layers, vocabulary 8192) exactly as mla_jax compiles it: one call of `Decoder.steps` producing 64
  tokens after a 1024-token cache, median of --rounds calls.
A speedup near 2 means the work uses both cores; near 1 means the second core adds nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

CORE_COUNTS = (1, 2)


def _child(cores: int, models: list[str], rounds: int) -> dict:
  os.sched_setaffinity(0, set(range(cores)))
  import jax  # noqa: PLC0415 (imported after the affinity is set, so XLA sizes its thread pools to it)

  from benchmarks.common import matmul_gflops, read_bandwidth_gbs  # noqa: PLC0415
  from benchmarks.xla_cpu_options import NEW, seed_decode  # noqa: PLC0415

  if jax.default_backend() != "cpu":
    sys.exit("this benchmark pins CPU cores: run with JAX_PLATFORMS=cpu")
  out = {"bandwidth": read_bandwidth_gbs(2**29)["xla"], "matmul": matmul_gflops(2048)}
  for kind in models:
    lowered, run = seed_decode(kind)
    compiled = lowered.compile()
    run(compiled)  # warm-up
    out[kind] = NEW / float(np.median([run(compiled) for _ in range(rounds)]))
  return out


def _measure(cores: int, models: list[str], rounds: int) -> dict:
  command = [sys.executable, "-m", "benchmarks.cpu_cores", "--child", str(cores), "--models", ",".join(models)]
  command += ["--rounds", str(rounds)]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    sys.exit(f"the {cores}-core child failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.cpu_cores", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--models", default="mla,gqa,mamba2")
  parser.add_argument("--rounds", type=int, default=3, help="decode calls per model and child")
  parser.add_argument("--passes", type=int, default=2, help="times each core count is measured, in turn")
  parser.add_argument("--no_write", action="store_true")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for flag in ("rounds", "passes"):
    if getattr(args, flag) < 1:
      sys.exit(f"--{flag} must be >= 1")
  models = [m for m in args.models.split(",") if m]
  if args.child:  # before anything imports jax
    print(json.dumps(_child(args.child, models, args.rounds)))
    return
  from benchmarks.profile_step import SEED_KINDS  # noqa: PLC0415 (imports jax)

  if not models or any(m not in SEED_KINDS for m in models):
    sys.exit(f"--models takes names from {', '.join(SEED_KINDS)}, got {args.models!r}")
  if len(os.sched_getaffinity(0)) < max(CORE_COUNTS):
    sys.exit(f"this machine gives the process {len(os.sched_getaffinity(0))} core(s); the comparison needs 2")
  passes = {n: [] for n in CORE_COUNTS}
  for _ in range(args.passes):
    for n in CORE_COUNTS:
      passes[n].append(_measure(n, models, args.rounds))
      print(f"{n} core(s): {passes[n][-1]}", flush=True)

  rows = [("read bandwidth, XLA sum", "GB/s", "bandwidth"), ("matmul 2048^3", "GFLOP/s", "matmul")]
  rows += [(f"decode b=1, {kind}", "tok/s", kind) for kind in models]
  lines = ["| work | unit | 1 core | 2 cores | 2 cores / 1 core |", "|---|---|---:|---:|---:|"]
  for name, unit, key in rows:
    one, two = (float(np.median([p[key] for p in passes[n]])) for n in CORE_COUNTS)
    lines.append(f"| {name} | {unit} | {one:,.1f} | {two:,.1f} | {two / one:.2f}x |")
  print("\n".join(lines))
  if args.no_write:
    return
  from benchmarks.common import RESULTS, machine_lines, write_lines  # noqa: PLC0415 (imports jax)

  write_lines(
    RESULTS / "cpu_cores.md",
    [
      "# One CPU core against two (seed-size models, float32)",
      "",
      *machine_lines(),
      f"- command: `python -m benchmarks.cpu_cores --models {args.models} --rounds {args.rounds} "
      f"--passes {args.passes}`",
      "",
      __doc__.split("\n\n", 2)[2].strip(),
      "",
      *lines,
    ],
  )


if __name__ == "__main__":
  main()
