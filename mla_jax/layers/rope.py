"""Rotary position embedding (Su et al. 2021), rotate-half layout, applied at explicit positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(dim: int, theta: float) -> jax.Array:
  """inv_freq_i = theta^(-2i/dim) for i < dim/2."""
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float, rope_dim: int = 0) -> jax.Array:
  """Rotates the pairs (x_i, x_{i+R/2}) of each head by angle position * inv_freq_i (float32 math), R = rope_dim.

  rope_dim 0 (or D) rotates the whole head; 0 < rope_dim < D rotates x[..., :rope_dim] as a head of that width
  and passes the other D - rope_dim dims through unchanged (GPT-NeoX / transformers' partial_rotary_factor).
  """
  dim = x_BTHD.shape[-1]
  rope_dim = rope_dim or dim
  if rope_dim > dim or rope_dim % 2:
    raise ValueError(f"rope_dim must be even and at most the head width {dim}, got {rope_dim}")
  if rope_dim < dim:
    rotated = apply_rope(x_BTHD[..., :rope_dim], positions_BT, theta)
    return jnp.concatenate([rotated, x_BTHD[..., rope_dim:]], axis=-1)
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * rope_frequencies(dim, theta)
  cos_BT1F = jnp.cos(angles_BTF)[:, :, None, :]
  sin_BT1F = jnp.sin(angles_BTF)[:, :, None, :]
  x32 = x_BTHD.astype(jnp.float32)
  x1, x2 = x32[..., : dim // 2], x32[..., dim // 2 :]
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
  return out.astype(x_BTHD.dtype)
