"""Stopping a run cleanly: SIGTERM/SIGINT requests and runs of non-finite updates.

`StopSignals` turns the first SIGTERM or SIGINT into a flag that the loop checks after each step (it
then saves and exits with the command that resumes) and says so at once; a second SIGINT exits at once
without saving.
`NonFiniteGuard` counts consecutive skipped updates and raises TrainingError after the limit.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import threading

from mla_jax.errors import TrainingError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context manager: while active, SIGTERM/SIGINT set `received` (the signal's name) instead of killing.

  The first signal prints at once that a checkpoint is being written; a second SIGINT prints that it
  stops without saving and exits with 130 at once. Python runs signal handlers only when the main thread
  is back in the interpreter (not while it waits for a train step or a save), so a thread woken through
  `signal.set_wakeup_fd` prints and exits; the handler itself only sets `received`.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    self._wakeup = None  # (reader, writer) sockets and the previous wakeup fd while the watcher runs
    self._seen = 0

  def _handle(self, signum, frame):
    del frame
    if self._wakeup is None:  # no watcher thread: report here
      self._report(signum)
    if self.received is None:
      self.received = signal.Signals(signum).name

  def _report(self, signum) -> None:
    """Tells the user what the signal does; the second SIGINT exits at once without saving."""
    stream = sys.stderr
    self._seen += 1
    if self._seen == 1:
      again = "; press Ctrl-C again to stop at once without saving" if signum == signal.SIGINT else ""
      name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
      stream.write(f"\n{name} received: finishing the current step and writing a checkpoint, then exiting{again}.\n")
      stream.flush()
    elif signum == signal.SIGINT:
      stream.write("\nSecond Ctrl-C: stopping now without saving (the last complete checkpoint is kept).\n")
      stream.flush()
      sys.stdout.flush()
      os._exit(exit_code("SIGINT"))  # no cleanup, as asked: like SIGKILL, which resuming already handles

  def _watch(self, reader: socket.socket) -> None:
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in SIGNALS:
          self._report(signum)

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
      return self
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
      previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
      reader.close()
      writer.close()
    else:
      self._wakeup = (reader, writer, previous_fd)
      threading.Thread(target=self._watch, args=(reader,), name="stop-signals", daemon=True).start()
    for sig in SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    if self._wakeup:
      reader, writer, previous_fd = self._wakeup
      signal.set_wakeup_fd(previous_fd)
      writer.close()
      reader.shutdown(socket.SHUT_RDWR)  # ends the watcher's recv
      reader.close()
      self._wakeup = None


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
        self.report(
          f"step {step}: non-finite loss or gradient, update skipped ({self.consecutive} in a row, limit {self.limit})"
        )
      if self.consecutive >= self.limit:
        raise TrainingError(
          f"step {step}: {self.consecutive} consecutive non-finite updates "
          f"(trainer.max_skipped_steps={self.limit}); stopping without saving over the "
          "last good checkpoint; lower trainer.learning_rate or check the data"
        )
    else:
      self.consecutive = 0


def exit_code(signal_name: str) -> int:
  """128 + the signal number (143 for SIGTERM, 130 for SIGINT): stopped early after a save, resumable."""
  return 128 + int(signal.Signals[signal_name])


def resume_command(workdir: str, argv: list[str] | None = None) -> str:
  """The command line that resumes this run: the original flags when known, else the workdir alone."""
  if argv:
    return shlex.join([sys.executable, "-m", "mla_jax.train", *argv])
  return shlex.join(
    [sys.executable, "-m", "mla_jax.train", "--config=<the same config>", f"--workdir={os.path.abspath(workdir)}"]
  )
