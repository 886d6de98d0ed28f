"""Tokenizers: bytes by default (256 byte values + an end-of-document id), or a Hugging Face tokenizer.json.

Each has a `fingerprint` (a string that changes whenever its output could): token caches are keyed by it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from mla_jax.errors import DataError


class ByteTokenizer:
  """UTF-8 bytes are the tokens 0..255; 256 separates documents."""

  name = "byte"
  fingerprint = "byte"
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(text) for text in texts]

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json file."""

  def __init__(self, path: str):
    try:
      import tokenizers  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
      raise DataError(
        f"{path}: loading a tokenizer.json needs the 'tokenizers' package (pip install 'mla_jax[hf]')"
      ) from e
    if not os.path.isfile(path):
      raise DataError(f"{path}: tokenizer file not found")
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception on malformed files
      raise DataError(f"{path}: not a valid tokenizer.json ({e})") from e
    self.name = path
    with open(path, "rb") as f:
      self.fingerprint = f"sha256:{hashlib.sha256(f.read()).hexdigest()} tokenizers-{tokenizers.__version__}"
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id: int | None = None
    for candidate in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"):
      token_id = self._tok.token_to_id(candidate)
      if token_id is not None:
        self.eos_id = token_id
        break

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, dtype=np.uint32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """The same ids as `encode` of each text, computed in parallel by the library."""
    return [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(texts)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str):
  """'byte' or a path to a tokenizer.json."""
  if spec == "byte":
    return ByteTokenizer()
  return HFTokenizer(spec)


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
  """The model's vocabulary: the tokenizer's rounded up so that matmuls and shardings divide evenly."""
  return -(-vocab_size // multiple) * multiple
