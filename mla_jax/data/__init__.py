"""Corpora, tokenizers, token files and the resumable batch iterator."""

from mla_jax.data.iterator import BatchIterator, eval_batches
from mla_jax.data.sources import Corpus, load_corpus
from mla_jax.data.tokenizer import ByteTokenizer, load_tokenizer
