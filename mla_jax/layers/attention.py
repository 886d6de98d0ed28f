"""Grouped-query attention with RoPE on the first model.rope_dim dims of each head (the whole head by default;
MHA when kv_heads = num_heads, MQA when 1); without RoPE (model.use_rope=False) the causal mask alone orders the
tokens.

With a cache (`mla_jax.cache.KVCache`, [B, kv_heads, S, head_dim]) the new RoPE'd keys and values are
written at their positions and the queries attend over every cache slot (the position mask hides the slots
not written yet). A one-token step (decode) attends over the cache before the write plus its own key and
value (`ops.attention.attention_step`), and the write follows in place. Packed rows
(no cache) pass `segment_ids_BT`: each token attends only within its own document (ops.attention).
"""

from __future__ import annotations

import chex
import jax
from flax import linen as nn

from mla_jax import cache as cache_lib
from mla_jax.config import ModelConfig
from mla_jax.layers.common import Dense, attention_scale, compute_dtype, residual_scale
from mla_jax.layers.rope import apply_rope
from mla_jax.ops.attention import attention, attention_step


class GQA(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    cache: cache_lib.KVCache | None = None,
    segment_ids_BT: jax.Array | None = None,
  ):
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    B, T, _ = x_BTD.shape
    H, K, Dh = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    q_BTHD = Dense((H, Dh), ("embed", "heads", "head_dim"), dtype=dtype, name="w_q")(x_BTD)
    k_BTKD = Dense((K, Dh), ("embed", "kv_heads", "head_dim"), dtype=dtype, name="w_k")(x_BTD)
    v_BTKD = Dense((K, Dh), ("embed", "kv_heads", "head_dim"), dtype=dtype, name="w_v")(x_BTD)
    if cfg.use_rope:
      q_BTHD = apply_rope(q_BTHD, positions_BT, cfg.rope_theta, cfg.rope_dim)
      k_BTKD = apply_rope(k_BTKD, positions_BT, cfg.rope_theta, cfg.rope_dim)
    q_BTHD = nn.with_logical_constraint(q_BTHD, ("batch", "activation_length", "activation_heads", None))
    if cache is not None and T == 1:  # decode: read the cache before the token's write, then write in place
      o_BHD = attention_step(
        q_BTHD[:, 0],
        cache.k,
        cache.v,
        k_BTKD[:, 0],
        v_BTKD[:, 0],
        positions_BT[:, 0],
        scale=attention_scale(cfg, Dh),
        dtype=dtype,
      )
      o_BTHD = o_BHD[:, None]
      k_BKSD = cache_lib.write(cache.k, k_BTKD, positions_BT, axis=cache.SLOT_AXIS, after=o_BHD)
      v_BKSD = cache_lib.write(cache.v, v_BTKD, positions_BT, axis=cache.SLOT_AXIS, after=o_BHD)
      new_cache = cache.replace(
        k=nn.with_logical_constraint(k_BKSD, cache.AXES["k"]), v=nn.with_logical_constraint(v_BKSD, cache.AXES["v"])
      )
    else:
      k_BSKD, v_BSKD, new_cache = k_BTKD, v_BTKD, None  # the keys: this call's tokens or every cache slot
      if cache is not None:
        k_BKSD = cache_lib.write(cache.k, k_BTKD, positions_BT, axis=cache.SLOT_AXIS)
        v_BKSD = cache_lib.write(cache.v, v_BTKD, positions_BT, axis=cache.SLOT_AXIS)
        new_cache = cache.replace(
          k=nn.with_logical_constraint(k_BKSD, cache.AXES["k"]), v=nn.with_logical_constraint(v_BKSD, cache.AXES["v"])
        )
        k_BSKD, v_BSKD = k_BKSD.swapaxes(1, 2).astype(dtype), v_BKSD.swapaxes(1, 2).astype(dtype)
      o_BTHD = attention(
        q_BTHD,
        k_BSKD,
        v_BSKD,
        positions_BT,
        scale=attention_scale(cfg, Dh),
        impl=cfg.attention_impl,
        chunk_size=cfg.attention_chunk_size,
        segment_ids_BT=segment_ids_BT,
      )
    chex.assert_shape(o_BTHD, (B, T, H, Dh))
    y_BTD = Dense(
      cfg.hidden_size, ("heads", "head_dim", "embed"), in_dims=2, dtype=dtype, scale=residual_scale(cfg), name="w_o"
    )(o_BTHD)
    return y_BTD, new_cache
