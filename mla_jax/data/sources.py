"""Where tokens come from: the embedded corpus, text files and folders, and pre-tokenized token files.

The embedded corpus is the running interpreter's own standard-library sources (real human-written text
that exists on every machine with Python): files in sorted order, tests excluded, and a deterministic
held-out split by file (a CRC32 of the relative path). Token files are raw little-endian streams of
uint32 (the seed trainer's `.bin` format) or uint16, with no header.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sysconfig
import zlib
from typing import Iterable

import numpy as np

from mla_jax.errors import DataError

TOKEN_FORMATS = {".bin": "uint32", ".u32": "uint32", ".uint32": "uint32", ".u16": "uint16", ".uint16": "uint16"}
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclasses.dataclass
class Corpus:
  train: np.ndarray  # uint32 token ids
  val: np.ndarray
  description: str
  source: str  # the file or folder the tokens came from (named in errors)


def stdlib_files() -> list[tuple[str, pathlib.Path]]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if not _SKIP_DIRS.intersection(rel.parts):
      files.append((rel.as_posix(), path))
  return files


def _is_val(rel: str, val_fraction: float) -> bool:
  return (zlib.crc32(rel.encode()) % 10_000) < val_fraction * 10_000


def _read_text(path: pathlib.Path) -> str | None:
  try:
    return path.read_text(encoding="utf-8")
  except (UnicodeDecodeError, OSError):
    return None


def _encode_documents(docs: Iterable[str], tokenizer) -> np.ndarray:
  parts = []
  for text in docs:
    parts.append(tokenizer.encode(text))
    if tokenizer.eos_id is not None:
      parts.append(np.asarray([tokenizer.eos_id], np.uint32))
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint32)


def _split_files(files: list[tuple[str, pathlib.Path]], tokenizer, val_fraction: float, max_bytes: int, source):
  train_docs, val_docs, total = [], [], 0
  for rel, path in files:
    text = _read_text(path)
    if not text:
      continue
    total += len(text.encode("utf-8"))
    if total > max_bytes:
      break
    (val_docs if _is_val(rel, val_fraction) else train_docs).append(text)
  if not train_docs:
    raise DataError(f"{source}: no readable UTF-8 text files found")
  if val_fraction > 0 and not val_docs:  # tiny folders: hold out the last file
    val_docs.append(train_docs.pop())
    if not train_docs:
      raise DataError(f"{source}: one file is too few to hold out a validation split; give more files "
                      "or set data.val_fraction=0")
  return _encode_documents(train_docs, tokenizer), _encode_documents(val_docs, tokenizer), len(train_docs), len(val_docs)


def read_token_file(path: str, fmt: str) -> np.ndarray:
  """Reads a headerless little-endian uint32/uint16 token stream, checking its size."""
  dtype = np.dtype("<u4" if fmt == "uint32" else "<u2")
  size = os.path.getsize(path)
  if size == 0:
    raise DataError(f"{path}: token file is empty")
  if size % dtype.itemsize:
    raise DataError(f"{path}: size {size} bytes is not a multiple of {dtype.itemsize} ({fmt} tokens); "
                    "is data.format right?")
  return np.fromfile(path, dtype=dtype).astype(np.uint32)


def load_corpus(data_cfg, tokenizer, vocab_size: int = 0) -> Corpus:
  """Loads data.corpus with data.format, splitting off data.val_fraction for validation.

  Token files are checked against `vocab_size` (the model's, when set) or the tokenizer's vocabulary.
  """
  spec, val_fraction = data_cfg.corpus, data_cfg.val_fraction
  if spec == "stdlib":
    files = stdlib_files()
    train, val, n_train, n_val = _split_files(files, tokenizer, val_fraction, data_cfg.max_bytes,
                                              "the standard-library corpus")
    return Corpus(train, val, f"Python {sysconfig.get_python_version()} standard library: "
                  f"{n_train} train / {n_val} validation files", sysconfig.get_paths()["stdlib"])
  path = pathlib.Path(spec).expanduser()
  if not path.exists():
    raise DataError(f"{spec}: data path not found")
  if path.is_dir():
    files = [(p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*")) if p.is_file()]
    if not files:
      raise DataError(f"{spec}: folder holds no files")
    train, val, n_train, n_val = _split_files(files, tokenizer, val_fraction, data_cfg.max_bytes, spec)
    return Corpus(train, val, f"{spec}: {n_train} train / {n_val} validation files", spec)
  fmt = data_cfg.format
  if fmt == "auto":
    fmt = TOKEN_FORMATS.get(path.suffix.lower(), "text")
  if fmt == "text":
    if path.stat().st_size == 0:
      raise DataError(f"{spec}: text file is empty")
    text = _read_text(path)
    if text is None:
      raise DataError(f"{spec}: not UTF-8 text (for token files use a .bin/.u16 name or set data.format)")
    tokens = _encode_documents([text], tokenizer)
  else:
    tokens = read_token_file(str(path), fmt)
    limit = vocab_size or tokenizer.vocab_size
    too_big = tokens >= limit
    if too_big.any():
      first = int(np.argmax(too_big))
      raise DataError(f"{spec}: token id {int(tokens[first])} at position {first} is outside the vocabulary "
                      f"(size {limit}); set data.tokenizer or model.vocab_size to match")
  n_val = int(len(tokens) * val_fraction)
  train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
  return Corpus(train, val, f"{spec}: {fmt}, {len(tokens):,} tokens ({len(val):,} held out)", spec)

