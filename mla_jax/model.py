"""The language model: embed -> blocks from the layer pattern -> final RMSNorm -> LM head.

Each block is pre-norm: x += mixer(norm(x)); x += ffn(norm(x)). The mixer is MLA, GQA or Mamba2 and
the FFN is SwiGLU, MoE or absent (Mamba2 layers without `mamba_ffn`), all chosen per layer by
`ModelConfig`. `LanguageModel.apply` is a pure function of an explicit params pytree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mla_jax.config import ModelConfig
from mla_jax.layers.attention import GQA
from mla_jax.layers.common import Dense, RMSNorm, compute_dtype, matmul, param_role
from mla_jax.layers.mamba2 import Mamba2Mixer, mamba2_flops_per_token
from mla_jax.layers.mla import MLA
from mla_jax.layers.mlp import SwiGLU
from mla_jax.layers.moe import MoE
from mla_jax.pytree import path_names

ACTIVATION_AXES = ("batch", "activation_length", "activation_embed")


def _mixer(kind: str):
  if kind == "mla":
    return MLA
  if kind == "gqa":
    return GQA
  return Mamba2Mixer


def _residual(cfg: ModelConfig, y_BTD: jax.Array) -> jax.Array:
  """A branch output as it joins the residual stream: times residual_multiplier (skipped at 1)."""
  return y_BTD if cfg.residual_multiplier == 1.0 else y_BTD * cfg.residual_multiplier


class Block(nn.Module):
  """One residual layer. Returns (x, new_cache, aux) where aux holds the MoE statistics (or {})."""

  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(
    self, x_BTD: jax.Array, positions_BT: jax.Array, cache: Any | None = None, segment_ids_BT: jax.Array | None = None
  ):
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    kind = cfg.mixer_kind(self.layer)
    h_BTD = RMSNorm(cfg.rms_norm_eps, dtype, name="mixer_norm")(x_BTD)
    y_BTD, new_cache = _mixer(kind)(cfg, name=kind)(h_BTD, positions_BT, cache, segment_ids_BT=segment_ids_BT)
    x_BTD = nn.with_logical_constraint(x_BTD + _residual(cfg, y_BTD), ACTIVATION_AXES)
    aux = {}
    ffn = cfg.ffn_kind(self.layer)
    if ffn is not None:
      h_BTD = RMSNorm(cfg.rms_norm_eps, dtype, name="ffn_norm")(x_BTD)
      if ffn == "moe":
        y_BTD, aux = MoE(cfg, name="moe")(h_BTD)
      else:
        y_BTD = SwiGLU(cfg, name="mlp")(h_BTD)
      x_BTD = nn.with_logical_constraint(x_BTD + _residual(cfg, y_BTD), ACTIVATION_AXES)
    return x_BTD, new_cache, aux


def remat_policy(name: str):
  """The jax.checkpoint policy of a concrete `model.remat` value (None for none/auto: no remat).

  dots: matmul outputs without batch dimensions (the projections) are saved; attention scores and
  probabilities (batched dots) and elementwise work are recomputed. full: nothing is saved but the input.
  """
  if name in ("none", "auto"):
    return None
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  raise ValueError(f"unknown model.remat {name!r}")


def _rematted(module_cls, cfg: ModelConfig, scanned: bool):
  """module_cls wrapped in nn.remat under cfg.remat (unchanged for none/auto). Module names, and so
  parameter paths, stay the same. Inside nn.scan the loop already keeps XLA from merging the
  recomputation back into the forward pass, so prevent_cse is off there (as jax.checkpoint advises)."""
  policy = remat_policy(cfg.remat)
  if policy is None:
    return module_cls
  return nn.remat(module_cls, policy=policy, prevent_cse=not scanned)


class SuperBlock(nn.Module):
  """`period` consecutive blocks: the body that `nn.scan` repeats when cfg.scan_layers is set."""

  cfg: ModelConfig
  period: int

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None):
    auxes = []
    for j in range(self.period):
      x_BTD, _, aux = Block(self.cfg, j, name=f"layer_{j}")(x_BTD, positions_BT, None, segment_ids_BT)
      auxes.append(aux)
    return x_BTD, auxes


def scanned_blocks(
  cfg: ModelConfig, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None
) -> tuple[jax.Array, list[dict]]:
  """Runs the stack as nn.scan over its repeating super-block (params stacked on a leading 'layers'
  axis), so the compiled program holds one super-block whatever the depth. Returns per-layer MoE aux."""
  period = cfg.scan_period
  repeats = cfg.num_layers // period
  body = _rematted(SuperBlock, cfg, scanned=True)
  scan = nn.scan(
    body,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast, nn.broadcast),
    length=repeats,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  x_BTD, auxes = scan(cfg, period, name="layers")(x_BTD, positions_BT, segment_ids_BT)
  layer_aux = [
    jax.tree_util.tree_map(lambda a, r=r: a[r], auxes[j]) for r in range(repeats) for j in range(period) if auxes[j]
  ]
  return x_BTD, layer_aux


class LanguageModel(nn.Module):
  """tokens [B, T] -> (logits [B, T, V] float32, aux, new_caches).

  `positions_BT` defaults to 0..T-1. `caches` (one entry per layer, see mla_jax.cache) switches the
  mixers to incremental decoding; without it the whole sequence is processed at once. Packed rows
  (several documents per row, mla_jax.data.packing) pass `segment_ids_BT` [B, T], one id per document,
  with positions restarting at 0 in each: attention stays inside a document and Mamba2's conv window
  and state restart at each document start (not with caches: a cache holds one document per row). With
  `return_hidden` the first output is the final-normed hidden states [B, T, D] in the compute dtype, divided by
  logits_scaling, instead of the logits (the LM head is not applied; `lm_head_weight` gives its weight), for a loss
  that applies the head chunk by chunk (mla_jax.ops.cross_entropy). With `last_logits_only` the logits are the
  last position's alone, [B, 1, V] (a prefill that samples the next token needs no others).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    caches: list | None = None,
    return_hidden: bool = False,
    segment_ids_BT: jax.Array | None = None,
    last_logits_only: bool = False,
  ):
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    B, T = tokens_BT.shape
    if segment_ids_BT is not None and caches is not None:
      raise ValueError("segment ids are for packed rows without caches (a cache holds one document per row)")
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    embed_std = cfg.hidden_size**-0.5 if cfg.tie_embeddings else 1.0
    embedding_VD = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(embed_std), ("vocab", "embed")),
      (cfg.vocab_size, cfg.hidden_size),
      jnp.float32,
    )
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
    if cfg.embedding_multiplier != 1.0:
      x_BTD = x_BTD * cfg.embedding_multiplier
    x_BTD = nn.with_logical_constraint(x_BTD.astype(dtype), ACTIVATION_AXES)
    new_caches, layer_aux = [], []
    if cfg.scan_layers:
      if caches is not None:
        raise ValueError("decoding with caches needs unscanned layers: set model.scan_layers=False")
      x_BTD, layer_aux = scanned_blocks(cfg, x_BTD, positions_BT, segment_ids_BT)
    # Decoding with caches never differentiates, so it runs the plain blocks.
    block_cls = Block if caches is not None else _rematted(Block, cfg, scanned=False)
    for i in range(0 if cfg.scan_layers else cfg.num_layers):
      x_BTD, new_cache, aux = block_cls(cfg, i, name=f"layer_{i}")(
        x_BTD, positions_BT, None if caches is None else caches[i], segment_ids_BT
      )
      new_caches.append(new_cache)
      if aux:
        layer_aux.append(aux)
    x_BTD = RMSNorm(cfg.rms_norm_eps, dtype, name="final_norm")(x_BTD)
    if return_hidden:
      if cfg.logits_scaling != 1.0:  # logits / s = (x / s) W, for a loss that applies the head itself
        x_BTD = (x_BTD.astype(jnp.float32) / cfg.logits_scaling).astype(dtype)
      x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
      return x_BTD, merge_moe_aux(layer_aux), (new_caches if caches is not None else None)
    if last_logits_only:  # a prefill samples from the last position only: the head runs on one row
      x_BTD = x_BTD[:, -1:]
    if cfg.tie_embeddings:
      logits_BTV = matmul(x_BTD, embedding_VD.astype(dtype).T)
    else:
      logits_BTV = Dense(cfg.vocab_size, ("embed", "vocab"), dtype=dtype, name="lm_head")(x_BTD)
    logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "activation_length", "activation_vocab"))
    logits_BTV = logits_BTV.astype(jnp.float32)
    if cfg.logits_scaling != 1.0:
      logits_BTV = logits_BTV / cfg.logits_scaling
    return logits_BTV, merge_moe_aux(layer_aux), (new_caches if caches is not None else None)


def lm_head_weight(cfg: ModelConfig, params) -> jax.Array:
  """The LM head's float32 weight [D, V]: `lm_head/kernel`, or the transposed embedding when tied."""
  return params["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]


def merge_moe_aux(layer_aux: list[dict]) -> dict:
  """Averages the MoE losses over MoE layers and stacks the per-layer statistics ({} without MoE)."""
  if not layer_aux:
    return {}
  return {
    "load_balance": jnp.mean(jnp.stack([a["load_balance"] for a in layer_aux])),
    "router_z": jnp.mean(jnp.stack([a["router_z"] for a in layer_aux])),
    "dropped_fraction": jnp.mean(jnp.stack([a["dropped_fraction"] for a in layer_aux])),
    "load": jnp.stack([a["load"] for a in layer_aux]),  # [moe_layers, E]
  }


def abstract_variables(cfg: ModelConfig, seq_len: int = 8) -> tuple[dict, dict, dict]:
  """(params, their logical PartitionSpecs, the other collections), all as ShapeDtypeStructs from
  `jax.eval_shape` of `LanguageModel(cfg).init`: nothing is computed or allocated."""
  tokens = jax.ShapeDtypeStruct((1, min(seq_len, cfg.max_seq_len)), jnp.int32)
  boxed = jax.eval_shape(LanguageModel(cfg).init, jax.random.PRNGKey(0), tokens)
  specs = nn.get_partition_spec(boxed)["params"]
  variables = nn.meta.unbox(boxed)
  return variables["params"], specs, {k: v for k, v in variables.items() if k != "params"}


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
  """Returns (params, logical_specs): unboxed float32 params and their logical PartitionSpecs."""
  model = LanguageModel(cfg)
  tokens = jnp.zeros((1, min(seq_len, cfg.max_seq_len)), jnp.int32)
  variables = jax.jit(model.init)(rng, tokens)
  specs = nn.get_partition_spec(variables)
  return nn.meta.unbox(variables["params"]), specs["params"]


def forward(cfg, params, token_ids) -> jax.Array:
  """Plain forward pass: float32 logits of shape [batch, length, vocab].

  `cfg` is a ModelConfig or the ConfigDict that `mla_jax.convert.from_hf` / `from_seed` return.
  """
  if not isinstance(cfg, ModelConfig):
    cfg = ModelConfig.from_config(cfg)
  logits, _, _ = LanguageModel(cfg).apply({"params": params}, jnp.asarray(token_ids, jnp.int32))
  return logits


def count_params(cfg: ModelConfig, params) -> dict[str, int]:
  """Total, active-per-token (MoE: k routed + shared experts) and per-kind parameter counts.

  "vectors" counts the parameters that are not matmul weights (norm scales, biases, Mamba2's A_log, D and
  dt_bias), by role (`layers.common.param_role`), so stacked (scanned) layers count the same."""
  counts: dict[str, int] = {"total": 0, "active": 0, "vectors": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = path_names(path)
    n = int(np.prod(leaf.shape))
    kind = next((k for k in ("mla", "gqa", "mamba2", "moe", "mlp") if k in names), None)
    if kind is None:
      kind = "embedding" if "embedding" in names else "lm_head" if "lm_head" in names else "norm"
    counts[kind] = counts.get(kind, 0) + n
    counts["total"] += n
    active = n
    if kind == "moe" and names[-1] in ("w_gate", "w_up", "w_down"):
      active = n * cfg.experts_per_tok // cfg.num_experts
    counts["active"] += active
    if param_role(path) in ("norm", "vector"):
      counts["vectors"] += n
  return counts


def flops_per_token(cfg: ModelConfig, params, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token: 6 x active matmul params (embedding lookup excluded, LM head included)
  plus causal attention (QK^T and AV over T/2 keys on average, x3 for backward) plus the SSD scan."""
  counts = count_params(cfg, params)
  matmul = counts["active"] - counts.get("embedding", 0) - counts["vectors"]
  if cfg.tie_embeddings:
    matmul += cfg.vocab_size * cfg.hidden_size
  attn = 0.0
  ssd = 0.0
  for layer in range(cfg.num_layers):
    kind = cfg.mixer_kind(layer)
    if kind == "mla":
      attn += 3 * 2 * cfg.num_heads * (cfg.head_dim + cfg.d_rope + cfg.v_head_dim) * seq_len / 2
    elif kind == "gqa":
      attn += 3 * 2 * cfg.num_heads * 2 * cfg.head_dim * seq_len / 2
    else:
      ssd += 3 * mamba2_flops_per_token(cfg, seq_len)
  return {"matmul": 6.0 * matmul, "attention": attn, "ssd": ssd, "total": 6.0 * matmul + attn + ssd}
