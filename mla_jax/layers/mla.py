"""Multi-head Latent Attention, DeepSeek-V2 (arXiv 2405.04434, section 2.1), expanded (training) form.

Query:      c_q = RMSNorm(x W_DQ) (or x when q_latent_dim = 0);  [q_nope | q_rope] = c_q W_UQ   (eq. 12-13)
Key/value:  [c_kv | k_rope] = x W_DKV;  c_kv = RMSNorm(c_kv);  k_nope = c_kv W_UK;  v = c_kv W_UV (eq. 9-11)
RoPE touches only q_rope (per head) and k_rope (one key shared by all heads)                     (eq. 14-15)
Scores use [q_nope | q_rope] . [k_nope | k_rope] / sqrt(head_dim + d_rope).                      (eq. 16-18)
A cache needs only c_kv and k_rope: (kv_latent_dim + d_rope) numbers per token.
Two switches give the seed trainer's variant (for its checkpoints): `mla_latent_norms=False` drops both
latent RMSNorms, and `mla_q_rope_from_input=True` computes q_rope = x W_QR from the input, not from c_q.

With a cache (`mla_jax.cache.MLACache`) the new c_kv and k_rope are written at their positions and the
queries attend over the whole cache. A call with T > 1 (prefill) rebuilds K and V from the cached latent
(the expanded form). A one-token step (decode) with `cache.decode == "absorbed"` uses weight absorption
(section 2.1.2): q_nope^T (W_UK c_kv) = (W_UK^T q_nope)^T c_kv, so W_UK folds into the query and W_UV into
the output, and attention runs over the latent directly; `"expanded"` keeps the rebuilt-K/V reference. At
batch 1 the step is `ops.latent_attention.latent_attention_step` (it reads the cache before the token's
write, which follows in place: XLA:CPU copies the cache when a batch-1 dot reads it after the write);
larger batches run `ops.latent_attention.latent_attention` over the written cache, which XLA leaves in place.
Packed rows (no cache) pass `segment_ids_BT` to the expanded form: each token attends only within its own
document (ops.attention).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from mla_jax import cache as cache_lib
from mla_jax.config import ModelConfig
from mla_jax.layers.common import Dense, RMSNorm, attention_scale, compute_dtype, residual_scale
from mla_jax.layers.rope import apply_rope
from mla_jax.ops.attention import attention
from mla_jax.ops.latent_attention import latent_attention, latent_attention_step


class MLA(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    H, Dn, Dr, C = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.kv_latent_dim
    if cfg.use_q_latent:
      self.w_dq = Dense(cfg.q_latent_dim, ("embed", "q_latent"), dtype=dtype)
      if cfg.mla_latent_norms:
        self.q_norm = RMSNorm(cfg.rms_norm_eps, dtype)
      if cfg.mla_q_rope_from_input:
        self.w_uq = Dense((H, Dn), ("q_latent", "heads", "head_dim"), dtype=dtype)
        self.w_qr = Dense((H, Dr), ("embed", "heads", "head_dim"), dtype=dtype)
      else:
        self.w_uq = Dense((H, Dn + Dr), ("q_latent", "heads", "head_dim"), dtype=dtype)
    else:
      self.w_q = Dense((H, Dn + Dr), ("embed", "heads", "head_dim"), dtype=dtype)
    self.w_dkv = Dense(C + Dr, ("embed", "kv_latent"), dtype=dtype)
    if cfg.mla_latent_norms:
      self.kv_norm = RMSNorm(cfg.rms_norm_eps, dtype)
    self.w_uk = Dense((H, Dn), ("kv_latent", "heads", "head_dim"), dtype=dtype)
    self.w_uv = Dense((H, cfg.v_head_dim), ("kv_latent", "heads", "head_dim"), dtype=dtype)
    self.w_o = Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_dims=2, dtype=dtype, scale=residual_scale(cfg))

  def project_query(self, x_BTD: jax.Array, positions_BT: jax.Array):
    """Returns q_nope [B,T,H,head_dim] and RoPE'd q_rope [B,T,H,d_rope]."""
    cfg = self.cfg
    if cfg.use_q_latent:
      c_q_BTQ = self.w_dq(x_BTD)
      if cfg.mla_latent_norms:
        c_q_BTQ = self.q_norm(c_q_BTQ)
      if cfg.mla_q_rope_from_input:
        return self.w_uq(c_q_BTQ), apply_rope(self.w_qr(x_BTD), positions_BT, cfg.rope_theta)
      q_BTHK = self.w_uq(c_q_BTQ)
    else:
      q_BTHK = self.w_q(x_BTD)
    q_nope_BTHD, q_rope_BTHR = q_BTHK[..., : cfg.head_dim], q_BTHK[..., cfg.head_dim :]
    return q_nope_BTHD, apply_rope(q_rope_BTHR, positions_BT, cfg.rope_theta)

  def project_latent(self, x_BTD: jax.Array, positions_BT: jax.Array):
    """Returns the cacheable latent: normalised c_kv [B,T,kv_latent_dim] and RoPE'd k_rope [B,T,d_rope]."""
    C = self.cfg.kv_latent_dim
    kv_BTK = self.w_dkv(x_BTD)
    c_kv_BTC = self.kv_norm(kv_BTK[..., :C]) if self.cfg.mla_latent_norms else kv_BTK[..., :C]
    k_rope_BTR = apply_rope(kv_BTK[..., None, C:], positions_BT, self.cfg.rope_theta)[:, :, 0]
    return c_kv_BTC, k_rope_BTR

  def __call__(
    self,
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    cache: cache_lib.MLACache | None = None,
    segment_ids_BT: jax.Array | None = None,
  ):
    cfg = self.cfg
    B, T, _ = x_BTD.shape
    H, Dn, Dr, Dv = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.v_head_dim
    q_nope_BTHD, q_rope_BTHR = self.project_query(x_BTD, positions_BT)
    c_kv_BTC, k_rope_BTR = self.project_latent(x_BTD, positions_BT)
    new_cache = None
    absorbed = cache is not None and T == 1 and cache.decode == "absorbed" and not self.is_initializing()
    if absorbed and B == 1:
      o_BHE = self.absorbed_step(
        q_nope_BTHD[:, 0], q_rope_BTHR[:, 0], cache, c_kv_BTC[:, 0], k_rope_BTR[:, 0], positions_BT
      )
      chex.assert_shape(o_BHE, (B, H, Dv))
      # the writes follow the reads of the old cache (`after`), in place
      c_kv_BSC = cache_lib.write(cache.c_kv, c_kv_BTC, positions_BT, after=o_BHE)
      k_rope_BSR = cache_lib.write(cache.k_rope, k_rope_BTR, positions_BT, after=o_BHE)
      new_cache = cache.replace(
        c_kv=nn.with_logical_constraint(c_kv_BSC, cache.AXES["c_kv"]),
        k_rope=nn.with_logical_constraint(k_rope_BSR, cache.AXES["k_rope"]),
      )
      return self.w_o(o_BHE[:, None]), new_cache
    if cache is not None:
      c_kv_BSC = nn.with_logical_constraint(cache_lib.write(cache.c_kv, c_kv_BTC, positions_BT), cache.AXES["c_kv"])
      k_rope_BSR = nn.with_logical_constraint(
        cache_lib.write(cache.k_rope, k_rope_BTR, positions_BT), cache.AXES["k_rope"]
      )
      new_cache = cache.replace(c_kv=c_kv_BSC, k_rope=k_rope_BSR)
      if absorbed:  # batch > 1: the batched dot reads the written cache without copying it
        o_BTHE = latent_attention(
          q_nope_BTHD,
          q_rope_BTHR,
          c_kv_BSC,
          k_rope_BSR,
          self.w_uk.variables["params"]["kernel"],
          self.w_uv.variables["params"]["kernel"],
          positions_BT,
          scale=attention_scale(cfg, cfg.head_dim + cfg.d_rope),
          dtype=compute_dtype(cfg.dtype),
        )
        chex.assert_shape(o_BTHE, (B, T, H, Dv))
        return self.w_o(o_BTHE), new_cache
      c_kv_BSC, k_rope_BSR = c_kv_BSC.astype(c_kv_BTC.dtype), k_rope_BSR.astype(k_rope_BTR.dtype)
    else:
      c_kv_BSC, k_rope_BSR = c_kv_BTC, k_rope_BTR  # without a cache the keys are this call's tokens
    S = c_kv_BSC.shape[1]
    k_nope_BSHD = self.w_uk(c_kv_BSC)
    v_BSHE = self.w_uv(c_kv_BSC)
    q_BTHK = jnp.concatenate([q_nope_BTHD, q_rope_BTHR], axis=-1)
    k_BSHK = jnp.concatenate([k_nope_BSHD, jnp.broadcast_to(k_rope_BSR[:, :, None], (B, S, H, Dr))], axis=-1)
    q_BTHK = nn.with_logical_constraint(q_BTHK, ("batch", "activation_length", "activation_heads", None))
    o_BTHE = attention(
      q_BTHK,
      k_BSHK,
      v_BSHE,
      positions_BT,
      scale=attention_scale(cfg, Dn + Dr),
      impl=cfg.attention_impl,
      chunk_size=cfg.attention_chunk_size,
      segment_ids_BT=segment_ids_BT,
    )
    chex.assert_shape(o_BTHE, (B, T, H, Dv))
    return self.w_o(o_BTHE), new_cache

  def absorbed_step(self, q_nope_BHD, q_rope_BHR, cache, c_kv_BC, k_rope_BR, positions_BT) -> jax.Array:
    """`ops.latent_attention.latent_attention_step` with this layer's W_UK and W_UV: one token's attention
    over the latent cache before its write plus the token itself, no per-head key or value formed
    (DeepSeek-V2 section 2.1.2); [B, H, v_head_dim]."""
    cfg = self.cfg
    w_uk_CHD = self.w_uk.variables["params"]["kernel"]
    w_uv_CHE = self.w_uv.variables["params"]["kernel"]
    chex.assert_shape(w_uk_CHD, (cfg.kv_latent_dim, cfg.num_heads, cfg.head_dim))
    return latent_attention_step(
      q_nope_BHD,
      q_rope_BHR,
      cache.c_kv,
      cache.k_rope,
      c_kv_BC,
      k_rope_BR,
      w_uk_CHD,
      w_uv_CHE,
      positions_BT[:, 0],
      scale=attention_scale(cfg, cfg.head_dim + cfg.d_rope),
      dtype=compute_dtype(cfg.dtype),
    )
