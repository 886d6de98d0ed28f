"""A seeded, resumable batch iterator over fixed rows: windows of a token stream, or packed documents.

With data.packing=stream a row is a window of seq_len + 1 tokens (non-overlapping, one token shared with
the next window) and a batch holds inputs and targets. With documents the rows are the corpus's documents
packed once, in an order seeded by the seed (mla_jax.data.packing), and a batch also holds positions,
segment ids and loss weights. Either way each epoch visits every row once, in a permutation seeded by
(seed, epoch), so the whole state is the step counter and a restored iterator yields exactly the batches
an unbroken run would. With several processes each one builds only its own rows of the global batch.
"""

from __future__ import annotations

import numpy as np

from mla_jax.data import packing as packing_lib
from mla_jax.errors import DataError

_PACK_STREAM = 0x7061636B  # seeds the packing order apart from the epochs' permutations


class BatchIterator:
  """`documents`: document offsets ([documents + 1], mla_jax.data.packing.document_offsets) to pack
  whole documents into rows; None cuts rows from the token stream."""

  def __init__(
    self,
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    seed: int,
    source: str = "data",
    process_index: int = 0,
    process_count: int = 1,
    documents: np.ndarray | None = None,
  ):
    self.packing = None
    if documents is None:
      self.num_windows = (len(tokens) - 1) // seq_len
      if self.num_windows < batch_size:
        need = batch_size * seq_len + 1
        raise DataError(
          f"{source}: {len(tokens):,} training tokens are too few for one batch of "
          f"{batch_size} x {seq_len} (need at least {need:,})"
        )
    else:
      order = np.random.default_rng([seed, _PACK_STREAM]).permutation(len(documents) - 1)
      self.packing = packing_lib.pack(documents, seq_len, order)
      self.num_windows = self.packing.num_rows
      if self.num_windows < batch_size:
        raise DataError(
          f"{source}: {len(documents) - 1:,} training documents pack into {self.num_windows:,} "
          f"rows of {seq_len} tokens, too few for one batch of {batch_size}"
        )
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

  def _row(self, step: int, j: int) -> int:
    epoch, index = divmod(step * self.batch_size + int(j), self.num_windows)
    return int(self._permutation(epoch)[index])

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The local rows of global batch `step`: [rows, seq_len] arrays of `packing.batch_dtypes`."""
    rows = [self._row(step, j) for j in self.local_rows]
    if self.packing is not None:
      return self.packing.rows(self.tokens, rows)
    T = self.seq_len
    out = np.empty((len(rows), T + 1), np.int32)
    for r, row in enumerate(rows):
      out[r] = self.tokens[row * T : row * T + T + 1]
    return {"inputs": out[:, :-1], "targets": out[:, 1:]}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {
      "step": self.step,
      "seed": self.seed,
      "batch_size": self.batch_size,
      "seq_len": self.seq_len,
      "packing": "stream" if self.packing is None else "documents",
    }

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])

  def steps_per_epoch(self) -> int:
    return self.num_windows // self.batch_size


def eval_batches(
  tokens: np.ndarray,
  batch_size: int,
  seq_len: int,
  max_batches: int,
  source: str = "validation",
  documents: np.ndarray | None = None,
):
  """The same batches every time: consecutive non-overlapping windows from the start of the held-out
  tokens, or with `documents` (offsets) the held-out documents packed in their stored order, first rows
  first."""
  if documents is not None:
    packed = packing_lib.pack(documents, seq_len)
    if packed.num_rows < batch_size:
      raise DataError(
        f"{source}: {len(documents) - 1:,} held-out documents pack into {packed.num_rows:,} rows "
        f"of {seq_len} tokens, too few for one evaluation batch of {batch_size}; raise "
        "data.val_fraction or lower trainer.batch_size"
      )
    n = min(max_batches, packed.num_rows // batch_size)
    return [packed.rows(tokens, range(b * batch_size, (b + 1) * batch_size)) for b in range(n)]
  num_windows = (len(tokens) - 1) // seq_len
  if num_windows < batch_size:
    raise DataError(
      f"{source}: {len(tokens):,} held-out tokens are too few for one evaluation batch of "
      f"{batch_size} x {seq_len}; raise data.val_fraction or lower trainer.batch_size"
    )
  n = min(max_batches, num_windows // batch_size)
  batches = []
  for b in range(n):
    rows = np.stack(
      [tokens[(b * batch_size + j) * seq_len : (b * batch_size + j) * seq_len + seq_len + 1] for j in range(batch_size)]
    ).astype(np.int32)
    batches.append({"inputs": rows[:, :-1], "targets": rows[:, 1:]})
  return batches
