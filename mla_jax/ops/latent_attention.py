"""MLA attention over the latent cache with W_UK and W_UV absorbed (DeepSeek-V2 section 2.1.2), and its
expanded reference twin.

Shapes: q_nope_BTHD and RoPE'd q_rope_BTHR per query head; the cache c_kv_BSC (latent, C wide) and
k_rope_BSR (one RoPE key shared by all heads); w_uk_CHD and w_uv_CHE, the up-projections of the latent to
per-head keys and values. The mask is `ops.attention.causal_mask`: slot s is visible from query t iff
s <= q_positions[t].

  scores = ((W_UK^T q_nope) . c_kv + q_rope . k_rope) * scale                      (eq. 10, 16-17 regrouped)
  o_h    = W_UV^T (sum_s p_s c_kv_s)                                                (eq. 11, 18 regrouped)
equals softmax([q_nope | q_rope] . [c_kv W_UK | k_rope] * scale) (c_kv W_UV), the expanded form, without
forming a per-head key or value: the latent is read twice (scores and weighted sum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax.ops.attention import _NEG_INF, attention_reference, causal_mask


def latent_attention(
  q_nope_BTHD, q_rope_BTHR, c_kv_BSC, k_rope_BSR, w_uk_CHD, w_uv_CHE, q_positions_BT, *, scale: float, dtype=jnp.float32
) -> jax.Array:
  """Absorbed attention: matmuls in `dtype` with float32 accumulation, softmax in float32; [B, T, H, E]."""
  B, T, H, _ = q_nope_BTHD.shape
  S, C = c_kv_BSC.shape[1], c_kv_BSC.shape[2]
  R = k_rope_BSR.shape[-1]
  q_abs_BTHC = jnp.einsum(
    "bthd,chd->bthc", q_nope_BTHD.astype(dtype), w_uk_CHD.astype(dtype), preferred_element_type=jnp.float32
  )
  # Queries of all T x H (position, head) pairs share the latent keys: fold them into one axis N, so each
  # product is a plain [N, C] x [S, C]^T or [N, S] x [S, C] matmul that reads the cache in its stored
  # layout (with a separate T axis, XLA on CPU transposes the whole cache at T = 1).
  q_abs_BNC = q_abs_BTHC.reshape(B, T * H, C).astype(dtype)
  q_rope_BNR = q_rope_BTHR.reshape(B, T * H, R).astype(dtype)
  c_kv_BSC = c_kv_BSC.astype(dtype)
  s_BNS = (
    jnp.einsum("bnc,bsc->bns", q_abs_BNC, c_kv_BSC, preferred_element_type=jnp.float32)
    + jnp.einsum("bnr,bsr->bns", q_rope_BNR, k_rope_BSR.astype(dtype), preferred_element_type=jnp.float32)
  ) * scale
  mask_BNS = jnp.repeat(causal_mask(q_positions_BT, S), H, axis=1)  # row t * H + h is query position t
  p_BNS = jax.nn.softmax(jnp.where(mask_BNS, s_BNS, _NEG_INF), axis=-1).astype(dtype)
  o_lat_BNC = jnp.einsum("bns,bsc->bnc", p_BNS, c_kv_BSC, preferred_element_type=jnp.float32)
  o_lat_BTHC = o_lat_BNC.reshape(B, T, H, C)
  return jnp.einsum("bthc,che->bthe", o_lat_BTHC.astype(dtype), w_uv_CHE.astype(dtype))


def latent_attention_reference(
  q_nope_BTHD, q_rope_BTHR, c_kv_BSC, k_rope_BSR, w_uk_CHD, w_uv_CHE, q_positions_BT, *, scale: float
) -> jax.Array:
  """The expanded form in float32: per-head keys [c_kv W_UK | k_rope] and values c_kv W_UV, then
  `attention_reference`."""
  f32 = lambda a: a.astype(jnp.float32)
  c_kv_BSC = f32(c_kv_BSC)
  k_nope_BSHD = jnp.einsum("bsc,chd->bshd", c_kv_BSC, f32(w_uk_CHD))
  v_BSHE = jnp.einsum("bsc,che->bshe", c_kv_BSC, f32(w_uv_CHE))
  B, S, H, _ = k_nope_BSHD.shape
  k_rope_BSHR = jnp.broadcast_to(f32(k_rope_BSR)[:, :, None], (B, S, H, k_rope_BSR.shape[-1]))
  q_BTHK = jnp.concatenate([f32(q_nope_BTHD), f32(q_rope_BTHR)], axis=-1)
  k_BSHK = jnp.concatenate([k_nope_BSHD, k_rope_BSHR], axis=-1)
  return attention_reference(q_BTHK, k_BSHK, v_BSHE, q_positions_BT, scale)
