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

`latent_attention_step` is the one-token decode step: the same attention, over the cache as it was
before this token's write plus the token's own latent, so that the cache write can follow the reads and
update the buffer in place (mla_jax.cache). Its slow twin is `latent_attention` over the written cache.
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


def latent_attention_step(
  q_nope_BHD,
  q_rope_BHR,
  c_kv_BSC,
  k_rope_BSR,
  c_kv_BC,
  k_rope_BR,
  w_uk_CHD,
  w_uv_CHE,
  positions_B,
  *,
  scale: float,
  dtype=jnp.float32,
) -> jax.Array:
  """One query token per row (at positions_B, with its latent c_kv_BC and k_rope_BR) over the cache
  before the token's write: `latent_attention` over the cache with the token written, [B, H, E].

  Slots s < position come from the cache, the token itself takes slot `position` (a position outside
  the cache, whose write is dropped, leaves it out). Each weight and cache array is read in its stored
  layout: W_UK and W_UV by `absorb_query` and `absorb_output`, the cache by matmuls with the slots as
  rows.
  """
  S = c_kv_BSC.shape[1]
  f32 = jnp.float32
  q_abs_BHC = absorb_query(q_nope_BHD, w_uk_CHD, dtype)
  q_rope_BHR = q_rope_BHR.astype(dtype)
  c_kv_BSC, k_rope_BSR = c_kv_BSC.astype(dtype), k_rope_BSR.astype(dtype)
  c_kv_BC, k_rope_BR = c_kv_BC.astype(dtype), k_rope_BR.astype(dtype)
  s_BHS = (
    jnp.einsum("bsc,bhc->bsh", c_kv_BSC, q_abs_BHC, preferred_element_type=f32)
    + jnp.einsum("bsr,bhr->bsh", k_rope_BSR, q_rope_BHR, preferred_element_type=f32)
  ).swapaxes(1, 2)  # the cache is the left operand (slots as rows); the small scores turn slots-last
  s_new_BH = jnp.einsum("bc,bhc->bh", c_kv_BC, q_abs_BHC, preferred_element_type=f32) + jnp.einsum(
    "br,bhr->bh", k_rope_BR, q_rope_BHR, preferred_element_type=f32
  )
  before_B1S = (jnp.arange(S)[None, :] < positions_B[:, None])[:, None]
  written_B1 = ((positions_B >= 0) & (positions_B < S))[:, None]
  s_BHS = jnp.where(before_B1S, s_BHS * scale, _NEG_INF)
  s_new_BH = jnp.where(written_B1, s_new_BH * scale, _NEG_INF)
  # softmax over the S cache slots and the new token together
  m_BH = jnp.maximum(jnp.max(s_BHS, axis=-1), s_new_BH)
  e_BHS = jnp.exp(s_BHS - m_BH[..., None])
  e_new_BH = jnp.where(written_B1, jnp.exp(s_new_BH - m_BH), 0.0)
  inv_BH = 1.0 / (jnp.sum(e_BHS, axis=-1) + e_new_BH)
  p_BHS = (e_BHS * inv_BH[..., None]).astype(dtype)
  p_new_BH = (e_new_BH * inv_BH).astype(dtype)
  o_lat_BHC = jnp.einsum("bhs,bsc->bhc", p_BHS, c_kv_BSC, preferred_element_type=f32)
  o_lat_BHC = o_lat_BHC + p_new_BH.astype(f32)[..., None] * c_kv_BC.astype(f32)[:, None]
  return absorb_output(o_lat_BHC, w_uv_CHE, dtype)


# W_UK^T q_nope and W_UV^T o_lat per head. A matmul with the heads as its batch axis transposes the
# weight ([C, H, *] stored) at every decode step: three passes over it. With few heads each weight is read
# once, as stored, as one [C, H * *] matrix: every query head meets every head's block and the
# block-diagonal part is kept, for H times the (small) arithmetic. At 8 heads (hidden 512, d_c 192) the two
# take the same time on a 2-core CPU; beyond, the arithmetic grows with H^2.
BLOCK_DIAGONAL_HEADS = 8


def absorb_query(q_nope_BHD, w_uk_CHD, dtype=jnp.float32) -> jax.Array:
  """q_abs[b, h, c] = sum_d q_nope[b, h, d] W_UK[c, h, d]: [B, H, C] in `dtype` (float32 accumulation)."""
  C, H, D = w_uk_CHD.shape
  if H > BLOCK_DIAGONAL_HEADS:
    return jnp.einsum(
      "bhd,chd->bhc", q_nope_BHD.astype(dtype), w_uk_CHD.astype(dtype), preferred_element_type=jnp.float32
    ).astype(dtype)
  # K = H * D rows: column h holds q_nope[b, h] in rows h * D .. h * D + D - 1, zeros elsewhere
  q_blocks_BKH = (q_nope_BHD[:, :, :, None] * jnp.eye(H, dtype=q_nope_BHD.dtype)[:, None, :]).reshape(-1, H * D, H)
  q_abs_BCH = jnp.einsum(
    "bkh,ck->bch",
    q_blocks_BKH.astype(dtype),
    w_uk_CHD.reshape(C, H * D).astype(dtype),
    preferred_element_type=jnp.float32,
  )
  return q_abs_BCH.swapaxes(1, 2).astype(dtype)


def absorb_output(o_lat_BHC, w_uv_CHE, dtype=jnp.float32) -> jax.Array:
  """o[b, h, e] = sum_c o_lat[b, h, c] W_UV[c, h, e]: [B, H, E] in `dtype` (float32 accumulation)."""
  C, H, E = w_uv_CHE.shape
  if H > BLOCK_DIAGONAL_HEADS:
    return jnp.einsum(
      "bhc,che->bhe", o_lat_BHC.astype(dtype), w_uv_CHE.astype(dtype), preferred_element_type=jnp.float32
    ).astype(dtype)
  all_BHGE = jnp.einsum(  # every query head h against every weight head g; h == g is kept
    "bhc,ck->bhk", o_lat_BHC.astype(dtype), w_uv_CHE.reshape(C, H * E).astype(dtype), preferred_element_type=jnp.float32
  ).reshape(-1, H, H, E)
  return jnp.sum(all_BHGE * jnp.eye(H, dtype=jnp.float32)[:, :, None], axis=2).astype(dtype)
