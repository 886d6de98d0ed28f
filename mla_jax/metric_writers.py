"""Where a run's metrics go: `metrics.jsonl` (one JSON record per line), TensorBoard event files in the same
workdir (`tensorboard --logdir runs/` compares runs side by side), and the loss-curve PNG drawn from them.

A resumed run keeps the records up to its checkpoint step and drops the later ones in both places:
metrics.jsonl is rewritten, and the TensorBoard writer purges events from that step on.
"""

from __future__ import annotations

import json
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

# Record keys that are bookkeeping, not curves.
_NOT_SCALARS = ("step",)
# TensorBoard tags: training curves under train/, evaluation under val/, throughput under perf/.
_PERF = ("tokens_per_s", "model_tflops_per_s", "mfu", "skipped", "skipped_total")


def tag(key: str) -> str:
  if key.startswith("val_"):
    return "val/" + key[len("val_") :]
  return ("perf/" if key in _PERF else "train/") + key


class MetricWriter:
  """Appends records to `<workdir>/metrics.jsonl` and mirrors them as TensorBoard scalars.

  `history` holds every record kept, for the loss curve and the end-of-run summary. With `enabled`
  False (processes other than 0) nothing is written. The event file is opened with the first record, so a
  run that fails before its first log leaves none behind.
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.history = read_history(self.path, start_step) if enabled else []
    self._file = open(self.path, "a") if enabled else None  # noqa: SIM115 (closed by close())
    self._workdir, self._start_step = workdir, start_step
    self._use_tb = enabled and tensorboard
    self._tb_writer = None

  @property
  def _tb(self):
    if self._use_tb and self._tb_writer is None:
      # purge_step: TensorBoard hides events from a crashed run's later steps when this run resumes.
      purge = self._start_step + 1 if self._start_step else None
      self._tb_writer = SummaryWriter(self._workdir, purge_step=purge, flush_secs=30)
    return self._tb_writer

  def write(self, record: dict) -> None:
    """One record {"step": n, name: value, ...}: a JSON line and a TensorBoard scalar per number."""
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    self.history.append(record)
    if self._tb is not None:
      for key, value in record.items():
        if key not in _NOT_SCALARS and isinstance(value, (int, float)) and np.isfinite(value):
          self._tb.add_scalar(tag(key), value, record["step"])

  def histogram(self, step: int, name: str, values) -> None:
    if self._tb is not None:
      self._tb.add_histogram(name, np.asarray(values, np.float64), step)

  def text(self, step: int, name: str, text: str) -> None:
    if self._tb is not None:
      self._tb.add_text(name, text, step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb_writer is not None:
      self._tb_writer.close()
    self._use_tb, self._tb_writer = False, None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_history(path: str, start_step: int) -> list[dict]:
  """Records of `path` up to `start_step` (the file is rewritten to hold only those); a fresh run
  (start_step 0) starts an empty file. Unreadable lines (a crash mid-write) are dropped."""
  if not os.path.exists(path) or start_step == 0:
    if os.path.exists(path):
      os.remove(path)
    return []
  history = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get("step", 0) <= start_step:
        history.append(record)
  with open(path, "w") as f:
    for record in history:
      f.write(json.dumps(record) + "\n")
  return history


def read_events(logdir: str) -> list:
  """Every TensorBoard Event (protobuf) in `logdir`'s event files, in file order: for tests and scripts
  that check what a run logged without TensorBoard itself."""
  events = []
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    i = 0
    while i + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      n = int.from_bytes(data[i : i + 8], "little")
      events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
      i += 12 + n + 4
  return events


def scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the scalar summaries in `logdir`."""
  out: dict[str, list[tuple[int, float]]] = {}
  for event in read_events(logdir):
    for value in event.summary.value:
      if value.HasField("simple_value"):
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def save_loss_curve(path: str, history: list[dict]) -> None:
  """Train loss (records with `loss`) and validation loss (records with `val_loss`) against step, as a PNG."""
  fig = Figure(figsize=(7, 4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  train = [(h["step"], h["loss"]) for h in history if "loss" in h]
  val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
  if train:
    ax.plot(*zip(*train), label="train loss")
  if val:
    ax.plot(*zip(*val), "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
