"""Packed rows at the ops level: attention and SSD over several documents per row equal each document run
alone, every fast form equals its slow twin with segments, and all-equal ids change nothing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.ops.attention import attention, attention_reference
from mla_jax.ops.ssd import ssd_chunked, ssd_sequential

TOL = dict(atol=1e-5, rtol=1e-5)

# Documents per row, lengths summing to T: boundaries inside and at the ends of chunks of 4 and 5.
LENGTHS = ((5, 1, 8, 6), (20,), (4, 4, 3, 9))
T = 20


def _segment_ids(first_id=0):
  return jnp.asarray([np.repeat(np.arange(len(row)) + first_id, row) for row in LENGTHS], jnp.int32)


def _restarting_positions():
  return jnp.asarray([np.concatenate([np.arange(n) for n in row]) for row in LENGTHS], jnp.int32)


def _documents():
  """(row, start, end) of every document."""
  for b, row in enumerate(LENGTHS):
    starts = np.cumsum((0,) + row)
    for s, e in zip(starts[:-1], starts[1:]):
      yield b, int(s), int(e)


def _alone(*arrays_BT):
  """Every document moved to the start of its own row, zeros after it: [documents, T, ...] each. A causal
  op's outputs on a document's tokens see nothing after them, so one batched call runs each alone."""
  out = []
  for a in map(np.asarray, arrays_BT):
    rows = [np.pad(a[b, s:e], ((0, T - (e - s)),) + ((0, 0),) * (a.ndim - 2)) for b, s, e in _documents()]
    out.append(jnp.asarray(np.stack(rows)))
  return out


def _qkv(B=len(LENGTHS), H=4, K=2, D=8, E=6):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(kq, (B, T, H, D)), jax.random.normal(kk, (B, T, K, D)), jax.random.normal(kv, (B, T, K, E)))


ATTENTION_IMPLS = ["reference", "xla", "chunked", "flash"]


def _positions(rows):
  return jnp.broadcast_to(jnp.arange(T), (rows, T))


@jax.jit
def _reference_alone(q, k, v):
  return attention_reference(q, k, v, _positions(q.shape[0]), 0.3)


@functools.cache
def _attend(impl, segmented=True):
  if segmented:
    return jax.jit(
      lambda q, k, v, pos, seg: attention(q, k, v, pos, scale=0.3, impl=impl, chunk_size=4, segment_ids_BT=seg)
    )
  return jax.jit(lambda q, k, v: attention(q, k, v, _positions(q.shape[0]), scale=0.3, impl=impl, chunk_size=4))


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_packed_attention_equals_each_document_alone_and_one_segment_none(impl):
  """Positions restart per document, as the model passes them; the mask ignores them and goes by slot.
  All ids equal is the unsegmented call."""
  q, k, v = _qkv()
  attend = _attend(impl)
  packed = attend(q, k, v, _restarting_positions(), _segment_ids(first_id=1))
  alone = _reference_alone(*_alone(q, k, v))
  for i, (b, s, e) in enumerate(_documents()):
    np.testing.assert_allclose(packed[b, s:e], alone[i, : e - s], err_msg=f"{impl} row {b} [{s}:{e}]", **TOL)
  one = attend(q, k, v, _positions(len(LENGTHS)), jnp.zeros((len(LENGTHS), T), jnp.int32))
  np.testing.assert_allclose(one, _attend(impl, segmented=False)(q, k, v), **TOL)


@functools.partial(jax.jit, static_argnums=0)
def _attention_grads(impl, q, k, v, seg):
  fn = lambda q, k, v: attention(
    q, k, v, _positions(len(LENGTHS)), scale=0.3, impl=impl, chunk_size=4, segment_ids_BT=seg
  )
  return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("impl", ["xla", "chunked", "flash"])
def test_packed_attention_gradients_equal_reference(impl):
  q, k, v = _qkv()
  seg = _segment_ids()

  for name, a, b in zip("qkv", _attention_grads(impl, q, k, v, seg), _attention_grads("reference", q, k, v, seg)):
    assert np.all(np.isfinite(np.asarray(a))), name
    np.testing.assert_allclose(a, b, err_msg=name, atol=5e-5, rtol=1e-5)


def test_segment_ids_need_the_calls_own_keys():
  q, k, v = _qkv()
  pos = jnp.broadcast_to(jnp.arange(3), (len(LENGTHS), 3))
  with pytest.raises(ValueError, match="own tokens"):
    attention(q[:, :3], k, v, pos, scale=0.3, impl="reference", segment_ids_BT=_segment_ids()[:, :3])
  with pytest.raises(ValueError, match="segment ids"):
    attention(q, k, v, _restarting_positions(), scale=0.3, impl="xla", segment_ids_BT=_segment_ids()[:1])


def _ssd_inputs(seed=0, b=len(LENGTHS), h=4, p=3, g=2, n=5):
  """dt = softplus(N(-2, 1)), A = -exp(U[0, log 16]): the scales of test_ssd."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  dt = jnp.asarray(np.log1p(np.exp(rng.standard_normal((b, T, h)) - 2.0)), jnp.float32)
  A = jnp.asarray(-np.exp(rng.uniform(0.0, np.log(16.0), h)), jnp.float32)
  return normal(b, T, h, p), dt, A, normal(b, T, g, n), normal(b, T, g, n), normal(b, h, p, n)


_chunked = jax.jit(ssd_chunked, static_argnames="chunk_size")
_sequential = jax.jit(ssd_sequential, static_argnames="chunk_size")


@pytest.mark.parametrize("chunk,init,first_id,step", [(4, True, 3, 1), (6, False, 0, 1), (32, True, 9, -2)])
def test_packed_ssd_equals_each_document_alone(chunk, init, first_id, step):
  """Every document starts from a zero state, except a row's first, which continues the initial state;
  the final state is the row's last document's. A new document is any change of id, whatever the ids.
  Alone, a document is followed by dt = 0 (no decay, no input), which keeps its final state."""
  x, dt, A, B, C, s0 = _ssd_inputs()
  docs = list(_documents())
  h0 = jnp.asarray(np.stack([np.asarray(s0[b]) * (init and s == 0) for b, s, _ in docs]))
  y_alone, final_alone = _sequential(*_alone(x, dt), A, *_alone(B, C), chunk_size=0, initial_state_BHPN=h0)
  for fn, size in ((_chunked, chunk), (_sequential, 0)):
    y, final = fn(
      x,
      dt,
      A,
      B,
      C,
      chunk_size=size,
      initial_state_BHPN=s0 if init else None,
      seq_idx_BT=first_id + step * _segment_ids(),
    )
    for i, (b, s, e) in enumerate(docs):
      where = f"{fn.__wrapped__.__name__} row {b} [{s}:{e}]"
      np.testing.assert_allclose(y[b, s:e], y_alone[i, : e - s], err_msg=where, **TOL)
      if e == T:
        np.testing.assert_allclose(final[b], final_alone[i], err_msg=where, **TOL)


def test_packed_ssd_chunked_gradients_equal_sequential():
  """Chunks of 6: a padded tail, boundaries inside chunks, at a chunk's start, and a one-token document
  at a chunk's end."""
  chunk = 6
  x, dt, A, B, C, s0 = _ssd_inputs(1)
  seg = _segment_ids()
  rng = np.random.default_rng(2)
  w_y = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  w_f = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)

  def loss(fn, *args):
    y, final = fn(*args[:5], chunk, args[5], seg)
    return jnp.sum(y * w_y) + jnp.sum(final * w_f)

  args = (x, dt, A, B, C, s0)
  argnums = tuple(range(6))
  grads = jax.jit(jax.grad(lambda *a: loss(ssd_chunked, *a), argnums))(*args)
  grads_ref = jax.jit(jax.grad(lambda *a: loss(ssd_sequential, *a), argnums))(*args)
  for name, gr, gr_ref in zip(["x", "dt", "A", "B", "C", "s0"], grads, grads_ref):
    assert np.all(np.isfinite(np.asarray(gr))), name
    np.testing.assert_allclose(gr, gr_ref, err_msg=name, rtol=1e-4, atol=1e-4)


def test_one_segment_equals_unsegmented_ssd():
  x, dt, A, B, C, s0 = _ssd_inputs(3)
  ones = jnp.ones((len(LENGTHS), T), jnp.int32)
  for fn, size in ((_chunked, 4), (_sequential, 0)):  # the compiled forms of the test above
    plain = fn(x, dt, A, B, C, chunk_size=size, initial_state_BHPN=s0)
    packed = fn(x, dt, A, B, C, chunk_size=size, initial_state_BHPN=s0, seq_idx_BT=ones)
    for a, b in zip(packed, plain):
      np.testing.assert_allclose(a, b, **TOL)


def test_seq_idx_must_be_batch_by_time():
  x, dt, A, B, C, _ = _ssd_inputs()
  with pytest.raises(ValueError, match="seq_idx"):
    _chunked(x, dt, A, B, C, chunk_size=4, seq_idx_BT=_segment_ids()[:, :5])
