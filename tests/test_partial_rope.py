"""Partial RoPE in GQA attention (model.rope_dim): the rotated slice, the pass-through dims, the whole model with
and without a cache, and the config rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config
from flax import linen as nn

from mla_jax import cache as cache_lib
from mla_jax import config as config_lib
from mla_jax.errors import ConfigError
from mla_jax.hf import to_hf
from mla_jax.layers.attention import GQA
from mla_jax.layers.rope import apply_rope
from mla_jax.model import LanguageModel, init_params

B, T, S = 2, 9, 12  # batch, tokens compared, cache slots
P1 = 4  # prefill [0, P1), then one token a step
THETA = 10000.0
SHAPE = dict(kv_heads=2, head_dim=32)  # 4 query heads of width 32 over 2 key/value heads


def _x(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _positions(seed, shape=(B, T)):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 500)


def _neox_reference(x_BTHD, positions_BT, theta, rope_dim):
  """transformers' partial rotary in numpy: inv_freq over rope_dim, cos/sin of [freqs | freqs], rotate_half."""
  x = np.asarray(x_BTHD, np.float64)
  inv_freq = 1.0 / theta ** (np.arange(0, rope_dim, 2) / rope_dim)
  freqs = np.asarray(positions_BT, np.float64)[..., None] * inv_freq
  emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  rot, rest = x[..., :rope_dim], x[..., rope_dim:]
  half = rope_dim // 2
  rotate_half = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  return np.concatenate([rot * np.cos(emb) + rotate_half * np.sin(emb), rest], axis=-1)


def test_rope_dim_equal_to_the_head_is_the_full_rope():
  x_BTHD, pos_BT = _x((B, T, 3, 32)), _positions(1)
  full = apply_rope(x_BTHD, pos_BT, THETA)
  np.testing.assert_array_equal(apply_rope(x_BTHD, pos_BT, THETA, rope_dim=32), full)
  np.testing.assert_allclose(full, _neox_reference(x_BTHD, pos_BT, THETA, 32), atol=2e-5, rtol=0)


@pytest.mark.parametrize("rope_dim", [8, 16])
def test_positions_only_move_the_rotated_dims(rope_dim):
  x_BTHD = _x((B, T, 3, 32))
  outs = []
  for seed in (1, 2):
    pos_BT = _positions(seed)
    out = apply_rope(x_BTHD, pos_BT, THETA, rope_dim=rope_dim)
    assert out.shape == x_BTHD.shape and out.dtype == x_BTHD.dtype
    np.testing.assert_array_equal(out[..., rope_dim:], x_BTHD[..., rope_dim:])
    np.testing.assert_array_equal(out[..., :rope_dim], apply_rope(x_BTHD[..., :rope_dim], pos_BT, THETA))
    np.testing.assert_allclose(out, _neox_reference(x_BTHD, pos_BT, THETA, rope_dim), atol=2e-5, rtol=0)
    outs.append(out)
  assert float(jnp.abs(outs[0][..., :rope_dim] - outs[1][..., :rope_dim]).max()) > 0.1


def test_apply_rope_refuses_an_odd_or_too_wide_rope_dim():
  for rope_dim in (7, 34):
    with pytest.raises(ValueError, match="rope_dim"):
      apply_rope(_x((1, 2, 1, 32)), jnp.zeros((1, 2), jnp.int32), THETA, rope_dim=rope_dim)


@functools.cache
def _params(cfg):
  return init_params(cfg, jax.random.PRNGKey(0))[0]


def _tokens(cfg):
  return jax.random.randint(jax.random.PRNGKey(3), (B, T), 0, cfg.vocab_size)


def test_whole_model_with_rope_dim_equal_to_the_head_matches_the_default():
  default = tiny_model_config("gqa", **SHAPE)
  full = tiny_model_config("gqa", rope_dim=32, **SHAPE)
  partial = tiny_model_config("gqa", rope_dim=16, **SHAPE)
  assert (default.rope_dim, full.rope_dim, partial.rope_dim) == (32, 32, 16)
  params, tokens_BT = _params(default), _tokens(default)
  default_BTV, full_BTV, partial_BTV = (
    LanguageModel(c).apply({"params": params}, tokens_BT)[0] for c in (default, full, partial)
  )
  np.testing.assert_array_equal(full_BTV, default_BTV)
  assert float(jnp.abs(partial_BTV - default_BTV).max()) > 1e-3  # the key reaches the attention layers


def test_gqa_layer_equals_a_numpy_reference_with_partial_rope():
  """Queries and keys rotate the same first rope_dim dims (transformers' partial rotary), values never."""
  cfg = tiny_model_config("gqa", rope_dim=16, **SHAPE)
  H, K, Dh = cfg.num_heads, cfg.kv_heads, cfg.head_dim
  x_BTD = _x((B, T, cfg.hidden_size), seed=4)
  pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  layer = GQA(cfg)
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(5), x_BTD, pos_BT))["params"]
  y_BTD = layer.apply({"params": params}, x_BTD, pos_BT)[0]

  w = {name: np.asarray(params[name]["kernel"], np.float64) for name in ("w_q", "w_k", "w_v", "w_o")}
  x = np.asarray(x_BTD, np.float64)
  q = _neox_reference(np.einsum("btd,dhk->bthk", x, w["w_q"]), pos_BT, cfg.rope_theta, 16)
  k = _neox_reference(np.einsum("btd,dhk->bthk", x, w["w_k"]), pos_BT, cfg.rope_theta, 16)
  v = np.einsum("btd,dhk->bthk", x, w["w_v"])
  k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # query head h reads kv head h // (H / K)
  s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(Dh)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  o = np.einsum("bhts,bshk->bthk", p / p.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(y_BTD, np.einsum("bthk,hkd->btd", o, w["w_o"]), atol=1e-5, rtol=0)


def test_cached_decode_equals_full_forward_with_partial_rope():
  cfg = tiny_model_config("gqa", rope_dim=16, **SHAPE)
  model = LanguageModel(cfg)

  @jax.jit
  def run(params, tokens_BT):
    v = {"params": params}
    full_BTV = model.apply(v, tokens_BT)[0]
    caches = cache_lib.init_caches(cfg, B, S, jnp.float32)
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    first_BTV, _, caches = model.apply(v, tokens_BT[:, :P1], pos_BT[:, :P1], caches)

    def step(caches, t):
      token_B1 = jax.lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1)
      logits_B1V, _, caches = model.apply(v, token_B1, jnp.full((B, 1), t, jnp.int32), caches)
      return caches, logits_B1V[:, 0]

    caches, steps_TBV = jax.lax.scan(step, caches, jnp.arange(P1, T))
    return full_BTV, jnp.concatenate([first_BTV, steps_TBV.swapaxes(0, 1)], axis=1)

  full_BTV, decoded_BTV = run(_params(cfg), _tokens(cfg))
  assert float(jnp.std(full_BTV)) > 1e-2  # the logits carry signal, so agreement is not vacuous
  np.testing.assert_allclose(decoded_BTV, full_BTV, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
  "kind,overrides,rule",
  [
    ("gqa", dict(SHAPE, rope_dim=7), "must be even"),
    ("gqa", dict(SHAPE, rope_dim=34), "must not exceed head_dim=32"),
    ("gqa", dict(SHAPE, rope_dim=-2), "must be >= 0"),
    ("mla", dict(rope_dim=8), "set model.d_rope"),
    ("gqa", dict(SHAPE, rope_dim=16, use_rope=False), "use_rope is false"),
  ],
)
def test_config_errors_name_rope_dim(kind, overrides, rule):
  with pytest.raises(ConfigError, match=rf"model\.rope_dim: .*{rule}"):
    tiny_config(kind, **overrides)


def test_an_odd_head_width_is_fine_when_the_rotated_part_is_even():
  with pytest.raises(ConfigError, match=r"model\.head_dim: must be even"):
    tiny_config("gqa", kv_heads=2, head_dim=15)
  assert tiny_model_config("gqa", kv_heads=2, head_dim=15, rope_dim=8).rope_dim == 8


def test_hf_export_refuses_a_partial_rope(tmp_path):
  config = tiny_config("gqa", vocab_size=64, rope_dim=8)  # head_dim = hidden_size // num_heads = 16, as granite's
  params = _params(config_lib.ModelConfig.from_config(config))
  with pytest.raises(ConfigError, match=r"model\.rope_dim: granitemoehybrid rotates the whole head"):
    to_hf(config, params, str(tmp_path))
