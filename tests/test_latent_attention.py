"""Absorbed MLA attention over the latent cache (ops.latent_attention) equals its expanded twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.ops.latent_attention import latent_attention, latent_attention_reference

B, S, H, C, D, R, E = 2, 9, 3, 8, 5, 4, 6  # batch, slots, heads, latent, head_dim, d_rope, value width


def _inputs(T: int, seed: int):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  shapes = [(B, T, H, D), (B, T, H, R), (B, S, C), (B, S, R), (C, H, D), (C, H, E)]
  return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]


@pytest.mark.parametrize("positions", [[[0], [S - 1]], [[2, 3, 4], [5, 6, 8]]])
def test_absorbed_equals_expanded(positions):
  """Rows at different positions, one token or several per call; slots past a query's position hold
  garbage that the mask must hide."""
  pos_BT = jnp.asarray(positions, jnp.int32)
  args = _inputs(pos_BT.shape[1], seed=pos_BT.shape[1])
  scale = (D + R) ** -0.5
  out = jax.jit(lambda *a: latent_attention(*a, pos_BT, scale=scale))(*args)
  ref = latent_attention_reference(*args, pos_BT, scale=scale)
  assert out.shape == (B, pos_BT.shape[1], H, E)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.std(ref)) > 1e-2
  # The garbage slots matter without the mask: attending to them changes the result.
  everything = latent_attention_reference(*args, jnp.full_like(pos_BT, S - 1), scale=scale)
  assert float(jnp.abs(everything - ref).max()) > 1e-3
