"""Stopping a run cleanly: SIGTERM/SIGINT requests and runs of non-finite updates.

`StopSignals` turns the first SIGTERM or SIGINT into a flag that the loop checks after each step (it
then saves and exits with the command that resumes); a second SIGINT interrupts at once.
`NonFiniteGuard` counts consecutive skipped updates and raises TrainingError after the limit.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from typing import Optional

from mla_jax.errors import TrainingError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context manager: while active, SIGTERM/SIGINT set `received` (the signal's name) instead of killing."""

  def __init__(self):
    self.received: Optional[str] = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


class NonFiniteGuard:
  """Counts consecutive skipped (non-finite) updates from per-step `skipped` flags.

  `push` reads the flag of the previous step, which has finished by the time the next one is dispatched,
  so the check never stalls the device; `flush` reads the latest one (call it before saving).
  """

  def __init__(self, limit: int, consecutive: int = 0, report=None):
    self.limit, self.consecutive, self.total = limit, consecutive, 0
    self.report = report
    self._unread = None  # (step, flag) not yet read

  def push(self, step: int, skipped_flag) -> None:
    self.flush()
    self._unread = (step, skipped_flag)

  def flush(self) -> None:
    if self._unread is None:
      return
    step, flag = self._unread
    self._unread = None
    if int(flag):
      self.consecutive += 1
      self.total += 1
      if self.report:
        self.report(f"step {step}: non-finite loss or gradient, update skipped "
                    f"({self.consecutive} in a row, limit {self.limit})")
      if self.consecutive >= self.limit:
        raise TrainingError(f"step {step}: {self.consecutive} consecutive non-finite updates "
                            f"(trainer.max_skipped_steps={self.limit}); stopping without saving over the "
                            "last good checkpoint; lower trainer.learning_rate or check the data")
    else:
      self.consecutive = 0


def exit_code(signal_name: str) -> int:
  """128 + the signal number (143 for SIGTERM, 130 for SIGINT): stopped early after a save, resumable."""
  return 128 + int(signal.Signals[signal_name])


def resume_command(workdir: str, argv: Optional[list[str]] = None) -> str:
  """The command line that resumes this run: the original flags when known, else the workdir alone."""
  if argv:
    return shlex.join([sys.executable, "-m", "mla_jax.train", *argv])
  return shlex.join([sys.executable, "-m", "mla_jax.train", "--config=<the same config>",
                     f"--workdir={os.path.abspath(workdir)}"])
