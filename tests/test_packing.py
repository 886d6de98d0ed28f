"""Packed documents (data.packing=documents): the conv reset, every model kind on packed rows equal to each
document run alone, and the packing iterator's rows, splits, padding and resumption."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from mla_jax import cache as cache_lib
from mla_jax.data import BatchIterator, eval_batches
from mla_jax.data.packing import batch_dtypes, corpus_documents, document_offsets, pack
from mla_jax.data.sources import Corpus
from mla_jax.errors import ConfigError, DataError
from mla_jax.model import LanguageModel, init_params
from mla_jax.ops.conv import causal_conv, causal_conv_reference
from mla_jax.train_step import model_cross_entropy

TOL = dict(atol=1e-5, rtol=1e-5)
T = 20
# Documents per row, then padding: boundaries inside Mamba2's chunks of 8 and at a chunk's start, a
# one-token document, and a row with a single document.
LENGTHS = ((5, 1, 10, 2), (8, 9), (17,))


def _layout():
  """segment ids (0 in the padding), restarting positions, and (row, start, end) of every document."""
  seg, pos, docs = np.zeros((len(LENGTHS), T), np.int32), np.zeros((len(LENGTHS), T), np.int32), []
  for b, row in enumerate(LENGTHS):
    at = 0
    for i, n in enumerate(row):
      seg[b, at : at + n], pos[b, at : at + n] = i + 1, np.arange(n)
      docs.append((b, at, at + n))
      at += n
  return seg, pos, docs


def _alone(a, docs):
  """Every document moved to the start of its own row, zeros after it (causal: nothing after it counts)."""
  a = np.asarray(a)
  return np.stack([np.pad(a[b, s:e], ((0, T - (e - s)),) + ((0, 0),) * (a.ndim - 2)) for b, s, e in docs])


# ---------------------------------------------------------------------------------------------- conv


@pytest.mark.parametrize("k", [4, 2])
def test_packed_conv_equals_its_steps_and_each_document_alone(k):
  """With seq_idx no tap reads another document: the whole-sequence conv equals its token-by-token twin
  (outputs and the window, which keeps only the last document's inputs) and each document run alone from
  a zero window, except the row's first, which continues the given window. All-equal ids change nothing."""
  rng = np.random.default_rng(k)
  seg, _, docs = _layout()
  seq_idx = jnp.asarray(seg)
  x, window = (
    jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((len(LENGTHS), T, 5), (len(LENGTHS), k - 1, 5))
  )
  w, bias = jnp.asarray(rng.standard_normal((k, 5)), jnp.float32), jnp.asarray(rng.standard_normal(5), jnp.float32)
  out, new_window = jax.jit(causal_conv)(x, w, bias, window, seq_idx)
  out_ref, window_ref = jax.jit(causal_conv_reference)(x, w, bias, window, seq_idx)
  np.testing.assert_allclose(out, out_ref, **TOL)
  np.testing.assert_array_equal(new_window, window_ref)
  first = jnp.asarray(np.stack([np.asarray(window[b]) * (s == 0) for b, s, _ in docs]))
  alone, _ = jax.jit(causal_conv)(jnp.asarray(_alone(x, docs)), w, bias, first)
  for i, (b, s, e) in enumerate(docs):
    np.testing.assert_allclose(out[b, s:e], alone[i, : e - s], err_msg=f"row {b} [{s}:{e}]", **TOL)
  for b, row in enumerate(LENGTHS):  # every row ends in padding, its last document: the window holds it only
    pad = T - sum(row)
    keep = min(pad, k - 1)
    np.testing.assert_array_equal(new_window[b, : k - 1 - keep], 0.0)
    np.testing.assert_array_equal(new_window[b, k - 1 - keep :], x[b, T - keep :])
  plain = jax.jit(causal_conv)(x, w, bias, window)
  one = jax.jit(causal_conv)(x, w, bias, window, jnp.full(seq_idx.shape, 7))
  for a, b in zip(one, plain):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------- model


KINDS = {
  "gqa": ("gqa", {}),
  "gqa_scan": ("gqa", {"scan_layers": True}),
  "mla_chunked": ("mla", {"attention_impl": "chunked", "attention_chunk_size": 8}),
  "mamba2": ("mamba2", {}),
  "hybrid": ("hybrid", {}),
  "moe": ("moe", {}),
}


@functools.cache
def _apply(kind, overrides):
  cfg = tiny_model_config(kind, **dict(overrides))
  params, _ = init_params(cfg, jax.random.PRNGKey(1))
  model = LanguageModel(cfg)

  @jax.jit
  def log_probs(tokens, positions=None, segment_ids=None):
    logits, _, _ = model.apply({"params": params}, tokens, positions, segment_ids_BT=segment_ids)
    return jax.nn.log_softmax(logits, axis=-1)

  return cfg, log_probs, model, params


@pytest.mark.parametrize("kind,overrides", KINDS.values(), ids=KINDS)
def test_packed_rows_equal_each_document_alone(kind, overrides):
  """Per-token log-probabilities (so every token's loss) of a packed batch equal those of every document
  run alone as its own row (MoE: dropless routing, so other documents cannot take an expert's room)."""
  cfg, log_probs, model, params = _apply(kind, tuple(sorted(overrides.items())))
  seg, pos, docs = _layout()
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (len(LENGTHS), T)).astype(np.int32)
  tokens[seg == 0] = 0
  packed = log_probs(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
  alone = log_probs(jnp.asarray(_alone(tokens, docs)))
  for i, (b, s, e) in enumerate(docs):
    np.testing.assert_allclose(packed[b, s:e], alone[i, : e - s], err_msg=f"{kind} row {b} [{s}:{e}]", **TOL)
  assert not np.allclose(log_probs(jnp.asarray(tokens))[0, 5:], packed[0, 5:], atol=1e-3)  # unpacked differs
  if kind == "gqa" and not overrides:  # one segment with positions 0..T-1 is the plain call
    np.testing.assert_allclose(log_probs(jnp.asarray(tokens), None, jnp.ones_like(seg)), log_probs(tokens), **TOL)
    # The train step's loss reads the batch's positions, segment ids and weights (whole or chunked head).
    targets = np.random.default_rng(1).integers(0, cfg.vocab_size, tokens.shape).astype(np.int32)
    weights = (seg > 0).astype(np.float32)
    batch = {"inputs": tokens, "targets": targets, "positions": pos, "segment_ids": seg, "weights": weights}
    picked = lambda lp, t: np.take_along_axis(np.asarray(lp), t[..., None], -1)[..., 0]
    alone_nll = -sum(picked(alone, _alone(targets, docs))[i, : e - s].sum() for i, (b, s, e) in enumerate(docs))
    for chunk in (0, 16):
      (nll, count, _), _ = model_cross_entropy(model, params, {}, batch, chunk)
      assert count == weights.sum()
      np.testing.assert_allclose(nll, alone_nll, rtol=1e-5)


def test_segment_ids_with_caches_are_refused():
  cfg = tiny_model_config("gqa")
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  caches = cache_lib.init_caches(cfg, 1, 8)
  with pytest.raises(ValueError, match="without caches"):
    LanguageModel(cfg).apply(
      {"params": params}, jnp.zeros((1, 2), jnp.int32), None, caches, segment_ids_BT=jnp.ones((1, 2), jnp.int32)
    )


# ------------------------------------------------------------------------------------------ iterator


def _corpus(lengths):
  """tokens = 0, 1, 2, ... (so a token names its place) and the offsets of documents of `lengths`."""
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return np.arange(offsets[-1], dtype=np.uint32), offsets


def _check_rows(batch, offsets):
  """Every segment is consecutive pairs of one document from position 0; padding is zero at the end.
  Returns the (input token) of every pair seen."""
  assert set(batch) == set(batch_dtypes("documents"))
  for k, dtype in batch_dtypes("documents").items():
    assert batch[k].dtype == dtype and batch[k].shape == batch["inputs"].shape
  seen = []
  for inp, tgt, pos, seg, w in zip(*(batch[k] for k in ("inputs", "targets", "positions", "segment_ids", "weights"))):
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any()  # padding only at the end
    assert not (inp[n:].any() or tgt[n:].any() or pos[n:].any() or w[n:].any())
    np.testing.assert_array_equal(w[:n], 1.0)
    assert np.all(np.diff(seg[:n]) >= 0) and seg[0] == 1 and np.all(np.diff(np.unique(seg[:n])) == 1)
    for s in np.unique(seg[:n]):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      np.testing.assert_array_equal(inp[idx], inp[idx[0]] + np.arange(len(idx)))  # consecutive tokens
      np.testing.assert_array_equal(tgt[idx], inp[idx] + 1)
      doc = np.searchsorted(offsets, inp[idx], side="right") - 1
      assert np.all(doc == doc[0]) and tgt[idx[-1]] < offsets[doc[0] + 1]  # no target leaves the document
    seen.extend(inp[:n].tolist())
  return seen


def test_documents_packing_rows_hold_every_pair_once():
  """The packed rows hold every pair of every document exactly once (documents of one token hold none),
  with hardly any padding; an epoch of batches visits distinct rows."""
  lengths = np.random.default_rng(0).integers(1, 30, 60)
  lengths[[3, 40]] = [45, 70]  # two documents longer than a row of 16 pairs
  tokens, offsets = _corpus(lengths)
  it = BatchIterator(tokens, 4, 16, seed=5, documents=offsets)
  seen = _check_rows(it.packing.rows(tokens, range(it.num_windows)), offsets)
  every_pair = [t for s, e in zip(offsets[:-1], offsets[1:]) for t in range(s, e - 1)]
  assert sorted(seen) == every_pair
  assert it.num_windows <= -(-len(every_pair) // 16) + 1  # best fit in a random order: hardly any padding
  epoch = sum((_check_rows(next(it), offsets) for _ in range(it.steps_per_epoch())), [])
  assert len(set(epoch)) == len(epoch) > 0.8 * len(every_pair)
  assert it.get_state()["packing"] == "documents"


def test_long_document_is_split_into_row_sized_segments():
  """A document of 45 tokens (44 pairs) in rows of 16: pieces of 16, 16 and 12 pairs, each its own segment
  from position 0, one token shared between consecutive pieces."""
  tokens, offsets = _corpus([45, 3])
  packed = pack(offsets, 16)
  rows = packed.rows(tokens, range(packed.num_rows))
  firsts = sorted(
    (int(r[0]), int(t[-1]))
    for r, t, s in zip(rows["inputs"], rows["targets"], rows["segment_ids"])
    if s[0] == 1 and s[-1] == 1
  )
  assert firsts == [(0, 16), (16, 32)]  # two full rows; the last target of one is the next's first input
  tail = next(i for i in range(packed.num_rows) if rows["inputs"][i, 0] in (32, 45))
  segs = rows["segment_ids"][tail]
  assert sorted(rows["inputs"][tail][segs > 0].tolist()) == list(range(32, 44)) + [45, 46]
  assert rows["weights"][tail].sum() == 12 + 2 and rows["positions"][tail].max() == 11
  _check_rows(rows, offsets)


def test_documents_iterator_resumes_exactly_and_splits_over_processes():
  tokens, offsets = _corpus(np.random.default_rng(1).integers(2, 25, 50))
  it = BatchIterator(tokens, 2, 16, seed=3, documents=offsets)
  batches = [next(it) for _ in range(30)]  # past the first epoch
  assert it.steps_per_epoch() < 30
  stopped = BatchIterator(tokens, 2, 16, seed=3, documents=offsets)
  for _ in range(12):
    next(stopped)
  state = json.loads(json.dumps(stopped.get_state()))  # as the checkpoint stores it
  resumed = BatchIterator(tokens, 2, 16, seed=3, documents=offsets)
  resumed.set_state(state)
  for i in range(12, 30):
    b = next(resumed)
    for k in b:
      np.testing.assert_array_equal(b[k], batches[i][k])
  other = BatchIterator(tokens, 2, 16, seed=4, documents=offsets)
  assert not all(np.array_equal(next(other)["inputs"], b["inputs"]) for b in batches[:3])
  halves = [
    BatchIterator(tokens, 2, 16, 3, process_index=i, process_count=2, documents=offsets).batch_at(7) for i in (0, 1)
  ]
  for k in batches[7]:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batches[7][k])


def test_stream_packing_is_unchanged():
  """Rows are windows tokens[w T : w T + T + 1] in the permutation seeded by (seed, epoch), as before."""
  tokens = np.arange(16 * 10 + 1, dtype=np.uint32)
  it = BatchIterator(tokens, 2, 16, seed=3)
  for step in range(8):
    batch = next(it)
    assert set(batch) == set(batch_dtypes("stream")) and batch["inputs"].dtype == np.int32
    for j in range(2):
      epoch, index = divmod(step * 2 + j, 10)
      w = int(np.random.default_rng([3, epoch]).permutation(10)[index])
      np.testing.assert_array_equal(batch["inputs"][j], tokens[w * 16 : w * 16 + 16])
      np.testing.assert_array_equal(batch["targets"][j], tokens[w * 16 + 1 : w * 16 + 17])
  assert it.get_state()["packing"] == "stream"
  assert corpus_documents(None, "stream", 0) == (None, None)


def test_eval_batches_pack_documents_in_order():
  tokens, offsets = _corpus(np.random.default_rng(2).integers(2, 20, 40))
  batches = eval_batches(tokens, 2, 16, 3, documents=offsets)
  again = eval_batches(tokens, 2, 16, 3, documents=offsets)
  assert len(batches) == 3
  for a, b in zip(batches, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    _check_rows(a, offsets)
  assert batches[0]["inputs"][0, 0] == 0  # the first document opens the first row
  with pytest.raises(DataError, match="held-out documents pack into"):
    eval_batches(tokens[:30], 3, 16, 3, documents=np.array([0, 10, 30]))


def test_document_boundaries_of_token_files():
  """A token file records no documents: they end at each end-of-document id, else a ConfigError."""
  tokens = np.array([5, 6, 9, 7, 9, 8, 8], np.uint32)
  np.testing.assert_array_equal(document_offsets(tokens, None, 9, "a.bin"), [0, 3, 5, 7])
  np.testing.assert_array_equal(document_offsets(tokens, np.array([0, 7]), None, "a.bin"), [0, 7])
  with pytest.raises(ConfigError, match="data.packing: .*a.bin records none and the tokenizer has no"):
    document_offsets(tokens, None, None, "a.bin")
  with pytest.raises(ConfigError, match="data.packing: .*holds no end-of-document id"):
    document_offsets(tokens, None, 4, "a.bin")
  corpus = Corpus(tokens, tokens[:2], "a.bin", "a.bin")
  train, val = corpus_documents(corpus, "documents", 9)
  np.testing.assert_array_equal(train, [0, 3, 5, 7])
  np.testing.assert_array_equal(val, [0, 2])  # no end-of-document id: one document
  with pytest.raises(DataError, match="pack into 1 rows"):
    BatchIterator(tokens, 2, 16, 0, "a.bin", documents=train)
