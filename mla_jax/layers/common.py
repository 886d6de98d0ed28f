"""Building blocks shared by every layer: a logically-partitioned dense projection and RMSNorm."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mla_jax.pytree import path_names


def matmul(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
  """x @ w contracting the last `in_dims` axes of x with the first `in_dims` of w, as one 2-D matmul.

  Leading axes are merged into rows (and contracted axes into one) before the dot: a 3-D dot_general
  contracts over two axes (batch, length) in its weight gradient, and XLA:CPU then transposes the
  [B*T, F] activation gradient in a strided loop; the 2-D form needs no transpose (the MLP backward ran
  1.5x faster, benchmarks/results/profile_step.md)."""
  lead, contracted, out = x.shape[: x.ndim - in_dims], w.shape[:in_dims], w.shape[in_dims:]
  k = math.prod(contracted)
  y = jnp.dot(x.reshape(math.prod(lead), k), w.reshape(k, math.prod(out)))
  return y.reshape(lead + out)


def compute_dtype(name: str) -> jnp.dtype:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Dense(nn.Module):
  """y = x @ W contracting the last `in_dims` axes of x; W has shape x.shape[-in_dims:] + features.

  `axes` names every kernel axis (inputs first) for the logical-axis sharding rules. Parameters are
  float32; the matmul runs in `dtype`. The init is truncated normal with std `scale / sqrt(fan_in)`.
  """

  features: int | Sequence[int]
  axes: Sequence[str]
  in_dims: int = 1
  dtype: jnp.dtype = jnp.float32
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims :]
    shape = tuple(in_shape) + features
    fan_in = 1
    for n in in_shape:
      fan_in *= n
    init = nn.initializers.truncated_normal(stddev=self.scale / fan_in**0.5)
    w = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)), shape, jnp.float32)
    return matmul(x.astype(self.dtype), w.astype(self.dtype), self.in_dims)


def residual_scale(cfg) -> float:
  """Init scale of every projection that writes into the residual stream (attention w_o, SwiGLU down, the
  MoE routed and shared down-projections, Mamba2 out_proj): 1/sqrt(residual branches in the model).

  GPT-2's 1/sqrt(N) over the N residual additions: 2 x num_layers when every layer has an FFN, one per
  layer for Mamba2 layers without one (mamba_ssm's n_residuals_per_layer x n_layer).
  """
  branches = sum(1 + (cfg.ffn_kind(i) is not None) for i in range(cfg.num_layers))
  return branches**-0.5


def attention_scale(cfg, width: int) -> float:
  """Softmax scale of the attention scores for q.k over `width` channels: model.attention_multiplier, or
  1/sqrt(width) when it is 0."""
  return cfg.attention_multiplier or width**-0.5


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019) computed in float32, weight initialised to one."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), jnp.float32
    )
    return rms_norm(x, scale, self.eps).astype(self.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return x32 * scale.astype(jnp.float32)


# A parameter's role follows from its name (nn.scan's leading 'layers' axis changes its rank, not its role).
_ROLES = {
  "kernel": "matrix",
  "conv_kernel": "matrix",
  "w_gate": "matrix",
  "w_up": "matrix",
  "w_down": "matrix",
  "scale": "norm",
  "norm_scale": "norm",
  "conv_bias": "vector",
  "score_bias": "vector",
  "dt_bias": "vector",
  "A_log": "vector",
  "D": "vector",
}


def param_role(path) -> str:
  """Role of the parameter at `path` (a pytree key path or a sequence of names).

  'embedding' (the token table), 'matrix' (projection, expert and depthwise-conv kernels: weights that
  multiply activations), 'norm' (RMSNorm scales, Mamba2's gated-norm scale) or 'vector' (biases and
  Mamba2's A_log, D and dt_bias). Weight decay and the matmul FLOP count use it.
  """
  names = path_names(path)
  if "embedding" in names:
    return "embedding"
  if names and names[-1] in _ROLES:
    return _ROLES[names[-1]]
  raise ValueError(f"parameter {'/'.join(names)} has no known role: add its name to layers.common._ROLES")
