"""`trainer.profile_steps = "FIRST,LAST"` (`config.profile_window`): a jax.profiler trace of those train
steps (1-based, inclusive), written under `<workdir>/profile/`. Open it with
`tensorboard --logdir <workdir>/profile` (Profile tab, from the tensorboard-plugin-profile package) or load
the `.trace.json.gz` file in ui.perfetto.dev."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import jax


class StepProfiler:
  """Starts the trace before step FIRST runs and stops it once step LAST's results are ready."""

  def __init__(self, steps: tuple[int, int] | None, workdir: str, say: Callable[[str], None], enabled: bool = True):
    self.steps = steps if enabled else None
    self.directory = os.path.join(workdir, "profile")
    self.say = say
    self.active = False

  def before(self, step: int) -> None:
    """Called before train step `step` (1-based) is dispatched."""
    if self.steps and step == self.steps[0] and not self.active:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Called after train step `step` was dispatched, with its outputs (waited on before stopping)."""
    if self.active and step >= self.steps[1]:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    if not self.active:
      return
    if outputs is not None:
      jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active = False
    traces = sorted(
      glob.glob(os.path.join(self.directory, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime
    )
    perfetto = f"; or load {traces[-1]} in ui.perfetto.dev" if traces else ""
    first, last = self.steps
    self.say(
      f"Profile of steps {first}-{last}: {self.directory} (open with `tensorboard --logdir "
      f"{self.directory}`, Profile tab{perfetto})"
    )
