"""Building blocks shared by every layer: a logically-partitioned dense projection and RMSNorm."""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn


def compute_dtype(name: str) -> jnp.dtype:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Dense(nn.Module):
  """y = x @ W contracting the last `in_dims` axes of x; W has shape x.shape[-in_dims:] + features.

  `axes` names every kernel axis (inputs first) for the logical-axis sharding rules. Parameters are
  float32; the matmul runs in `dtype`. The init is truncated normal with std `scale / sqrt(fan_in)`.
  """

  features: Union[int, Sequence[int]]
  axes: Sequence[str]
  in_dims: int = 1
  dtype: jnp.dtype = jnp.float32
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    shape = tuple(in_shape) + features
    fan_in = 1
    for n in in_shape:
      fan_in *= n
    init = nn.initializers.truncated_normal(stddev=self.scale / fan_in**0.5)
    w = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)), shape, jnp.float32)
    contract_x = tuple(range(x.ndim - self.in_dims, x.ndim))
    contract_w = tuple(range(self.in_dims))
    return jax.lax.dot_general(x.astype(self.dtype), w.astype(self.dtype), ((contract_x, contract_w), ((), ())))


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019) computed in float32, weight initialised to one."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    return rms_norm(x, scale, self.eps).astype(self.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return x32 * scale.astype(jnp.float32)
