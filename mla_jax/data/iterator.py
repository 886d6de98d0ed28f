"""A seeded, resumable batch iterator over non-overlapping windows of a token stream.

Each epoch visits every window of seq_len + 1 tokens once, in a permutation seeded by (seed, epoch).
The whole state is the step counter, so a restored iterator yields exactly the batches an unbroken run
would. With several processes each one builds only its own rows of the global batch.
"""

from __future__ import annotations

import numpy as np

from mla_jax.errors import DataError


class BatchIterator:

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, source: str = "data",
               process_index: int = 0, process_count: int = 1):
    self.num_windows = (len(tokens) - 1) // seq_len
    if self.num_windows < batch_size:
      need = batch_size * seq_len + 1
      raise DataError(f"{source}: {len(tokens):,} training tokens are too few for one batch of "
                      f"{batch_size} x {seq_len} (need at least {need:,})")
    if batch_size % process_count:
      raise DataError(f"trainer.batch_size={batch_size} is not divisible by the {process_count} processes")
    self.tokens = tokens
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.local_rows = np.arange(batch_size // process_count) + process_index * (batch_size // process_count)
    self.step = 0
    self._perm_epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
      self._perm_epoch = epoch
    return self._perm

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The local rows of global batch `step`: inputs and targets [rows, seq_len] int32."""
    T = self.seq_len
    rows = np.empty((len(self.local_rows), T + 1), np.int32)
    for r, j in enumerate(self.local_rows):
      sample = step * self.batch_size + int(j)
      epoch, index = divmod(sample, self.num_windows)
      start = int(self._permutation(epoch)[index]) * T
      rows[r] = self.tokens[start:start + T + 1]
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])

  def steps_per_epoch(self) -> int:
    return self.num_windows // self.batch_size


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int, source: str = "validation"):
  """Consecutive non-overlapping windows from the start of the held-out tokens (the same every time)."""
  num_windows = (len(tokens) - 1) // seq_len
  if num_windows < batch_size:
    raise DataError(f"{source}: {len(tokens):,} held-out tokens are too few for one evaluation batch of "
                    f"{batch_size} x {seq_len}; raise data.val_fraction or lower trainer.batch_size")
  n = min(max_batches, num_windows // batch_size)
  batches = []
  for b in range(n):
    rows = np.stack([tokens[(b * batch_size + j) * seq_len:(b * batch_size + j) * seq_len + seq_len + 1]
                     for j in range(batch_size)]).astype(np.int32)
    batches.append({"inputs": rows[:, :-1], "targets": rows[:, 1:]})
  return batches
