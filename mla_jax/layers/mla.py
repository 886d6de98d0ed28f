"""Multi-head Latent Attention, DeepSeek-V2 (arXiv 2405.04434, section 2.1), expanded (training) form.

Query:      c_q = RMSNorm(x W_DQ) (or x when q_latent_dim = 0);  [q_nope | q_rope] = c_q W_UQ   (eq. 12-13)
Key/value:  [c_kv | k_rope] = x W_DKV;  c_kv = RMSNorm(c_kv);  k_nope = c_kv W_UK;  v = c_kv W_UV (eq. 9-11)
RoPE touches only q_rope (per head) and k_rope (one key shared by all heads)                     (eq. 14-15)
Scores use [q_nope | q_rope] . [k_nope | k_rope] / sqrt(head_dim + d_rope).                      (eq. 16-18)
A cache needs only c_kv and k_rope: (kv_latent_dim + d_rope) numbers per token.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from mla_jax.config import ModelConfig
from mla_jax.layers.common import Dense, RMSNorm, compute_dtype
from mla_jax.layers.mlp import residual_scale
from mla_jax.layers.rope import apply_rope
from mla_jax.ops.attention import attention


class MLA(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    H, Dn, Dr, C = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.kv_latent_dim
    if cfg.q_latent_dim:
      self.w_dq = Dense(cfg.q_latent_dim, ("embed", "q_latent"), dtype=dtype)
      self.q_norm = RMSNorm(cfg.rms_norm_eps, dtype)
      self.w_uq = Dense((H, Dn + Dr), ("q_latent", "heads", "head_dim"), dtype=dtype)
    else:
      self.w_q = Dense((H, Dn + Dr), ("embed", "heads", "head_dim"), dtype=dtype)
    self.w_dkv = Dense(C + Dr, ("embed", "kv_latent"), dtype=dtype)
    self.kv_norm = RMSNorm(cfg.rms_norm_eps, dtype)
    self.w_uk = Dense((H, Dn), ("kv_latent", "heads", "head_dim"), dtype=dtype)
    self.w_uv = Dense((H, cfg.v_head_dim), ("kv_latent", "heads", "head_dim"), dtype=dtype)
    self.w_o = Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_dims=2, dtype=dtype,
                     scale=residual_scale(cfg))

  def project_query(self, x_BTD: jax.Array, positions_BT: jax.Array):
    """Returns q_nope [B,T,H,head_dim] and RoPE'd q_rope [B,T,H,d_rope]."""
    cfg = self.cfg
    if cfg.q_latent_dim:
      q_BTHK = self.w_uq(self.q_norm(self.w_dq(x_BTD)))
    else:
      q_BTHK = self.w_q(x_BTD)
    q_nope_BTHD, q_rope_BTHR = q_BTHK[..., :cfg.head_dim], q_BTHK[..., cfg.head_dim:]
    return q_nope_BTHD, apply_rope(q_rope_BTHR, positions_BT, cfg.rope_theta)

  def project_latent(self, x_BTD: jax.Array, positions_BT: jax.Array):
    """Returns the cacheable latent: normalised c_kv [B,T,kv_latent_dim] and RoPE'd k_rope [B,T,d_rope]."""
    C = self.cfg.kv_latent_dim
    kv_BTK = self.w_dkv(x_BTD)
    c_kv_BTC = self.kv_norm(kv_BTK[..., :C])
    k_rope_BTR = apply_rope(kv_BTK[..., None, C:], positions_BT, self.cfg.rope_theta)[:, :, 0]
    return c_kv_BTC, k_rope_BTR

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: Optional[dict] = None):
    cfg = self.cfg
    B, T, _ = x_BTD.shape
    H, Dn, Dr, Dv = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.v_head_dim
    q_nope_BTHD, q_rope_BTHR = self.project_query(x_BTD, positions_BT)
    c_kv_BTC, k_rope_BTR = self.project_latent(x_BTD, positions_BT)
    k_nope_BTHD = self.w_uk(c_kv_BTC)
    v_BTHE = self.w_uv(c_kv_BTC)
    q_BTHK = jnp.concatenate([q_nope_BTHD, q_rope_BTHR], axis=-1)
    k_BTHK = jnp.concatenate([k_nope_BTHD, jnp.broadcast_to(k_rope_BTR[:, :, None], (B, T, H, Dr))], axis=-1)
    q_BTHK = nn.with_logical_constraint(q_BTHK, ("batch", "activation_length", "activation_heads", None))
    o_BTHE = attention(q_BTHK, k_BTHK, v_BTHE, positions_BT, scale=(Dn + Dr) ** -0.5,
                       impl=cfg.attention_impl, chunk_size=cfg.attention_chunk_size)
    chex.assert_shape(o_BTHE, (B, T, H, Dv))
    return self.w_o(o_BTHE), None
