"""Mamba2 mixer (Dao & Gu 2024, arXiv 2405.21060), following mamba_ssm's `Mamba2` module.

x -> in_proj -> [z | xBC | dt];  xBC -> causal depthwise conv1d (ops.conv) -> SiLU -> [x | B | C];
dt = softplus(dt + dt_bias);  A = -exp(A_log);  y = SSD(x, dt, A, B, C) + D x (ops.ssd);
y = RMSNorm_grouped(y * silu(z)) * w  (ops.norm: mamba_ssm RMSNormGated, norm_before_gate=False);  out_proj.

Shape letters: B batch, T time, D hidden, I inner (H*P), E conv channels (I + 2*G*N), H heads, P head dim,
G groups of B/C, N state size, K conv width, F = 2I + 2GN + H (in_proj output).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mla_jax.cache import Mamba2Cache
from mla_jax.config import ModelConfig
from mla_jax.layers.common import Dense, compute_dtype, residual_scale
from mla_jax.ops.conv import causal_conv
from mla_jax.ops.norm import gated_rms_norm
from mla_jax.ops.ssd import ssd_chunked, ssd_decode_step, ssd_sequential

_SSD_IMPLS = {"chunked": ssd_chunked, "sequential": ssd_sequential}


def mamba2_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward matmul FLOPs per token of the chunked SSD (projections excluded: counted from parameters).

  With Q = min(chunk, T) and T padded up to a multiple of Q (T_pad), per chunk of Q tokens:
    C B^T per group            2 Q^2 G N      (full Q x Q block, as computed)
    (C B^T o L) x per head     2 Q^2 H P
    chunk states B^T (x) per head  2 Q H P N
    state -> output C H per head   2 Q H P N
  so FLOPs/token = (T_pad / T) * (2 Q (G N + H P) + 4 H P N). Not counted: the decays and the inter-chunk
  recurrence (elementwise), the depthwise conv (2 K E, its [K, E] kernel is a parameter matrix), and the
  segment sum, an O(Q) cumulative sum per token in the algorithm that `segsum` evaluates as a 0/1
  contraction (2 Q^2 H more FLOPs per token of implementation overhead).
  """
  q = max(1, min(cfg.mamba2_chunk_size, seq_len))
  t_pad = -(-seq_len // q) * q
  h, p, n, g = cfg.mamba2_num_heads, cfg.mamba2_head_dim, cfg.mamba2_state_size, cfg.mamba2_n_groups
  return (t_pad / seq_len) * (2 * q * (g * n + h * p) + 4 * h * p * n)


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """mamba_ssm init: dt ~ exp(U[log dt_min, log dt_max]) floored at `floor`; bias = softplus^-1(dt)."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # log(exp(dt) - 1), stable for small dt

  return init


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """A_log = log(A), A ~ U[1, 16] (mamba_ssm A_init_range)."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


class Mamba2Mixer(nn.Module):
  """Mamba2 token mixer; `positions_BT` is accepted for interface parity with attention and ignored.

  cache=None: SSD over the sequence from a zero state, returns (y, None). With a `Mamba2Cache` it
  continues from that state (T == 1: one recurrence step; T > 1: SSD from the cached state) and returns
  (y, new_cache). `segment_ids_BT` (packed rows, no cache) is mamba_ssm's `seq_idx`: the conv window and
  the SSD state restart from zero at every document start. `ssd_impl` picks the sequence SSD: "chunked"
  (`ssd_chunked`) or its reference twin "sequential" (`ssd_sequential`, a per-token scan; for tests and
  benchmarks).
  """

  cfg: ModelConfig
  ssd_impl: str = "chunked"

  @nn.compact
  def __call__(
    self,
    x_BTD: jax.Array,
    positions_BT: jax.Array | None = None,
    cache: Mamba2Cache | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> tuple[jax.Array, Mamba2Cache | None]:
    del positions_BT
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    h, p, n = cfg.mamba2_num_heads, cfg.mamba2_head_dim, cfg.mamba2_state_size
    g, k = cfg.mamba2_n_groups, cfg.mamba2_conv_kernel
    inner = h * p
    conv_dim = inner + 2 * g * n
    b, t, _ = x_BTD.shape
    if self.ssd_impl not in _SSD_IMPLS:
      raise ValueError(f"ssd_impl must be one of {sorted(_SSD_IMPLS)}, got {self.ssd_impl!r}")
    ssd = _SSD_IMPLS[self.ssd_impl]

    in_proj = Dense(2 * inner + 2 * g * n + h, axes=("embed", "ssm_inner"), dtype=dtype, name="in_proj")
    zxbcdt_BTF = in_proj(x_BTD)
    z_BTI = zxbcdt_BTF[..., :inner]
    xBC_BTE = zxbcdt_BTF[..., inner : inner + conv_dim]
    dt_BTH = zxbcdt_BTF[..., inner + conv_dim :]

    # PyTorch Conv1d default init: U(+-1/sqrt(fan_in)) for kernel and bias, fan_in = K (depthwise).
    bound = 1.0 / math.sqrt(k)
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    conv_w_KE = self.param(
      "conv_kernel", nn.with_logical_partitioning(uniform, ("conv", "ssm_inner")), (k, conv_dim), jnp.float32
    )
    conv_b_E = self.param("conv_bias", nn.with_logical_partitioning(uniform, ("ssm_inner",)), (conv_dim,), jnp.float32)
    dt_bias_H = self.param(
      "dt_bias",
      nn.with_logical_partitioning(
        _dt_bias_init(cfg.mamba2_dt_min, cfg.mamba2_dt_max, cfg.mamba2_dt_init_floor), ("ssm_heads",)
      ),
      (h,),
      jnp.float32,
    )
    A_log_H = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("ssm_heads",)), (h,), jnp.float32)
    D_H = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("ssm_heads",)), (h,), jnp.float32)
    norm_w_I = self.param(
      "norm_scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (inner,), jnp.float32
    )

    window_BWE = jnp.zeros((b, k - 1, conv_dim), dtype) if cache is None else cache.conv
    conv_BTE, window_BWE = causal_conv(xBC_BTE.astype(dtype), conv_w_KE, conv_b_E, window_BWE, segment_ids_BT)
    xBC_BTE = jax.nn.silu(conv_BTE).astype(dtype)
    x_BTHP = xBC_BTE[..., :inner].reshape(b, t, h, p)
    B_BTGN = xBC_BTE[..., inner : inner + g * n].reshape(b, t, g, n)
    C_BTGN = xBC_BTE[..., inner + g * n :].reshape(b, t, g, n)
    dt_BTH = jax.nn.softplus(dt_BTH.astype(jnp.float32) + dt_bias_H)
    A_H = -jnp.exp(A_log_H)

    if cache is None:
      y_BTHP, _ = ssd(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, cfg.mamba2_chunk_size, seq_idx_BT=segment_ids_BT)
      new_cache = None
    else:
      if segment_ids_BT is not None:
        raise ValueError("segment ids are for packed rows without a cache (a cache holds one document per row)")
      if t == 1:
        y_BHP, ssm_BHPN = ssd_decode_step(x_BTHP[:, 0], dt_BTH[:, 0], A_H, B_BTGN[:, 0], C_BTGN[:, 0], cache.ssm)
        y_BTHP = y_BHP[:, None]
      else:
        y_BTHP, ssm_BHPN = ssd(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, cfg.mamba2_chunk_size, cache.ssm)
      new_cache = Mamba2Cache(conv=window_BWE, ssm=ssm_BHPN.astype(jnp.float32))

    y_BTHP = y_BTHP.astype(jnp.float32) + D_H[:, None] * x_BTHP.astype(jnp.float32)
    y_BTI = gated_rms_norm(y_BTHP.reshape(b, t, inner), z_BTI, norm_w_I, g, cfg.rms_norm_eps)
    out_proj = Dense(
      cfg.hidden_size, axes=("ssm_inner", "embed"), dtype=dtype, scale=residual_scale(cfg), name="out_proj"
    )
    out_BTD = out_proj(y_BTI.astype(dtype))
    return out_BTD, new_cache
