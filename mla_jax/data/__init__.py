"""Corpora (text, JSON lines, parquet, token files), the token cache, tokenizers and the resumable batch iterator."""

from mla_jax.data.iterator import BatchIterator, eval_batches
from mla_jax.data.sources import Corpus, load_corpus
from mla_jax.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["BatchIterator", "ByteTokenizer", "Corpus", "eval_batches", "load_corpus", "load_tokenizer"]
