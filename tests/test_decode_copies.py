"""The batch-1 decode step updates its caches in place: the compiled step copies no cache, transposes none
and writes each cache array once; the one-token fast paths it uses equal their slow twins in float32."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from mla_jax import cache as cache_lib
from mla_jax.decode import Decoder
from mla_jax.model import init_params
from mla_jax.ops import latent_attention as latent_ops
from mla_jax.ops.attention import attention_reference, attention_step
from mla_jax.ops.ssd import ssd_decode_step, ssd_step

PROMPT, SLOTS = 5, 37  # 37 slots: cache arrays have sizes no other array of the tiny models has
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(", re.M)
_VIEWS = {"parameter", "bitcast", "tuple", "get-tuple-element"}  # name a buffer, move no data


def _instructions(text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(opcode, shape) of every array-valued instruction of a compiled program's text."""
  return [(op, tuple(int(d) for d in dims.split(",") if d)) for _, dims, op in _INSTRUCTION.findall(text)]


def _cache_shapes(cfg) -> list[tuple[int, ...]]:
  """The shapes of the batch-1 cache arrays (the Mamba2 conv window left out: see below)."""
  caches = cache_lib.init_caches(cfg, 1, SLOTS, jnp.float32)
  # The conv window (K-1 = 3 inputs) shifts by one input per token: no in-place update exists for a shift,
  # so XLA writes it whole, a copy of 3 x conv_dim values whatever the sequence length.
  return [x.shape for c in caches for name, x in vars(c).items() if isinstance(x, jax.Array) and name != "conv"]


def _compiled_decode(cfg, tokens_per_call: int = 1) -> str:
  """The text of the compiled batch-1 decode (`Decoder.compile`) of `cfg`'s model."""
  variables = {"params": jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))[0])}
  _, step = Decoder(cfg).compile(variables, 1, PROMPT, SLOTS, jax.random.PRNGKey(0), tokens_per_call=tokens_per_call)
  return step.as_text()


def _step_instructions(cfg):
  """(opcode, shape) of every instruction of the compiled decode step's entry computation, and the
  cache shapes."""
  text = _compiled_decode(cfg)
  return _instructions(text[text.index("\nENTRY") :]), _cache_shapes(cfg)


@pytest.mark.parametrize("kind", ["mla", "gqa", "mamba2"])
def test_batch1_decode_step_updates_its_caches_in_place(kind):
  cfg = tiny_model_config(kind)
  instructions, shapes = _step_instructions(cfg)
  assert len(shapes) == sum(1 if cfg.mixer_kind(i) == "mamba2" else 2 for i in range(cfg.num_layers))
  copies = [shape for op, shape in instructions if op == "copy" and shape in shapes]
  assert copies == [], f"the step copies caches: {copies}"
  # Every instruction that produces as many values as a cache array is that array's one write (not a
  # transposed or duplicated cache, nor a second update of it).
  sizes = {int(np.prod(s)) for s in shapes}
  sized = [(op, shape) for op, shape in instructions if op not in _VIEWS and int(np.prod(shape)) in sizes]
  assert sorted(shape for _, shape in sized) == sorted(shapes), sized


@pytest.mark.parametrize("kind", ["mla", "gqa", "mamba2"])
def test_several_tokens_per_call_loop_copies_no_cache(kind):
  """Decoder.steps' on-device loop keeps the caches in place too: no copy of a cache array anywhere in
  the compiled loop (its body included)."""
  cfg = tiny_model_config(kind)
  text = _compiled_decode(cfg, tokens_per_call=8)
  assert " while(" in text
  instructions, shapes = _instructions(text), _cache_shapes(cfg)
  copies = [shape for op, shape in instructions if op == "copy" and shape in shapes]
  assert copies == [], f"the loop copies caches: {copies}"


def _random(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape, jnp.float32)


# positions per row: inside, first and last slot, and outside the cache (the write is dropped)
ROW_POSITIONS = [[0, 7], [12, 12], [3, 12], [-1, 15]]


def _assert_agree(fast, slow, args, shape):
  """fast(*args, positions) == slow(*args, positions) in float32 at every row of ROW_POSITIONS."""
  for positions in ROW_POSITIONS:
    pos_B = jnp.asarray(positions, jnp.int32)
    expected = slow(*args, pos_B)
    got = fast(*args, pos_B)
    assert got.shape == shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.std(expected)) > 1e-2


def _written(cache, new_B, pos_B, axis=1):
  return cache_lib.write(cache, new_B[:, None], pos_B[:, None], axis=axis)


@pytest.mark.parametrize("heads", [3, latent_ops.BLOCK_DIAGONAL_HEADS + 1])
def test_latent_attention_step_equals_latent_attention_over_the_written_cache(heads):
  """Rows at different positions; every cache slot holds garbage, the unwritten ones included. Both
  forms of the weight absorption (block-diagonal for few heads, batched over heads beyond)."""
  B, S, C, D, R, E = 2, 13, 8, 5, 4, 6
  keys = jax.random.split(jax.random.PRNGKey(heads), 8)
  q_nope_BHD, q_rope_BHR = _random(keys[0], (B, heads, D)), _random(keys[1], (B, heads, R))
  c_kv_BSC, k_rope_BSR = _random(keys[2], (B, S, C), 3.0), _random(keys[3], (B, S, R), 3.0)
  c_kv_BC, k_rope_BR = _random(keys[4], (B, C), 3.0), _random(keys[5], (B, R), 3.0)
  w_uk_CHD, w_uv_CHE = _random(keys[6], (C, heads, D)), _random(keys[7], (C, heads, E))
  scale = (D + R) ** -0.5
  args = (q_nope_BHD, q_rope_BHR, c_kv_BSC, k_rope_BSR, c_kv_BC, k_rope_BR, w_uk_CHD, w_uv_CHE)

  @jax.jit
  def slow(q_nope_BHD, q_rope_BHR, c_kv_BSC, k_rope_BSR, c_kv_BC, k_rope_BR, w_uk_CHD, w_uv_CHE, pos_B):
    c_kv, k_rope = _written(c_kv_BSC, c_kv_BC, pos_B), _written(k_rope_BSR, k_rope_BR, pos_B)
    q_nope_B1HD, q_rope_B1HR = q_nope_BHD[:, None], q_rope_BHR[:, None]
    o_B1HE = latent_ops.latent_attention(
      q_nope_B1HD, q_rope_B1HR, c_kv, k_rope, w_uk_CHD, w_uv_CHE, pos_B[:, None], scale=scale
    )
    return o_B1HE[:, 0]

  fast = jax.jit(functools.partial(latent_ops.latent_attention_step, scale=scale))
  _assert_agree(fast, slow, args, (B, heads, E))


@pytest.mark.parametrize("K", [1, 2, 4])
def test_attention_step_equals_the_reference_over_the_written_cache(K):
  B, S, H, D, E = 2, 13, 4, 8, 6
  keys = jax.random.split(jax.random.PRNGKey(K), 5)
  q_BHD = _random(keys[0], (B, H, D))
  k_BKSD, v_BKSE = _random(keys[1], (B, K, S, D), 3.0), _random(keys[2], (B, K, S, E), 3.0)
  k_BKD, v_BKE = _random(keys[3], (B, K, D), 3.0), _random(keys[4], (B, K, E), 3.0)
  args = (q_BHD, k_BKSD, v_BKSE, k_BKD, v_BKE)

  @jax.jit
  def slow(q_BHD, k_BKSD, v_BKSE, k_BKD, v_BKE, pos_B):
    k_BSKD = _written(k_BKSD, k_BKD, pos_B, axis=2).swapaxes(1, 2)
    v_BSKE = _written(v_BKSE, v_BKE, pos_B, axis=2).swapaxes(1, 2)
    return attention_reference(q_BHD[:, None], k_BSKD, v_BSKE, pos_B[:, None], 0.3)[:, 0]

  fast = jax.jit(functools.partial(attention_step, scale=0.3))
  _assert_agree(fast, slow, args, (B, H, E))


def test_ssd_decode_step_equals_ssd_step():
  B, H, P, G, N = 2, 4, 3, 2, 5
  keys = jax.random.split(jax.random.PRNGKey(7), 6)
  x_BHP, state_BHPN = _random(keys[0], (B, H, P)), _random(keys[1], (B, H, P, N))
  dt_BH = jax.nn.softplus(_random(keys[2], (B, H)))
  A_H = -jnp.exp(_random(keys[3], (H,)))
  B_BGN, C_BGN = _random(keys[4], (B, G, N)), _random(keys[5], (B, G, N))
  for slow, fast in zip(
    jax.jit(ssd_step)(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN),
    jax.jit(ssd_decode_step)(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN),
    strict=True,
  ):
    assert fast.shape == slow.shape and fast.dtype == slow.dtype
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,tokens", [(1, 1), (2, 1), (2, 3)])
def test_write_along_the_head_major_slot_axis_and_after_a_value(rows, tokens):
  """KVCache's [B, K, S, D] writes equal [B, S, K, D] writes transposed; `after` (even NaN) changes no
  value, and out-of-range positions are still dropped."""
  B, S, K, D = rows, 6, 2, 3
  cache_BSKD = jnp.arange(B * S * K * D, dtype=jnp.float32).reshape(B, S, K, D)
  new_BTKD = -1.0 - jnp.arange(B * tokens * K * D, dtype=jnp.float32).reshape(B, tokens, K, D)
  write = jax.jit(cache_lib.write, static_argnames="axis")
  for start in (0, 2, S - tokens, S - 1, -1):
    pos_BT = (start + jnp.arange(tokens, dtype=jnp.int32) + jnp.arange(B, dtype=jnp.int32)[:, None]) % (S + 2) - 1
    expected_BSKD = write(cache_BSKD, new_BTKD, pos_BT)
    got_BKSD = write(cache_BSKD.swapaxes(1, 2), new_BTKD, pos_BT, axis=2)
    np.testing.assert_array_equal(got_BKSD.swapaxes(1, 2), expected_BSKD)
    for after in (jnp.ones((B, 3)), jnp.full((B, 2, 2), jnp.nan), jnp.full((B,), -jnp.inf)):
      np.testing.assert_array_equal(write(cache_BSKD, new_BTKD, pos_BT, after=after), expected_BSKD)
      np.testing.assert_array_equal(write(cache_BSKD.swapaxes(1, 2), new_BTKD, pos_BT, axis=2, after=after), got_BKSD)
