"""Where tokens come from: the embedded corpus, text files and folders, JSON lines and parquet datasets,
and pre-tokenized token files.

The embedded corpus is the running interpreter's own standard-library sources (real human-written text
that exists on every machine with Python): files in sorted order, tests excluded, and a deterministic
held-out split by file (a CRC32 of the relative path); a folder of text files is split the same way. A
single text file and .jsonl / .jsonl.gz / .parquet datasets (a file, or a folder holding them) hold out the
last val_fraction of their tokens, from a document start. Text other than the embedded corpus is tokenized
once and cached (mla_jax.data.text). Token files are raw little-endian streams of uint32 (the seed
trainer's `.bin` format) or uint16, with no header.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sysconfig
import zlib

import numpy as np

from mla_jax.data import text
from mla_jax.errors import DataError

TOKEN_FORMATS = {".bin": "uint32", ".u32": "uint32", ".uint32": "uint32", ".u16": "uint16", ".uint16": "uint16"}
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclasses.dataclass
class Corpus:
  train: np.ndarray  # token ids (uint16 or uint32; a read-only memmap when read from the token cache)
  val: np.ndarray
  description: str
  source: str  # the file or folder the tokens came from (named in errors)
  # Document boundaries in train / val ([documents + 1], from 0 to the length; a document cut by the split
  # counts as one on each side); None for token files, whose documents are unknown.
  train_offsets: np.ndarray | None = None
  val_offsets: np.ndarray | None = None


def stdlib_files() -> list[tuple[str, pathlib.Path]]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if not _SKIP_DIRS.intersection(rel.parts):
      files.append((rel.as_posix(), path))
  return files


def folder_files(path: pathlib.Path) -> list[pathlib.Path]:
  """Every file under `path` in sorted order, leaving out hidden files and folders (the token cache among them)."""
  return [
    p
    for p in sorted(path.rglob("*"))
    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
  ]


def _is_val(rel: str, val_fraction: float) -> bool:
  return (zlib.crc32(rel.encode()) % 10_000) < val_fraction * 10_000


def _gather(tokens: np.ndarray, ranges: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """The documents tokens[start:end] one after another (a view when they are adjacent), and their offsets."""
  runs = []
  for start, end in ranges:
    if runs and runs[-1][1] == start:
      runs[-1][1] = end
    else:
      runs.append([start, end])
  if len(runs) == 1:
    out = tokens[runs[0][0] : runs[0][1]]
  else:
    out = np.concatenate([tokens[a:b] for a, b in runs]) if runs else tokens[:0]
  offsets = np.concatenate([[0], np.cumsum([end - start for start, end in ranges], dtype=np.int64)])
  return out, offsets.astype(np.int64)


def _split_by_file(store: text.TokenStore, val_fraction: float, source: str):
  """Whole files held out by a CRC32 of their relative path (the last one when none is picked)."""
  train, val, doc = [], [], 0
  offsets = np.asarray(store.offsets, np.int64)
  for name, documents in store.files:
    for _ in range(documents):
      (val if _is_val(name, val_fraction) else train).append((int(offsets[doc]), int(offsets[doc + 1])))
      doc += 1
  if not train:
    raise DataError(f"{source}: no readable UTF-8 text files found")
  if val_fraction > 0 and not val:  # tiny folders: hold out the last file
    val.append(train.pop())
    if not train:
      raise DataError(
        f"{source}: one file is too few to hold out a validation split; give more files or set data.val_fraction=0"
      )
  return _gather(store.tokens, train), _gather(store.tokens, val), len(train), len(val)


def _split_tail(store: text.TokenStore, val_fraction: float):
  """The last val_fraction of the tokens held out, from the first document start in that tail (from
  the exact share when no document starts there)."""
  tokens, offsets = store.tokens, np.asarray(store.offsets, np.int64)
  n = len(tokens)
  cut = n - int(n * val_fraction)
  if cut < n:
    start = int(offsets[np.searchsorted(offsets, cut)])
    cut = start if start < n else cut
  train_offsets = np.append(offsets[offsets < cut], cut)
  val_offsets = np.concatenate([[0], offsets[offsets > cut] - cut])
  return (tokens[:cut], train_offsets), (tokens[cut:], val_offsets)


def read_token_file(path: str, fmt: str) -> np.ndarray:
  """Reads a headerless little-endian uint32/uint16 token stream, checking its size."""
  dtype = np.dtype("<u4" if fmt == "uint32" else "<u2")
  size = os.path.getsize(path)
  if size == 0:
    raise DataError(f"{path}: token file is empty")
  if size % dtype.itemsize:
    raise DataError(
      f"{path}: size {size} bytes is not a multiple of {dtype.itemsize} ({fmt} tokens); is data.format right?"
    )
  return np.fromfile(path, dtype=dtype).astype(np.uint32)


def load_corpus(data_cfg, tokenizer, vocab_size: int = 0, stream=None) -> Corpus:
  """Loads data.corpus with data.format, splitting off data.val_fraction for validation.

  Text sources other than the embedded corpus are tokenized once and cached (mla_jax.data.text); progress
  goes to `stream` (default stderr). Token files are checked against `vocab_size` (the model's, when set)
  or the tokenizer's vocabulary.
  """
  spec, val_fraction = data_cfg.corpus, data_cfg.val_fraction
  text_field = data_cfg.get("text_field", "text")
  if spec == "stdlib":
    root, label = pathlib.Path(sysconfig.get_paths()["stdlib"]), "the standard-library corpus"
    store = text.tokenize(
      root,
      [p for _, p in stdlib_files()],
      "text",
      tokenizer,
      label=label,
      max_bytes=data_cfg.max_bytes,
      use_cache=False,
      stream=stream,
    )
    (train, train_off), (val, val_off), n_train, n_val = _split_by_file(store, val_fraction, label)
    return Corpus(
      train,
      val,
      f"Python {sysconfig.get_python_version()} standard library: {n_train} train / {n_val} validation files",
      str(root),
      train_off,
      val_off,
    )
  path = pathlib.Path(spec).expanduser()
  if not path.exists():
    raise DataError(f"{spec}: data path not found")
  if path.is_dir():
    files = folder_files(path)
    if not files:
      raise DataError(f"{spec}: folder holds no files")
    records = [p for p in files if text.record_kind(p)]
    if records:  # a dataset folder: its .jsonl/.parquet files, other files (README, tokenizer) left out
      store = text.tokenize(path, records, "records", tokenizer, label=spec, text_field=text_field, stream=stream)
      return _records_corpus(store, val_fraction, spec, f"{len(records)} record files")
    store = text.tokenize(path, files, "text", tokenizer, label=spec, max_bytes=data_cfg.max_bytes, stream=stream)
    (train, train_off), (val, val_off), n_train, n_val = _split_by_file(store, val_fraction, spec)
    return Corpus(train, val, f"{spec}: {n_train} train / {n_val} validation files", spec, train_off, val_off)
  fmt = data_cfg.format
  if fmt == "auto" and text.record_kind(path):
    store = text.tokenize(path, [path], "records", tokenizer, label=spec, text_field=text_field, stream=stream)
    return _records_corpus(store, val_fraction, spec, text.record_kind(path))
  if fmt == "auto":
    fmt = TOKEN_FORMATS.get(path.suffix.lower(), "text")
  if fmt == "text":
    if path.stat().st_size == 0:
      raise DataError(f"{spec}: text file is empty")
    store = text.tokenize(path, [path], "text", tokenizer, label=spec, strict=True, stream=stream)
    (train, train_off), (val, val_off) = _split_tail(store, val_fraction)
    return Corpus(
      train, val, f"{spec}: text, {len(store.tokens):,} tokens ({len(val):,} held out)", spec, train_off, val_off
    )
  tokens = read_token_file(str(path), fmt)
  limit = vocab_size or tokenizer.vocab_size
  too_big = tokens >= limit
  if too_big.any():
    first = int(np.argmax(too_big))
    raise DataError(
      f"{spec}: token id {int(tokens[first])} at position {first} is outside the vocabulary "
      f"(size {limit}); set data.tokenizer or model.vocab_size to match"
    )
  n_val = int(len(tokens) * val_fraction)
  train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
  return Corpus(train, val, f"{spec}: {fmt}, {len(tokens):,} tokens ({len(val):,} held out)", spec)


def _records_corpus(store: text.TokenStore, val_fraction: float, spec: str, what: str) -> Corpus:
  (train, train_off), (val, val_off) = _split_tail(store, val_fraction)
  return Corpus(
    train,
    val,
    f"{spec}: {what}, {len(store.offsets) - 1:,} documents, {len(store.tokens):,} tokens ({len(val):,} held out)",
    spec,
    train_off,
    val_off,
  )
