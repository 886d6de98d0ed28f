"""Shared benchmark plumbing: the machine description and the results file."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def machine_lines() -> list[str]:
  device = jax.devices()[0]
  return [
      f"- date: {time.strftime('%Y-%m-%d')}",
      f"- processor: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      f"- jax {jax.__version__}, device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s)",
  ]


def write_results(name: str, title: str, body: str) -> Path:
  RESULTS.mkdir(exist_ok=True)
  path = RESULTS / f"{name}.md"
  path.write_text(f"# {title}\n\n" + "\n".join(machine_lines()) + "\n\n" + body.rstrip() + "\n")
  return path


def median_time(fn, runs: int) -> float:
  """Median wall time of `fn()` (which must block until done) over `runs` calls."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def write_lines(path, lines: list[str]) -> Path:
  """Writes a results table (lines already holding the title and machine) to `path` and says so."""
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("\n".join(lines) + "\n")
  print(f"wrote {out}")
  return out
