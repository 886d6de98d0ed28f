"""Whole documents packed into rows (data.packing=documents): greedy best fit, segment ids, positions, weights.

A document of n tokens (its end-of-document id included) holds n - 1 (input, target) pairs, all inside it,
so no target crosses into another document. A row holds T pairs. A document of at most T pairs goes whole
into one row; a longer one is cut into pieces of T pairs (the last one shorter), each its own segment,
consecutive pieces sharing one token as stream windows do (the last target of a piece is the first input
of the next), so every pair of every document lands in exactly one row. Pieces are placed by online best
fit in a given order: each into the open row with the least room that still holds it, else into a new
row. In a random order that leaves almost no padding.

A packed row, T slots each:
  inputs, targets  int32   the pairs, piece after piece; 0 in the padding at the end
  positions        int32   0, 1, ... restarting at every piece (they only feed RoPE)
  segment_ids      int32   1, 2, ... per piece, increasing along the row; 0 in the padding
  weights          float32 1 on every pair, 0 in the padding (the loss skips it)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mla_jax.errors import ConfigError

PACKED_KEYS = {
  "inputs": np.int32,
  "targets": np.int32,
  "positions": np.int32,
  "segment_ids": np.int32,
  "weights": np.float32,
}


def batch_dtypes(packing: str) -> dict[str, type]:
  """The keys of a batch under `data.packing` and their dtypes."""
  if packing == "documents":
    return dict(PACKED_KEYS)
  return {"inputs": np.int32, "targets": np.int32}


@dataclasses.dataclass
class Packing:
  """Rows as runs of pieces: row r holds pieces row_start[r]:row_start[r + 1]; piece i is the pairs
  (tokens[starts[i] + j], tokens[starts[i] + j + 1]) for j < lengths[i]."""

  seq_len: int
  row_start: np.ndarray  # int64 [rows + 1]
  starts: np.ndarray  # int64 [pieces]
  lengths: np.ndarray  # int64 [pieces]

  @property
  def num_rows(self) -> int:
    return len(self.row_start) - 1

  @property
  def num_pairs(self) -> int:
    return int(self.lengths.sum())

  def rows(self, tokens: np.ndarray, indices) -> dict[str, np.ndarray]:
    """The packed rows `indices` of `tokens`: every key of PACKED_KEYS, [len(indices), T]."""
    T = self.seq_len
    out = {k: np.zeros((len(indices), T), dtype) for k, dtype in PACKED_KEYS.items()}
    for r, row in enumerate(indices):
      at = 0
      for segment, i in enumerate(range(self.row_start[row], self.row_start[row + 1]), 1):
        a, n = int(self.starts[i]), int(self.lengths[i])
        piece = tokens[a : a + n + 1]
        out["inputs"][r, at : at + n] = piece[:-1]
        out["targets"][r, at : at + n] = piece[1:]
        out["positions"][r, at : at + n] = np.arange(n)
        out["segment_ids"][r, at : at + n] = segment
        out["weights"][r, at : at + n] = 1.0
        at += n
    return out


def pieces(offsets: np.ndarray, seq_len: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(starts, lengths) of the pieces of the documents offsets[d]:offsets[d + 1], documents taken in
  `order` (default: as stored), each document's pieces in turn; documents without a pair are left out."""
  offsets = np.asarray(offsets, np.int64)
  doc_start, pairs = offsets[:-1], np.diff(offsets) - 1
  if order is not None:
    doc_start, pairs = doc_start[order], pairs[order]
  keep = pairs > 0
  doc_start, pairs = doc_start[keep], pairs[keep]
  count = -(-pairs // seq_len)
  first = np.cumsum(count) - count  # index of each document's first piece
  j = np.arange(int(count.sum())) - np.repeat(first, count)  # piece number inside its document
  starts = np.repeat(doc_start, count) + j * seq_len
  lengths = np.minimum(seq_len, np.repeat(pairs, count) - j * seq_len)
  return starts, lengths


def best_fit(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """Row index (numbered as rows open) of each piece, placed in turn into the open row with the least
  room that holds it, else a new row. Open rows sit in buckets by room; a bit mask of the non-empty
  buckets finds the best one with one shift."""
  buckets: list[list[int]] = [[] for _ in range(seq_len + 1)]
  mask, num_rows = 0, 0
  row_of = np.empty(len(lengths), np.int64)
  for i, n in enumerate(lengths.tolist()):
    fits = mask >> n
    if fits:
      room = n + (fits & -fits).bit_length() - 1
      bucket = buckets[room]
      row = bucket.pop()
      if not bucket:
        mask &= ~(1 << room)
    else:
      room, row = seq_len, num_rows
      num_rows += 1
    row_of[i] = row
    if room > n:
      buckets[room - n].append(row)
      mask |= 1 << (room - n)
  return row_of


def pack(offsets: np.ndarray, seq_len: int, order: np.ndarray | None = None) -> Packing:
  """The documents of `offsets` packed into rows of seq_len pairs, in `order` (default: as stored)."""
  starts, lengths = pieces(offsets, seq_len, order)
  row_of = best_fit(lengths, seq_len)
  by_row = np.argsort(row_of, kind="stable")  # a row's pieces in the order they were placed
  row_start = np.searchsorted(row_of[by_row], np.arange(int(row_of.max(initial=-1)) + 2))
  return Packing(seq_len, row_start.astype(np.int64), starts[by_row], lengths[by_row])


def document_offsets(
  tokens: np.ndarray, offsets: np.ndarray | None, eos_id: int | None, source: str, require: bool = True
) -> np.ndarray:
  """Document boundaries [documents + 1] of `tokens`: the corpus's own, else a cut after every
  end-of-document id. With neither (or no such id in the tokens, when `require`), a ConfigError."""
  if offsets is not None:
    return np.asarray(offsets, np.int64)
  if eos_id is None:
    raise ConfigError(
      "data.packing",
      f"documents needs document boundaries: {source} records none and the "
      "tokenizer has no end-of-document id; use data.packing=stream",
    )
  ends = np.flatnonzero(np.asarray(tokens) == eos_id).astype(np.int64) + 1
  if require and not len(ends):
    raise ConfigError(
      "data.packing",
      f"documents needs document boundaries: {source} records none and holds no "
      f"end-of-document id ({eos_id}); use data.packing=stream",
    )
  if not len(ends) or ends[-1] != len(tokens):
    ends = np.append(ends, len(tokens))
  return np.concatenate([[0], ends]).astype(np.int64)


def corpus_documents(corpus, packing: str, eos_id: int | None):
  """(train, validation) document offsets for data.packing=documents; (None, None) for stream."""
  if packing != "documents":
    return None, None
  train = document_offsets(corpus.train, corpus.train_offsets, eos_id, corpus.source)
  val = document_offsets(corpus.val, corpus.val_offsets, eos_id, corpus.source, require=False)
  return train, val
