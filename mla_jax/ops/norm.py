"""Gated RMSNorm of Mamba2 (mamba_ssm RMSNormGated, norm_before_gate=False) and its slow twin.

  u = y * silu(z);  out = u / sqrt(mean over the group of u^2 + eps) * w
with the I channels split into `groups` contiguous groups of I / groups, each normalised on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gated_rms_norm(y_BTI: jax.Array, z_BTI: jax.Array, w_I: jax.Array, groups: int, eps: float) -> jax.Array:
  """RMSNorm(y * silu(z)) over groups of I / groups channels, times w; float32."""
  b, t, i = y_BTI.shape
  u_BTI = y_BTI.astype(jnp.float32) * jax.nn.silu(z_BTI.astype(jnp.float32))
  u_BTGF = u_BTI.reshape(b, t, groups, i // groups)
  u_BTGF = u_BTGF * jax.lax.rsqrt(jnp.mean(jnp.square(u_BTGF), axis=-1, keepdims=True) + eps)
  return u_BTGF.reshape(b, t, i) * w_I.astype(jnp.float32)


def gated_rms_norm_reference(y_BTI: jax.Array, z_BTI: jax.Array, w_I: jax.Array, groups: int, eps: float) -> jax.Array:
  """The formula group by group: silu(z) = z / (1 + exp(-z)), RMS = sqrt(sum u^2 / width + eps)."""
  y, z, w = (a.astype(jnp.float32) for a in (y_BTI, z_BTI, w_I))
  u_BTI = y * z / (1.0 + jnp.exp(-z))
  width = u_BTI.shape[-1] // groups
  outs = []
  for g in range(groups):
    u_BTF = u_BTI[..., g * width : (g + 1) * width]
    rms_BT1 = jnp.sqrt(jnp.sum(u_BTF * u_BTF, axis=-1, keepdims=True) / width + eps)
    outs.append(u_BTF / rms_BT1 * w[g * width : (g + 1) * width])
  return jnp.concatenate(outs, axis=-1)
