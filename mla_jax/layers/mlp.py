"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import linen as nn

from mla_jax.config import ModelConfig
from mla_jax.layers.common import Dense, compute_dtype, residual_scale


class SwiGLU(nn.Module):
  cfg: ModelConfig
  intermediate_size: int = 0  # 0: cfg.intermediate_size

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    F = self.intermediate_size or cfg.intermediate_size
    gate_BTF = Dense(F, ("embed", "mlp"), dtype=dtype, name="gate")(x_BTD)
    up_BTF = Dense(F, ("embed", "mlp"), dtype=dtype, name="up")(x_BTD)
    h_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("batch", "activation_length", "activation_mlp"))
    return Dense(cfg.hidden_size, ("mlp", "embed"), dtype=dtype, scale=residual_scale(cfg), name="down")(h_BTF)
