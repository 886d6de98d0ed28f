"""SSD ops: chunked == sequential == float64 recurrence in values and gradients, state carry, decode step."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from mla_jax.ops.ssd import segsum, ssd_chunked, ssd_sequential, ssd_step

TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)

_chunked = jax.jit(ssd_chunked, static_argnames="chunk_size")
_sequential = jax.jit(ssd_sequential, static_argnames="chunk_size")


def _inputs(seed: int, b: int, t: int, h: int, p: int, g: int, n: int):
  """Random SSD inputs with realistic scales: dt = softplus(N(-2, 1)), A = -exp(U[0, log 16])."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  x_BTHP = normal(b, t, h, p)
  dt_BTH = jnp.asarray(np.log1p(np.exp(rng.standard_normal((b, t, h)) - 2.0)), jnp.float32)
  A_H = jnp.asarray(-np.exp(rng.uniform(0.0, np.log(16.0), h)), jnp.float32)
  return x_BTHP, dt_BTH, A_H, normal(b, t, g, n), normal(b, t, g, n), normal(b, h, p, n)


def _numpy_recurrence(x, dt, A, B, C, s0=None):
  """float64 loop over time, batch and heads: H = exp(dt A) H + dt x B^T, y = H C."""
  x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
  b, t, h, p = x.shape
  g, n = B.shape[-2:]
  state = np.zeros((b, h, p, n)) if s0 is None else np.array(s0, np.float64)
  y = np.zeros((b, t, h, p))
  for i in range(t):
    for bi in range(b):
      for hi in range(h):
        gi = hi // (h // g)
        state[bi, hi] = np.exp(dt[bi, i, hi] * A[hi]) * state[bi, hi] + dt[bi, i, hi] * np.outer(
          x[bi, i, hi], B[bi, i, gi]
        )
        y[bi, i, hi] = state[bi, hi] @ C[bi, i, gi]
  return y, state


def test_segsum_matches_direct_sums():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 7)), jnp.float32)
  out = np.asarray(segsum(x))
  chex.assert_shape(out, (2, 3, 7, 7))
  xn = np.asarray(x, np.float64)
  for i in range(7):
    for j in range(7):
      if j > i:
        assert np.all(np.isneginf(out[..., i, j]))
      else:
        np.testing.assert_allclose(out[..., i, j], xn[..., j + 1 : i + 1].sum(-1), **TOL)
  np.testing.assert_array_equal(np.diagonal(out, axis1=-2, axis2=-1), 0.0)


def test_segsum_gradient_is_finite():
  x = jnp.asarray(-np.random.default_rng(1).uniform(size=(3, 9)), jnp.float32)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(jnp.exp(segsum(v)) ** 2)))(x)
  assert np.all(np.isfinite(np.asarray(grad)))

  def unstable(v):  # exp of differences of prefix sums: the same values where i >= j
    cs = jnp.cumsum(v, axis=-1)
    return jnp.sum(jnp.exp(cs[:, :, None] - cs[:, None, :]) ** 2 * jnp.tril(jnp.ones((9, 9))))

  expected = jax.jit(jax.grad(unstable))(x)
  np.testing.assert_allclose(grad, expected, **GRAD_TOL)


def test_sequential_matches_float64_recurrence():
  t = 6
  x, dt, A, B, C, s0 = _inputs(2, 2, t, 4, 3, 2, 5)
  y, final = _sequential(x, dt, A, B, C, 0, s0)
  y_ref, final_ref = _numpy_recurrence(x, dt, A, B, C, s0)
  chex.assert_shape(y, (2, t, 4, 3))
  chex.assert_shape(final, (2, 4, 3, 5))
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(final, final_ref, **TOL)


def test_step_repeated_matches_float64_recurrence_and_chunked():
  x, dt, A, B, C, s0 = _inputs(3, 2, 9, 4, 3, 2, 5)
  step = jax.jit(ssd_step)
  state, ys = s0, []
  for i in range(9):
    y_BHP, state = step(x[:, i], dt[:, i], A, B[:, i], C[:, i], state)
    chex.assert_shape(y_BHP, (2, 4, 3))
    ys.append(y_BHP)
  y_ref, final_ref = _numpy_recurrence(x, dt, A, B, C, s0)
  np.testing.assert_allclose(jnp.stack(ys, 1), y_ref, **TOL)
  np.testing.assert_allclose(state, final_ref, **TOL)
  y_chunk, final_chunk = _chunked(x, dt, A, B, C, 4, s0)
  np.testing.assert_allclose(jnp.stack(ys, 1), y_chunk, **TOL)
  np.testing.assert_allclose(state, final_chunk, **TOL)


class ChunkedTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(dict(chunk=4, g=2, t=13, init=True))
  def test_variants_match_sequential(self, chunk, g, t, init):
    x, dt, A, B, C, s0 = _inputs(3, 2, t, 4, 3, g, 5)
    s0 = s0 if init else None
    fn = self.variant(functools.partial(ssd_chunked, chunk_size=chunk))
    y, final = fn(x, dt, A, B, C, initial_state_BHPN=s0)
    y_ref, final_ref = _sequential(x, dt, A, B, C, 0, s0)
    chex.assert_shape(y, (2, t, 4, 3))
    chex.assert_shape(final, (2, 4, 3, 5))
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(final, final_ref, **TOL)

  @parameterized.parameters(
    dict(chunk=4, g=1, t=16, init=False),
    dict(chunk=4, g=2, t=13, init=True),
    dict(chunk=8, g=2, t=21, init=False),
    dict(chunk=5, g=2, t=1, init=True),
  )
  def test_values_match_sequential(self, chunk, g, t, init):
    x, dt, A, B, C, s0 = _inputs(4, 2, t, 4, 3, g, 5)
    s0 = s0 if init else None
    y, final = _chunked(x, dt, A, B, C, chunk, s0)
    y_ref, final_ref = _sequential(x, dt, A, B, C, 0, s0)
    chex.assert_shape(y, (2, t, 4, 3))
    chex.assert_shape(final, (2, 4, 3, 5))
    chex.assert_type(final, jnp.float32)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(final, final_ref, **TOL)

  @parameterized.parameters(
    dict(chunk=4, g=1, t=11, init=True),
    dict(chunk=3, g=2, t=12, init=True),
    dict(chunk=8, g=2, t=19, init=False),
  )
  def test_gradients_match_sequential(self, chunk, g, t, init):
    x, dt, A, B, C, s0 = _inputs(5, 2, t, 4, 3, g, 5)
    rng = np.random.default_rng(6)
    w_y = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    w_f = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)
    args = (x, dt, A, B, C, s0) if init else (x, dt, A, B, C)  # without: the zero-state path

    def loss(fn, *args):
      y, final = fn(*args[:5], chunk, *args[5:])
      return jnp.sum(y * w_y) + jnp.sum(final * w_f)

    argnums = tuple(range(len(args)))
    grads = jax.jit(jax.grad(functools.partial(loss, ssd_chunked), argnums))(*args)
    grads_ref = jax.jit(jax.grad(functools.partial(loss, ssd_sequential), argnums))(*args)
    for name, gr, gr_ref in zip(["x", "dt", "A", "B", "C", "s0"], grads, grads_ref):
      assert np.all(np.isfinite(np.asarray(gr))), name
      assert np.abs(np.asarray(gr_ref)).max() > 0, name
      np.testing.assert_allclose(gr, gr_ref, err_msg=name, **GRAD_TOL)

  def test_groups_map_head_h_to_group_h_div_heads_per_group(self):
    x, dt, A, B, C, s0 = _inputs(7, 1, 10, 6, 2, 2, 3)
    y, final = _chunked(x, dt, A, B, C, 4, s0)
    # G = H with each group repeated for its H/G heads: head h must read group h // 3.
    y_rep, final_rep = _chunked(x, dt, A, jnp.repeat(B, 3, axis=2), jnp.repeat(C, 3, axis=2), 4, s0)
    np.testing.assert_allclose(y, y_rep, **TOL)
    np.testing.assert_allclose(final, final_rep, **TOL)
    y_ref, _ = _numpy_recurrence(x, dt, A, B, C, s0)
    np.testing.assert_allclose(y, y_ref, **TOL)

  def test_chunk_size_does_not_change_result(self):
    x, dt, A, B, C, s0 = _inputs(8, 1, 24, 2, 3, 1, 4)
    y_ref, final_ref = _chunked(x, dt, A, B, C, 24, s0)
    for chunk in (1, 5, 64):
      y, final = _chunked(x, dt, A, B, C, chunk, s0)
      np.testing.assert_allclose(y, y_ref, err_msg=str(chunk), **TOL)
      np.testing.assert_allclose(final, final_ref, err_msg=str(chunk), **TOL)

  @parameterized.parameters(dict(split=8), dict(split=11))
  def test_split_and_carry_state_equals_one_pass(self, split):
    x, dt, A, B, C, s0 = _inputs(9, 2, 27, 4, 3, 2, 5)
    y, final = _chunked(x, dt, A, B, C, 8, s0)
    first = _chunked(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], 8, s0)
    second = _chunked(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], 8, first[1])
    np.testing.assert_allclose(jnp.concatenate([first[0], second[0]], axis=1), y, **TOL)
    np.testing.assert_allclose(second[1], final, **TOL)

  def test_length_4096_matches_sequential(self):
    x, dt, A, B, C, s0 = _inputs(10, 1, 4096, 2, 4, 1, 4)
    y, final = _chunked(x, dt, A, B, C, 64, s0)
    y_ref, final_ref = _sequential(x, dt, A, B, C, 0, s0)
    chex.assert_shape(y, (1, 4096, 2, 4))
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final, final_ref, rtol=1e-4, atol=1e-4)

  def test_bfloat16_inputs_give_bfloat16_output_and_float32_state(self):
    x, dt, A, B, C, _ = _inputs(11, 1, 10, 2, 3, 1, 4)
    y, final = _chunked(x.astype(jnp.bfloat16), dt, A, B.astype(jnp.bfloat16), C.astype(jnp.bfloat16), 4)
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_type(final, jnp.float32)
    y32, _ = _chunked(x, dt, A, B, C, 4)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.05, atol=0.05)

  def test_bad_arguments_raise(self):
    x, dt, A, B, C, _ = _inputs(12, 1, 6, 3, 2, 1, 4)
    with self.assertRaisesRegex(ValueError, "not divisible"):
      _chunked(x, dt, A, jnp.concatenate([B, B], 2), jnp.concatenate([C, C], 2), 4)
    with self.assertRaisesRegex(ValueError, "dt"):
      _chunked(x, dt[:, :5], A, B, C, 4)
    with self.assertRaisesRegex(ValueError, "chunk_size"):
      _chunked(x, dt, A, B, C, 0)
