"""Text sources tokenized once: JSON lines, parquet and plain-text files, with an on-disk token cache.

Documents: a `.jsonl` / `.jsonl.gz` file holds one JSON object per line, its document the string under
`data.text_field`; a `.parquet` file holds one document per row in the `data.text_field` column (read
through pyarrow); a plain UTF-8 text file is one document. Empty documents are skipped, and every other
one is followed by the tokenizer's end-of-document id (when it has one), as for the embedded corpus.

The cache, written the first time and memory-mapped afterwards, is three files named `<source>.<key>.*`:
  .u16 / .u32   the headerless little-endian token stream (uint32 when the vocabulary exceeds 65,536 ids;
                also readable as a token file through data.corpus)
  .offsets.npy  document boundaries, uint64 [documents + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
                (its end-of-document id included)
  .json         the manifest: tokenizer fingerprint, every source file with its size, mtime and number of
                documents, dtype, token and document counts
The key hashes the source path, the tokenizer fingerprint and the reading options, so caches for several
tokenizers sit side by side; a source file whose size or mtime differs from the manifest's (or a file
added or removed) tokenizes again. The cache lives in `.mla_jax_cache/` next to the data (inside a
folder source, beside a file source) or, where that cannot be written, in `$XDG_CACHE_HOME/mla_jax/tokens`
(default `~/.cache/mla_jax/tokens`). Every file is written under a temporary name and renamed into place,
the manifest last and only after the old one is removed, so an interrupted run never leaves a cache that
looks valid.
"""

from __future__ import annotations

import array
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator

import numpy as np

from mla_jax.errors import DataError

CACHE_DIR_NAME = ".mla_jax_cache"
CACHE_VERSION = 1
PROGRESS_SECONDS = 5.0  # at most one progress line this often while tokenizing
_BATCH_DOCS, _BATCH_BYTES = 1024, 4 << 20  # documents go to the tokenizer in batches of about this size
_JSON_TYPES = {
  dict: "an object",
  list: "an array",
  str: "a string",
  int: "a number",
  float: "a number",
  bool: "a boolean",
  type(None): "null",
}


def record_kind(path) -> str | None:
  """'jsonl' or 'parquet' from a file name, else None."""
  name = str(path).lower()
  if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
    return "jsonl"
  if name.endswith(".parquet"):
    return "parquet"
  return None


def token_dtype(vocab_size: int) -> np.dtype:
  """Little-endian uint16 while every id fits (a vocabulary of at most 65,536), else uint32."""
  return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def fallback_cache_dir() -> pathlib.Path:
  """Where token caches go when the data's own folder cannot be written."""
  home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(home) / "mla_jax" / "tokens"


@dataclasses.dataclass
class TokenStore:
  tokens: np.ndarray  # every document followed by the EOS id; a read-only memmap when cached
  offsets: np.ndarray  # [documents + 1] boundaries: document i is tokens[offsets[i]:offsets[i + 1]]
  files: list[tuple[str, int]]  # (name, documents) of every source file, in order
  cache: str | None  # the manifest, when the tokens are cached


def _text_file(path: pathlib.Path, strict: bool) -> Iterator[tuple[str, int]]:
  """The file as one document (newlines normalised as text-mode reading does); unreadable ones are
  skipped, or with `strict` an error."""
  try:
    raw = path.read_bytes()
    text = raw.decode("utf-8")
  except (OSError, UnicodeDecodeError) as e:
    if not strict:
      return
    if isinstance(e, OSError):
      raise DataError(f"{path}: cannot read ({e.strerror})") from e
    raise DataError(f"{path}: not UTF-8 text (for token files use a .bin/.u16 name or set data.format)") from e
  if "\r" in text:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    yield text, len(text.encode("utf-8"))
  else:
    yield text, len(raw)


def _jsonl_file(path: pathlib.Path, field: str) -> Iterator[tuple[str, int]]:
  opener = gzip.open if str(path).lower().endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      for line_no, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        try:
          record = json.loads(raw)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from e
        except UnicodeDecodeError as e:
          raise DataError(f"{path}:{line_no}: not UTF-8") from e
        if not isinstance(record, dict):
          raise DataError(f"{path}:{line_no}: expected a JSON object, found {_JSON_TYPES[type(record)]}")
        if field not in record:
          keys = ", ".join(sorted(record)[:8]) or "none"
          raise DataError(f"{path}:{line_no}: no {field!r} field (set data.text_field; fields here: {keys})")
        text = record[field]
        if not isinstance(text, str):
          raise DataError(f"{path}:{line_no}: field {field!r} is {_JSON_TYPES[type(text)]}, not a string")
        yield text, len(raw)
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise DataError(f"{path}: cannot read ({e})") from e


def _parquet_file(path: pathlib.Path, field: str) -> Iterator[tuple[str, int]]:
  try:
    import pyarrow as pa  # noqa: PLC0415  (optional dependency)
    import pyarrow.parquet as pq  # noqa: PLC0415  (optional dependency)
  except ImportError as e:
    raise DataError(f"{path}: reading parquet needs the 'pyarrow' package (pip install 'mla_jax[parquet]')") from e
  try:
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    if field not in schema.names:
      raise DataError(f"{path}: no {field!r} column (set data.text_field; columns: {', '.join(schema.names[:8])})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise DataError(f"{path}: column {field!r} holds {kind}, not strings")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
      for text in batch.column(0).to_pylist():
        row += 1
        if text is None:
          raise DataError(f"{path}: row {row}: {field!r} is null")
        yield text, len(text.encode("utf-8"))
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable parquet file ({e})") from e


def _documents(path: pathlib.Path, kind: str, text_field: str, strict: bool) -> Iterator[tuple[str, int]]:
  """(text, bytes read) of each document in one source file."""
  if kind == "text":
    return _text_file(path, strict)
  if record_kind(path) == "parquet":
    return _parquet_file(path, text_field)
  return _jsonl_file(path, text_field)


class _Progress:
  def __init__(self, stream, label: str, num_files: int):
    self.stream, self.label, self.num_files = stream, label, num_files
    self.start = self.last = time.monotonic()
    self.files = self.bytes = self.tokens = 0

  def summary(self) -> str:
    rate = self.tokens / max(time.monotonic() - self.start, 1e-6)
    return (
      f"{self.files}/{self.num_files} files, {self.bytes / 1e6:,.1f} MB, {self.tokens:,} tokens, {rate:,.0f} tokens/s"
    )

  def tick(self) -> None:
    now = time.monotonic()
    if self.stream is not None and now - self.last >= PROGRESS_SECONDS:
      self.last = now
      self.stream.write(f"tokenizing {self.label}: {self.summary()}\n")
      self.stream.flush()


class _Encoder:
  """Tokenizes documents in batches and writes their ids, each document followed by the EOS id."""

  def __init__(self, tokenizer, out, progress: _Progress):
    self.tokenizer, self.out, self.progress = tokenizer, out, progress
    self.dtype = token_dtype(tokenizer.vocab_size)
    self.eos = None if tokenizer.eos_id is None else np.asarray([tokenizer.eos_id], np.uint32)
    self.offsets = array.array("Q", [0])
    self.pending, self.pending_bytes, self.documents = [], 0, 0

  def add(self, text: str, num_bytes: int) -> None:
    self.pending.append(text)
    self.pending_bytes += num_bytes
    self.documents += 1
    self.progress.bytes += num_bytes
    if len(self.pending) >= _BATCH_DOCS or self.pending_bytes >= _BATCH_BYTES:
      self.flush()

  def flush(self) -> None:
    if not self.pending:
      return
    batch = getattr(self.tokenizer, "encode_batch", None)
    ids = batch(self.pending) if batch else [self.tokenizer.encode(text) for text in self.pending]
    parts = []
    for doc in ids:
      parts.append(np.asarray(doc, np.uint32))
      if self.eos is not None:
        parts.append(self.eos)
      self.offsets.append(self.offsets[-1] + len(doc) + (self.eos is not None))
    chunk = np.concatenate(parts)
    if chunk.size and int(chunk.max()) > np.iinfo(self.dtype).max:
      raise DataError(
        f"{self.tokenizer.name}: token id {int(chunk.max())} does not fit the {self.dtype.name} "
        f"token cache (the tokenizer reports a vocabulary of {self.tokenizer.vocab_size})"
      )
    self.out.write(chunk.astype(self.dtype).tobytes())
    self.progress.tokens = int(self.offsets[-1])
    self.pending, self.pending_bytes = [], 0
    self.progress.tick()


def _tokenize(root, files, kind, tokenizer, out, progress, text_field, max_bytes, strict, label):
  """Writes the tokens of every document to `out`; returns (offsets, [(name, documents)] per file)."""
  encoder = _Encoder(tokenizer, out, progress)
  per_file, total, full = [], 0, False
  for path in files:
    before = encoder.documents
    for text, num_bytes in [] if full else _documents(path, kind, text_field, strict):
      if not text:
        continue
      if max_bytes is not None:
        total += num_bytes
        if total > max_bytes:  # the cap ends the corpus here
          full = True
          break
      encoder.add(text, num_bytes)
    per_file.append((_name(root, path), encoder.documents - before))
    progress.files += 1
    progress.tick()
  encoder.flush()
  if not encoder.documents:
    what = "readable UTF-8 text files" if kind == "text" else f"non-empty {text_field!r} texts"
    raise DataError(f"{label}: no {what} found")
  return np.frombuffer(encoder.offsets, np.uint64), per_file


def _name(root: pathlib.Path, path: pathlib.Path) -> str:
  return path.relative_to(root).as_posix()


def _listing(root: pathlib.Path, files) -> list[dict]:
  entries = []
  for path in files:
    st = path.stat()
    entries.append({"name": _name(root, path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
  return entries


def _writable(directory: pathlib.Path) -> bool:
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=directory, suffix=".probe")
    os.close(fd)
    os.unlink(probe)
    return True
  except OSError:
    return False


def _open(directory: pathlib.Path, manifest_path: pathlib.Path, head: dict, listing: list[dict]):
  """(TokenStore, None) when the manifest matches the sources and its files are whole, else (None, why)."""
  try:
    manifest = json.loads(manifest_path.read_text())
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError):
    return None, f"{manifest_path} is unreadable"
  if any(manifest.get(key) != value for key, value in head.items()):
    return None, f"{manifest_path} was written for other settings"
  old = {f["name"]: (f["size"], f["mtime_ns"]) for f in manifest.get("files", [])}
  new = {f["name"]: (f["size"], f["mtime_ns"]) for f in listing}
  if old != new:
    changed = sorted(set(old.items()) ^ set(new.items()))
    return None, f"{changed[0][0]} changed since the token cache was written"
  try:
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    num_tokens = int(manifest["num_tokens"])
    tokens_path, offsets_path = directory / manifest["tokens"], directory / manifest["offsets"]
    if tokens_path.stat().st_size != num_tokens * dtype.itemsize:
      return None, f"{tokens_path} is incomplete"
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(num_tokens,))
    offsets = np.load(offsets_path, mmap_mode="r")
    files = [(f["name"], int(f["documents"])) for f in manifest["files"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return None, f"{manifest_path}: {e}"
  if offsets.shape != (sum(n for _, n in files) + 1,) or int(offsets[-1]) != num_tokens:
    return None, f"{offsets_path} does not match the manifest"
  return TokenStore(tokens, offsets, files, str(manifest_path)), None


def _build(directory, base, head, listing, root, files, kind, tokenizer, stream, label, **read):
  """Tokenizes into `directory` under temporary names, then renames the files into place."""
  dtype = token_dtype(tokenizer.vocab_size)
  names = {
    "tokens": f"{base}.{'u16' if dtype.itemsize == 2 else 'u32'}",
    "offsets": f"{base}.offsets.npy",
    "manifest": f"{base}.json",
  }
  stream.write(f"tokenizing {label} with the {tokenizer.name} tokenizer (once: the tokens are cached in {directory})\n")
  stream.flush()
  progress = _Progress(stream, label, len(files))
  tmp = {}
  try:
    for key in names:
      fd, tmp[key] = tempfile.mkstemp(dir=directory, prefix=f"{base}.", suffix=".tmp")
      os.close(fd)
    with open(tmp["tokens"], "wb") as out:
      offsets, per_file = _tokenize(root, files, kind, tokenizer, out, progress, **read, label=label)
      out.flush()
      os.fsync(out.fileno())
    with open(tmp["offsets"], "wb") as f:
      np.save(f, offsets)
    manifest = dict(
      head,
      tokenizer=tokenizer.name,
      vocab_size=tokenizer.vocab_size,
      eos_id=tokenizer.eos_id,
      dtype=dtype.name,
      num_tokens=int(offsets[-1]),
      num_documents=len(offsets) - 1,
      tokens=names["tokens"],
      offsets=names["offsets"],
      files=[dict(entry, documents=n) for entry, (_, n) in zip(listing, per_file, strict=True)],
      seconds=round(time.monotonic() - progress.start, 3),
    )
    with open(tmp["manifest"], "w") as f:
      json.dump(manifest, f, indent=1)
    (directory / names["manifest"]).unlink(missing_ok=True)  # no valid-looking manifest while files change
    for key in ("tokens", "offsets", "manifest"):
      os.replace(tmp.pop(key), directory / names[key])
  except OSError as e:
    raise DataError(f"{directory}: cannot write the token cache ({e})") from e
  finally:
    for path in tmp.values():
      pathlib.Path(path).unlink(missing_ok=True)
  store, why = _open(directory, directory / names["manifest"], head, listing)
  if store is None:
    raise DataError(f"{directory}: the token cache just written does not read back ({why})")
  stream.write(
    f"tokenized {label}: {progress.summary()}, {len(offsets) - 1:,} documents in "
    f"{time.monotonic() - progress.start:.1f} s; cache {store.cache}\n"
  )
  stream.flush()
  return store


def _in_memory(root, files, kind, tokenizer, stream, label, **read) -> TokenStore:
  out = io.BytesIO()
  offsets, per_file = _tokenize(
    root, files, kind, tokenizer, out, _Progress(stream, label, len(files)), **read, label=label
  )
  return TokenStore(np.frombuffer(out.getvalue(), token_dtype(tokenizer.vocab_size)), offsets, per_file, None)


def tokenize(
  source: pathlib.Path,
  files: list[pathlib.Path],
  kind: str,
  tokenizer,
  *,
  label: str,
  text_field: str = "text",
  max_bytes: int | None = None,
  strict: bool = False,
  use_cache: bool = True,
  stream=None,
) -> TokenStore:
  """The tokens of `files` (all under the file or folder `source`), from the cache when it is current.

  kind: 'text' (each file one document) or 'records' (.jsonl / .jsonl.gz / .parquet files). `max_bytes`
  ends the corpus before the document that would pass it; `strict` makes an unreadable text file an error
  rather than skipped. A tokenizer without a `fingerprint`, or use_cache=False, tokenizes in memory.
  Progress goes to `stream` (default stderr).
  """
  stream = sys.stderr if stream is None else stream
  root = source if source.is_dir() else source.parent
  read = dict(text_field=text_field, max_bytes=max_bytes, strict=strict)
  fingerprint = getattr(tokenizer, "fingerprint", None)
  if not use_cache or fingerprint is None:
    return _in_memory(root, files, kind, tokenizer, stream, label, **read)
  options = {"text_field": text_field} if kind == "records" else {"max_bytes": max_bytes}
  head = {
    "version": CACHE_VERSION,
    "source": str(source.resolve()),
    "kind": kind,
    "options": options,
    "tokenizer_fingerprint": fingerprint,
  }
  base = f"{source.name}.{hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:16]}"
  listing = _listing(root, files)
  directories = [root / CACHE_DIR_NAME, fallback_cache_dir()]
  for directory in directories:
    store, why = _open(directory, directory / f"{base}.json", head, listing)
    if store is not None:
      stream.write(f"{label}: {len(store.tokens):,} tokens from the token cache {store.cache}\n")
      stream.flush()
      return store
    if why:
      stream.write(f"{label}: {why}; tokenizing again\n")
  for directory in directories:
    if _writable(directory):
      return _build(directory, base, head, listing, root, files, kind, tokenizer, stream, label, **read)
  stream.write(
    f"{label}: cannot write a token cache in {directories[0]} or {directories[1]}; tokenizing in "
    "memory (again on every run)\n"
  )
  return _in_memory(root, files, kind, tokenizer, stream, label, **read)
