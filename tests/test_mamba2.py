"""Mamba2Mixer: shapes, a from-scratch reference, prefill + decode == full pass, causality, init, FLOPs;
the causal conv and gated RMSNorm ops against their slow twins."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

from mla_jax.cache import Mamba2Cache
from mla_jax.config import ModelConfig, default_config, validate
from mla_jax.layers.mamba2 import Mamba2Mixer, mamba2_flops_per_token
from mla_jax.ops.conv import causal_conv, causal_conv_reference
from mla_jax.ops.norm import gated_rms_norm, gated_rms_norm_reference
from mla_jax.ops.ssd import ssd_sequential

TOL = dict(rtol=1e-4, atol=1e-4)


def _config(**model) -> ModelConfig:
  c = default_config()
  m = c.model
  m.hidden_size = 32
  m.num_layers = 2
  m.num_heads = 2
  m.mamba_layers = (0, 1)
  m.mamba2_num_heads = 4
  m.mamba2_state_size = 8
  m.mamba2_chunk_size = 4
  for key, value in model.items():
    m[key] = value
  validate(c)
  return ModelConfig.from_config(c, vocab_size=64)


def _x(seed: int, b: int, t: int, d: int = 32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, d)), jnp.float32)


@functools.cache
def _params(cfg: ModelConfig, seed: int = 0):
  """Parameters depend only on the shapes in cfg; each is made once per module."""
  return jax.jit(Mamba2Mixer(cfg).init)(jax.random.PRNGKey(seed), _x(0, 1, 1, cfg.hidden_size))


@functools.cache
def _apply(cfg: ModelConfig):
  """One jitted apply per config, so the compiled shapes are shared between tests."""
  return jax.jit(Mamba2Mixer(cfg).apply)


def _reference(params, cfg: ModelConfig, x_BTD: jax.Array) -> jax.Array:
  """The layer written out directly: lax conv, sequential SSD, explicit grouped gated norm."""
  p = nn.meta.unbox(params)["params"]
  h, hp, n, g, k = (
    cfg.mamba2_num_heads,
    cfg.mamba2_head_dim,
    cfg.mamba2_state_size,
    cfg.mamba2_n_groups,
    cfg.mamba2_conv_kernel,
  )
  inner, (b, t, _) = h * hp, x_BTD.shape
  zxbcdt = x_BTD @ p["in_proj"]["kernel"]
  z, xbc, dt = jnp.split(zxbcdt, [inner, 2 * inner + 2 * g * n], axis=-1)
  conv_dim = xbc.shape[-1]
  # PyTorch Conv1d(groups=E, padding=K-1) is a cross-correlation; lax.conv_general_dilated is one too.
  xbc = jax.lax.conv_general_dilated(
    xbc,
    p["conv_kernel"][:, None, :],
    (1,),
    [(k - 1, 0)],
    dimension_numbers=("NWC", "WIO", "NWC"),
    feature_group_count=conv_dim,
  )
  xbc = jax.nn.silu(xbc + p["conv_bias"])
  xs, B, C = jnp.split(xbc, [inner, inner + g * n], axis=-1)
  xs = xs.reshape(b, t, h, hp)
  dt = jax.nn.softplus(dt + p["dt_bias"])
  y, _ = ssd_sequential(xs, dt, -jnp.exp(p["A_log"]), B.reshape(b, t, g, n), C.reshape(b, t, g, n))
  y = (y + p["D"][:, None] * xs).reshape(b, t, inner) * jax.nn.silu(z)
  y = y.reshape(b, t, g, inner // g)
  y = y / jnp.sqrt(jnp.mean(y * y, axis=-1, keepdims=True) + cfg.rms_norm_eps)
  return (y.reshape(b, t, inner) * p["norm_scale"]) @ p["out_proj"]["kernel"]


B, T = 2, 11  # one batch and length for most tests, so their compiled shapes are shared
T0 = 6


@functools.cache
def _gradients_of_one_output(cfg: ModelConfig):
  """Gradients of a random projection of y[:, T0] w.r.t. the parameters and the input x."""
  x = _x(4, B, T)
  w = jnp.asarray(np.random.default_rng(5).standard_normal((B, 32)), jnp.float32)
  loss = lambda prm, v: jnp.sum(Mamba2Mixer(cfg).apply(prm, v)[0][:, T0] * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(_params(cfg), x)


class Mamba2Test(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_full_forward_shapes(self):
    cfg = _config(mamba2_n_groups=2)
    y, cache = self.variant(Mamba2Mixer(cfg).apply)(_params(cfg), _x(0, B, T), jnp.zeros((B, T), jnp.int32))
    chex.assert_shape(y, (B, T, 32))
    chex.assert_tree_all_finite(y)
    self.assertIsNone(cache)

  def test_decode_step_shapes(self):
    cfg = _config()
    cache = Mamba2Cache.zeros(cfg, B, jnp.float32)
    y, new_cache = _apply(cfg)(_params(cfg), _x(0, B, 1), cache=cache)
    chex.assert_shape(y, (B, 1, 32))
    chex.assert_trees_all_equal_shapes_and_dtypes(new_cache, cache)
    chex.assert_shape(new_cache.conv, (B, 3, 64 + 2 * 8))
    chex.assert_shape(new_cache.ssm, (B, 4, 16, 8))
    chex.assert_tree_all_finite((y, new_cache))

  def test_parameter_shapes_and_logical_axes(self):
    cfg = _config(mamba2_n_groups=2)
    params = _params(cfg)["params"]
    # in_proj: z (64) | xBC (64 + 2*2*8) | dt (4); conv over xBC (96 channels).
    expected = {
      "in_proj": ((32, 164), ("embed", "ssm_inner")),
      "out_proj": ((64, 32), ("ssm_inner", "embed")),
      "conv_kernel": ((4, 96), ("conv", "ssm_inner")),
      "conv_bias": ((96,), ("ssm_inner",)),
      "A_log": ((4,), ("ssm_heads",)),
      "D": ((4,), ("ssm_heads",)),
      "dt_bias": ((4,), ("ssm_heads",)),
      "norm_scale": ((64,), ("norm",)),
    }
    self.assertEqual(set(params), set(expected))
    for name, (shape, axes) in expected.items():
      box = params[name]["kernel"] if name.endswith("_proj") else params[name]
      self.assertEqual(box.value.shape, shape, name)
      self.assertEqual(tuple(box.names), axes, name)
      self.assertEqual(box.value.dtype, jnp.float32, name)

  @parameterized.parameters(dict(g=1), dict(g=2))
  def test_matches_direct_reference(self, g):
    cfg = _config(mamba2_n_groups=g)
    x = _x(1, B, T)
    y, _ = _apply(cfg)(_params(cfg), x)
    y_ref = jax.jit(functools.partial(_reference, cfg=cfg))(_params(cfg), x_BTD=x)
    np.testing.assert_allclose(y, y_ref, **TOL)

  def test_sequential_impl_matches_chunked(self):
    cfg = _config(mamba2_n_groups=2)
    x = _x(1, B, T)
    y_seq, _ = jax.jit(Mamba2Mixer(cfg, ssd_impl="sequential").apply)(_params(cfg), x)
    np.testing.assert_allclose(y_seq, _apply(cfg)(_params(cfg), x)[0], **TOL)
    with self.assertRaisesRegex(ValueError, "ssd_impl"):
      Mamba2Mixer(cfg, ssd_impl="fast").apply(_params(cfg), x)

  @parameterized.parameters(dict(g=1, prefill=5), dict(g=2, prefill=1))
  def test_prefill_then_decode_equals_full_forward(self, g, prefill):
    cfg = _config(mamba2_n_groups=g)
    x, params, apply = _x(2, B, T), _params(cfg), _apply(cfg)
    y_full, _ = apply(params, x)
    y, cache = apply(params, x[:, :prefill], cache=Mamba2Cache.zeros(cfg, B, jnp.float32))
    ys = [y]
    for i in range(prefill, T):
      y, cache = apply(params, x[:, i : i + 1], cache=cache)
      ys.append(y)
    chex.assert_type(cache.ssm, jnp.float32)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_full, **TOL)

  def test_two_prefills_equal_one(self):
    cfg = _config()
    x, params, apply = _x(3, B, T), _params(cfg), _apply(cfg)
    y_full, cache_full = apply(params, x, cache=Mamba2Cache.zeros(cfg, B))
    y1, cache = apply(params, x[:, :5], cache=Mamba2Cache.zeros(cfg, B))
    y2, cache = apply(params, x[:, 5:], cache=cache)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y_full, **TOL)
    np.testing.assert_allclose(cache.ssm, cache_full.ssm, **TOL)
    np.testing.assert_allclose(cache.conv, cache_full.conv, **TOL)
    # The conv state holds the last K-1 conv inputs: the xBC slice (64 + 2*1*8 wide) of in_proj's output.
    kernel = nn.meta.unbox(params)["params"]["in_proj"]["kernel"]
    np.testing.assert_allclose(cache.conv, x[:, -3:] @ kernel[:, 64:144], **TOL)

  def test_causal_through_gradients(self):
    _, grad_x = _gradients_of_one_output(_config(mamba2_n_groups=2))
    per_step = np.abs(np.asarray(grad_x)).sum(axis=(0, 2))
    np.testing.assert_array_equal(per_step[T0 + 1 :], 0.0)
    self.assertTrue(np.all(per_step[: T0 + 1] > 0), per_step)

  def test_all_parameters_get_nonzero_gradients(self):
    grads, _ = _gradients_of_one_output(_config(mamba2_n_groups=2))
    grads = nn.meta.unbox(grads)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
      name = jax.tree_util.keystr(path)
      self.assertTrue(np.all(np.isfinite(leaf)), name)
      self.assertGreater(float(jnp.abs(leaf).max()), 0.0, name)
    for name in ("A_log", "D", "dt_bias"):  # every head, not just some
      self.assertTrue(np.all(np.asarray(grads["params"][name]) != 0), name)

  def test_init_distributions(self):
    cfg = _config()
    p = nn.meta.unbox(_params(cfg))["params"]
    dt = np.asarray(jax.nn.softplus(p["dt_bias"]))
    self.assertTrue(np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))), dt)
    # 128 heads of width 1 for many samples; the floor 1e-2 lies inside [dt_min, dt_max] = [1e-3, 0.1].
    cfg = _config(
      hidden_size=64, mamba2_num_heads=128, mamba2_dt_min=1e-3, mamba2_dt_max=0.1, mamba2_dt_init_floor=1e-2
    )
    p = nn.meta.unbox(_params(cfg, seed=7))["params"]
    dt = np.asarray(jax.nn.softplus(p["dt_bias"]))
    self.assertTrue(np.all((dt >= 1e-2 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))), dt)
    floored = np.abs(dt - 1e-2) < 1e-7
    self.assertTrue(0.25 < np.mean(floored) < 0.75, dt)  # log-uniform: half the mass lies below 1e-2
    a = np.exp(np.asarray(p["A_log"]))
    self.assertTrue(np.all((a >= 1.0) & (a <= 16.0)), a)
    self.assertGreater(a.max() - a.min(), 10.0)
    np.testing.assert_array_equal(p["D"], 1.0)
    np.testing.assert_array_equal(p["norm_scale"], 1.0)

  def test_bfloat16_compute(self):
    cfg, cfg32 = _config(dtype="bfloat16"), _config()
    x, params = _x(6, B, T), _params(cfg32)
    y, _ = _apply(cfg)(params, x)
    chex.assert_type(y, jnp.bfloat16)
    y_step, cache = _apply(cfg)(params, x[:, :1], cache=Mamba2Cache.zeros(cfg, B, jnp.bfloat16))
    chex.assert_type(cache.ssm, jnp.float32)
    chex.assert_type(cache.conv, jnp.bfloat16)
    y32, _ = _apply(cfg32)(params, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.1, atol=0.05)
    np.testing.assert_allclose(np.asarray(y_step, np.float32), y32[:, :1], rtol=0.1, atol=0.05)

  def test_flops_per_token(self):
    cfg = _config(mamba2_n_groups=2, mamba2_chunk_size=8)  # H=4, P=16, N=8, G=2
    per_token = 2 * 8 * (2 * 8 + 4 * 16) + 4 * 4 * 16 * 8
    self.assertEqual(mamba2_flops_per_token(cfg, 16), per_token)
    self.assertAlmostEqual(mamba2_flops_per_token(cfg, 12), per_token * 16 / 12)  # padded to 16
    self.assertEqual(mamba2_flops_per_token(cfg, 4), 2 * 4 * (2 * 8 + 4 * 16) + 4 * 4 * 16 * 8)  # Q = T


@pytest.mark.parametrize("k,t", [(4, 7), (2, 1), (1, 3)])
def test_causal_conv_equals_its_steps(k, t):
  """The whole-sequence conv equals the token-by-token steps from a random window (outputs and the new
  window), and from a zero window it is PyTorch's Conv1d(groups=E, padding=K-1) cropped to T."""
  rng = np.random.default_rng(k * 10 + t)
  x_BTE, window_BWE = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, t, 5), (2, k - 1, 5)))
  w_KE, b_E = jnp.asarray(rng.standard_normal((k, 5)), jnp.float32), jnp.asarray(rng.standard_normal(5), jnp.float32)
  out, window = jax.jit(causal_conv)(x_BTE, w_KE, b_E, window_BWE)
  out_ref, window_ref = jax.jit(causal_conv_reference)(x_BTE, w_KE, b_E, window_BWE)
  np.testing.assert_allclose(out, out_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(window, window_ref)
  np.testing.assert_array_equal(window, jnp.concatenate([window_BWE, x_BTE], axis=1)[:, t:])
  out0, _ = causal_conv(x_BTE, w_KE, b_E, jnp.zeros_like(window_BWE))
  lax_BTE = jax.lax.conv_general_dilated(
    x_BTE, w_KE[:, None, :], (1,), [(k - 1, 0)], dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=5
  )
  np.testing.assert_allclose(out0, lax_BTE + b_E, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_gated_rms_norm_equals_the_formula(groups):
  rng = np.random.default_rng(groups)
  y, z = (jnp.asarray(3.0 * rng.standard_normal((2, 3, 16)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(16), jnp.float32)
  out = gated_rms_norm(y, z, w, groups, 1e-5)
  np.testing.assert_allclose(out, gated_rms_norm_reference(y, z, w, groups, 1e-5), rtol=1e-5, atol=1e-6)
  # Each group has unit RMS before the scale w.
  rms = np.sqrt(np.mean(np.square(np.asarray(out / w).reshape(2, 3, groups, -1)), axis=-1))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-3)
