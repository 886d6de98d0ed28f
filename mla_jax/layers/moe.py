"""DeepSeek-MoE feed-forward: top-k routed SwiGLU experts plus always-on shared experts.

y_t = Shared(x_t) + sum_k w_tk * Expert_{e_tk}(x_t) (DeepSeek-MoE, Dai et al. 2024, eq. 9-11). The
num_shared_experts shared experts are fused into one SwiGLU of width num_shared_experts * F, which is the
same function as their sum (shared_intermediate_size sets another width, as Granite's shared MLP has).
Routing, top-k normalisation and the auxiliary losses are in `mla_jax.ops.moe`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mla_jax.config import ModelConfig
from mla_jax.layers.common import Dense, compute_dtype, residual_scale
from mla_jax.ops import moe as moe_ops

# Non-parameter collection holding the DeepSeek-V3 aux-loss-free selection bias.
BIAS_COLLECTION = "moe_bias"


def _expert_init(fan_in: int, scale: float = 1.0) -> nn.initializers.Initializer:
  return nn.initializers.truncated_normal(stddev=scale / fan_in**0.5)


class MoE(nn.Module):
  """Routed + shared SwiGLU experts. `__call__(x_BTD) -> (y_BTD, aux)`.

  aux (float32): load_balance (Switch/GShard loss, scale it by trainer.load_balance_alpha), router_z
  (ST-MoE z-loss), load [E] (fraction of assignments per expert), dropped_fraction (capacity mode only,
  else 0). Routing is over all B * T tokens together; capacity mode sizes its buffers from B * T.

  cfg.moe_dispatch: 'ragged' is dropless (`moe_ops.moe_ragged`: block-grouped matmuls on CPU,
  lax.ragged_dot on GPU and TPU), 'capacity' drops assignments over capacity_factor, 'dense' runs every
  expert on every token.

  cfg.router: 'softmax' (DeepSeek-V2) or 'sigmoid' (DeepSeek-V3) expert scores; cfg.n_group / topk_group
  limit each token's experts to its best groups, cfg.routed_scaling_factor scales the weights (`moe_ops.route`).

  Selection bias (added to the scores for the top-k selection only, never to the weights):
  - with the sigmoid router, the parameter `score_bias` [E] (zeros at init): a checkpoint's
    e_score_correction_bias, so `model.forward(config, params, ids)` alone routes as DeepSeek-V3 does. It sits
    in params so that the params tree is the whole model; the optimizer never moves it (the layer reads it
    under stop_gradient, and its role, 'vector', is not weight-decayed).
  - with cfg.aux_free_bias, a per-expert bias from the 'moe_bias' collection (created as zeros by `init`),
    added on top. It is not a parameter: the training loop passes the collection with the variables, and
    after each step sets bias <- update_aux_free_bias(bias, aux['load'], cfg.aux_free_bias_rate) outside the
    optimizer. Fine-tuning an imported DeepSeek-V3 model with it starts from the checkpoint's bias.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    B, T, D = x_BTD.shape
    E, K, F = cfg.num_experts, cfg.experts_per_tok, cfg.moe_intermediate_size
    dtype = compute_dtype(cfg.dtype)
    x_ND = x_BTD.reshape(B * T, D).astype(dtype)

    # The router runs in float32: its logits decide the selection and its softmax the weights.
    logits_NE = Dense(E, ("embed", "expert"), dtype=jnp.float32, name="router")(x_ND)
    bias_E = None
    if cfg.router == "sigmoid":
      # Its gradient is zero anyway (the bias only selects); its role is 'vector', which is never decayed.
      bias_E = jax.lax.stop_gradient(
        self.param("score_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert",)), (E,), jnp.float32)
      )
    if cfg.aux_free_bias:
      running_E = self.variable(BIAS_COLLECTION, "bias", jnp.zeros, (E,), jnp.float32).value
      bias_E = running_E if bias_E is None else bias_E + running_E
    weights_NK, experts_NK, probs_NE = moe_ops.route(
      logits_NE, K, cfg.norm_topk_prob, bias_E, cfg.router, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor
    )

    w_gate_EDF = self.param(
      "w_gate", nn.with_logical_partitioning(_expert_init(D), ("expert", "embed", "expert_mlp")), (E, D, F), jnp.float32
    )
    w_up_EDF = self.param(
      "w_up", nn.with_logical_partitioning(_expert_init(D), ("expert", "embed", "expert_mlp")), (E, D, F), jnp.float32
    )
    w_down_EFD = self.param(
      "w_down",
      nn.with_logical_partitioning(_expert_init(F, residual_scale(cfg)), ("expert", "expert_mlp", "embed")),
      (E, F, D),
      jnp.float32,
    )
    experts = (w_gate_EDF, w_up_EDF, w_down_EFD)

    dropped_fraction = jnp.zeros((), jnp.float32)
    if cfg.moe_dispatch == "ragged":
      y_ND = moe_ops.moe_ragged(x_ND, weights_NK, experts_NK, *experts)
    elif cfg.moe_dispatch == "capacity":
      y_ND, dropped_fraction = moe_ops.moe_capacity(
        x_ND, weights_NK, experts_NK, *experts, capacity_factor=cfg.capacity_factor
      )
    elif cfg.moe_dispatch == "dense":
      y_ND = moe_ops.moe_dense(x_ND, weights_NK, experts_NK, *experts)
    else:
      raise ValueError(f"unknown moe_dispatch {cfg.moe_dispatch!r}")

    if cfg.shared_expert_enabled and cfg.num_shared_experts > 0:
      width = cfg.shared_width
      gate_NH = Dense(width, ("embed", "mlp"), dtype=dtype, name="shared_gate")(x_ND)
      up_NH = Dense(width, ("embed", "mlp"), dtype=dtype, name="shared_up")(x_ND)
      shared_down = Dense(D, ("mlp", "embed"), dtype=dtype, scale=residual_scale(cfg), name="shared_down")
      y_ND = y_ND + shared_down(jax.nn.silu(gate_NH) * up_NH)

    aux = {
      "load_balance": moe_ops.load_balance_loss(probs_NE, experts_NK, E),
      "router_z": moe_ops.router_z_loss(logits_NE),
      "load": moe_ops.expert_load(experts_NK, E),
      "dropped_fraction": dropped_fraction,
    }
    return y_ND.reshape(B, T, D).astype(dtype), aux


def update_aux_free_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 §2.1.2: b_i <- b_i + rate * sign(mean_load - load_i).

  An overloaded expert's bias falls and an under-loaded one's rises, so selection drifts towards the
  under-loaded experts without any gradient. The training loop calls it after each step, outside the
  optimizer: it passes {'params': ..., 'moe_bias': ...} to `apply` (the layer only reads the bias, so
  no `mutable` is needed), takes each MoE layer's aux['load'], and puts the returned bias into the
  'moe_bias' collection at that layer's path for the next step.
  """
  load_E = load_E.astype(jnp.float32)
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def moe_active_params(cfg: ModelConfig) -> int:
  """Parameters one token multiplies by in an MoE layer (for FLOPs = 2 * active params per token).

  Router D * E (+ E for the sigmoid router's score_bias), the K routed experts 3 * D * F each, and the
  shared SwiGLU 3 * D * shared_width.
  The dispatch overhead (sorting, capacity einsums, the dense reference computing all E experts) is not
  counted: this is the model's compute, not an implementation's.
  """
  D, E, K, F = cfg.hidden_size, cfg.num_experts, cfg.experts_per_tok, cfg.moe_intermediate_size
  shared = cfg.shared_width
  return D * E + K * 3 * D * F + 3 * D * shared + _score_bias(cfg)


def moe_total_params(cfg: ModelConfig) -> int:
  """All parameters of one MoE layer: router (and the sigmoid router's score_bias), E routed experts and the
  shared expert."""
  D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
  shared = cfg.shared_width
  return D * E + E * 3 * D * F + 3 * D * shared + _score_bias(cfg)


def _score_bias(cfg: ModelConfig) -> int:
  return cfg.num_experts if cfg.router == "sigmoid" else 0
