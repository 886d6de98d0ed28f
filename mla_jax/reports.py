"""What training shows a person: the progress line and the memory lines of the compiled step.

`fmt_bytes` is the package's one way to write a byte count.
"""

from __future__ import annotations

import math
import sys


def fmt_bytes(n: float) -> str:
  return f"{n / 2**30:,.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:,.1f} MiB"


def fmt_time(seconds: float) -> str:
  """'1h02m' from an hour on, '3m05s' below; '?' when not finite."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
  """A one-line progress bar on a terminal, plain log lines otherwise."""

  def __init__(self, total: int, stream=sys.stdout):
    self.total, self.stream = total, stream
    self.tty = stream.isatty()

  def update(self, step: int, metrics: dict, tokens_per_s: float, eta_s: float) -> None:
    text = (
      f"step {step:>6}/{self.total}  loss {metrics['loss']:.4f}  grad {metrics['grad_norm']:.3f}  "
      f"lr {metrics['learning_rate']:.2e}  {tokens_per_s:,.0f} tok/s  ETA {fmt_time(eta_s)}"
    )
    if self.tty:
      width = 24
      filled = int(width * step / max(self.total, 1))
      self.stream.write("\r[" + "#" * filled + "." * (width - filled) + "] " + text + "\033[K")
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
    self.stream.flush()


def memory_line(stats: dict | None) -> str:
  """One line from `memory.memory_stats` of a compiled program: per-device arguments, outputs, temporaries."""
  if stats is None:
    return "Memory per device: not reported by this backend"
  s = stats
  return (
    f"Memory per device: arguments {fmt_bytes(s['arguments'])}, outputs {fmt_bytes(s['outputs'])} "
    f"({fmt_bytes(s['aliased'])} reusing donated inputs), temporaries {fmt_bytes(s['temporaries'])}; "
    f"total {fmt_bytes(s['total'])}"
  )


def remat_line(policy: str, table: list, capacity_bytes: int, auto: bool, where: str = "the device") -> str:
  """'remat none: 3.10 GiB of 22.00 GiB per device (...)' for the chosen policy (the last row of
  `memory.select_remat`'s table); with auto, also the policies that did not fit."""
  row = table[-1]
  used = "size not reported" if row["total"] is None else fmt_bytes(row["total"])
  text = f"remat {policy}: {used} of {fmt_bytes(capacity_bytes)} per device ({where})"
  if auto:
    skipped = [
      f"{r['policy']} needs {fmt_bytes(r['total'])}" if r["total"] else f"{r['policy']} is too large"
      for r in table[:-1]
    ]
    text += "; model.remat=auto takes the least recomputation that fits" + (
      f" ({', '.join(skipped)})" if skipped else ""
    )
  return text
