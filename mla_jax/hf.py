r"""Hugging Face DeepSeek-V2/V3 and Mamba2 checkpoints to and from mla_jax config and parameters.

`from_hf(path)` reads a folder with `config.json` and `*.safetensors` (sharded with
`model.safetensors.index.json` or not) and returns (config, params): a validated ConfigDict and the
parameter tree of `mla_jax.model.LanguageModel`. `to_hf(config, params, path)` writes the inverse: MLA models as
`deepseek_v2` (the format whose softmax top-k routing is ours), Mamba2-only models as `mamba2`, in float32.
Each format has one name table (HF tensors <-> our parameters, with the transform between them) that both
directions use, and one table of config.json keys with a model key of the same meaning.

Exact, or refused with a ConfigError naming the feature: RoPE scaling (YaRN and every other rope_type),
sigmoid expert scores (every DeepSeek-V3 MoE layer, and `scoring_func` other than softmax), `topk_method`
other than greedy, group-limited routing (n_group > 1), `routed_scaling_factor` != 1, top-k
renormalisation (transformers' DeepSeek-V2 router ignores `norm_topk_prob`; the reference code applies
it), attention or MLP biases, activations other than SiLU, `rms_norm_eps` != 1e-6 (transformers fixes the
q/kv latent norms at 1e-6 while ours share the model's eps), and `num_key_value_heads` != heads.
DeepSeek-V3 multi-token-prediction layers (indices >= num_hidden_layers) are skipped.

Mamba2: in_proj splits as [z | xBC | dt] in both, the gated norm is RMSNorm(y * silu(z)) over n_groups
groups of intermediate / n_groups, and one eps (`layer_norm_epsilon`) serves every norm, as ours does.
Refused: `use_conv_bias=False`, `use_bias=True`, `time_step_limit` other than (0, inf), activations other
than SiLU, and an in_proj wider than 2 I + 2 G N + H (extra MLP channels). `residual_in_fp32` changes
nothing in float32, where the comparison runs.

RoPE: DeepSeek rotates interleaved pairs (x_2i, x_2i+1) by frequency i (transformers' DeepSeek-V2 always;
V3 when `rope_interleave`), ours rotates (x_i, x_i+d/2). Importing permutes the rope columns of the query
projection (per head) and of the k_rope part of `kv_a_proj_with_mqa` to [even | odd]; q.k is unchanged
because both sides move together. Exporting applies the inverse.

The tests against transformers (tests/test_convert.py) need torch and transformers, which are not in the
test extra; install them (CPU torch) to run those tests, which are skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from mla_jax import cli, pytree
from mla_jax import config as config_lib
from mla_jax.errors import ConfigError, DataError, UserError
from mla_jax.model import abstract_variables
from mla_jax.safetensors_io import Tensors, linear, read_folder, write_file

_DEEPSEEK = ("deepseek_v2", "deepseek_v3")
_SUPPORTED = _DEEPSEEK + ("mamba2",)
_MTP_LAYERS = 8  # DeepSeek-V3 multi-token-prediction layers follow the model's; at most this many are skipped


def interleaved_to_half(d: int) -> np.ndarray:
  """Column order that takes an interleaved-pair rope vector to the rotate-half layout: [0,2,..,1,3,..]."""
  return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])


# ------------------------------------------------------------------------------------------ name tables


@dataclasses.dataclass(frozen=True)
class Entry:
  """HF tensors <-> our parameters (paths as `pytree.path_str` writes them): `load` takes the HF arrays to
  ours, `save` is its exact inverse."""

  hf: tuple[str, ...]
  ours: tuple[str, ...]
  load: Callable[..., tuple[np.ndarray, ...]]
  save: Callable[..., tuple[np.ndarray, ...]]


def _same(hf: str, ours: str) -> Entry:
  return Entry((hf,), (ours,), lambda x: (x,), lambda x: (x,))


def _kernel(
  hf: str, ours: str, shape: tuple[int, ...] | None = None, n_in: int = 1, cols: np.ndarray | None = None
) -> Entry:
  """A Linear weight [out, in] as our kernel [in, out], reshaped to `shape` (its first `n_in` axes make
  `in`) and its last axis permuted by `cols`."""
  inv = None if cols is None else np.argsort(cols)

  def load(w_OI):
    k = linear(w_OI)
    k = k if shape is None else k.reshape(shape)
    return (k if cols is None else k[..., cols],)

  def save(k):
    k = k if inv is None else k[..., inv]
    return (linear(k.reshape(math.prod(k.shape[:n_in]), -1)),)

  return Entry((hf,), (ours,), load, save)


def _stacked(hf: list[str], ours: str) -> Entry:
  """One Linear weight per expert as our stacked [E, in, out] kernel."""
  return Entry(
    tuple(hf), (ours,), lambda *ws: (np.stack([linear(w) for w in ws]),), lambda k_EIO: tuple(linear(k) for k in k_EIO)
  )


def _fused_experts(gate_up: str, down: str, ours: tuple[str, str, str]) -> Entry:
  """transformers' fused experts: gate_up_proj [E, 2F, D] = [gate | up] and down_proj [E, D, F]."""

  def load(gate_up_EFD, down_EDF):
    F = gate_up_EFD.shape[1] // 2
    t = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1))
    return t(gate_up_EFD[:, :F]), t(gate_up_EFD[:, F:]), t(down_EDF)

  def save(gate_EDF, up_EDF, down_EFD):
    return np.concatenate([gate_EDF, up_EDF], -1).transpose(0, 2, 1), down_EFD.transpose(0, 2, 1)

  return Entry((gate_up, down), ours, load, save)


def _kv_b(hf: str, ours: tuple[str, str], C: int, H: int, Dn: int) -> Entry:
  """kv_b_proj [H (Dn + Dv), C] as w_uk [C, H, Dn] and w_uv [C, H, Dv]."""

  def load(w):
    kv_b_CHK = linear(w).reshape(C, H, -1)
    return np.ascontiguousarray(kv_b_CHK[..., :Dn]), np.ascontiguousarray(kv_b_CHK[..., Dn:])

  def save(uk_CHK, uv_CHV):
    return (linear(np.concatenate([uk_CHK, uv_CHV], axis=-1).reshape(C, -1)),)

  return Entry((hf,), ours, load, save)


def _swiglu(hf: str, ours: str, experts: int | None = None) -> list[Entry]:
  """gate/up/down projections under prefix `hf` (`hf`experts.j.* when stacked over `experts`)."""
  if experts is None:
    return [_kernel(f"{hf}{name}_proj.weight", f"{ours}{name}/kernel") for name in ("gate", "up", "down")]
  return [
    _stacked([f"{hf}experts.{j}.{theirs}.weight" for j in range(experts)], ours + name)
    for name, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))
  ]


def _head(cfg: config_lib.ModelConfig, embedding: str, norm: str) -> list[Entry]:
  table = [_same(embedding, "embedding"), _same(norm, "final_norm/scale")]
  if not cfg.tie_embeddings:
    table.append(_kernel("lm_head.weight", "lm_head/kernel"))
  return table


def deepseek_table(
  cfg: config_lib.ModelConfig, interleaved: bool = True, fused: Callable[[str], bool] = lambda prefix: False
) -> list[Entry]:
  """The DeepSeek-V2/V3 name table. `interleaved`: the checkpoint rotates interleaved rope pairs;
  `fused(prefix)`: the MoE layer under `prefix` holds fused experts (as newer transformers save them)."""
  H, Dn, Dr, Dv, C, D = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.v_head_dim, cfg.kv_latent_dim, cfg.hidden_size
  perm = interleaved_to_half(Dr) if interleaved else np.arange(Dr)
  q_cols = np.concatenate([np.arange(Dn), Dn + perm])
  kv_cols = np.concatenate([np.arange(C), C + perm])
  table = _head(cfg, "model.embed_tokens.weight", "model.norm.weight")
  for i in range(cfg.num_layers):
    p, o = f"model.layers.{i}.", f"layer_{i}/"
    a, m = p + "self_attn.", o + "mla/"
    if cfg.q_latent_dim:
      table += [
        _kernel(a + "q_a_proj.weight", m + "w_dq/kernel"),
        _same(a + "q_a_layernorm.weight", m + "q_norm/scale"),
        _kernel(a + "q_b_proj.weight", m + "w_uq/kernel", (cfg.q_latent_dim, H, Dn + Dr), cols=q_cols),
      ]
    else:
      table.append(_kernel(a + "q_proj.weight", m + "w_q/kernel", (D, H, Dn + Dr), cols=q_cols))
    table += [
      _kernel(a + "kv_a_proj_with_mqa.weight", m + "w_dkv/kernel", cols=kv_cols),
      _same(a + "kv_a_layernorm.weight", m + "kv_norm/scale"),
      _kv_b(a + "kv_b_proj.weight", (m + "w_uk/kernel", m + "w_uv/kernel"), C, H, Dn),
      _kernel(a + "o_proj.weight", m + "w_o/kernel", (H, Dv, D), n_in=2),
      _same(p + "input_layernorm.weight", o + "mixer_norm/scale"),
      _same(p + "post_attention_layernorm.weight", o + "ffn_norm/scale"),
    ]
    f = p + "mlp."
    if cfg.ffn_kind(i) != "moe":
      table += _swiglu(f, o + "mlp/")
      continue
    table.append(_kernel(f + "gate.weight", o + "moe/router/kernel"))
    if fused(f):
      table.append(
        _fused_experts(
          f + "experts.gate_up_proj", f + "experts.down_proj", (o + "moe/w_gate", o + "moe/w_up", o + "moe/w_down")
        )
      )
    else:
      table += _swiglu(f, o + "moe/", cfg.num_experts)
    if cfg.shared_expert_enabled and cfg.num_shared_experts:
      table += [
        _kernel(f"{f}shared_experts.{theirs}.weight", f"{o}moe/shared_{name}/kernel")
        for name, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
      ]
  return table


def mamba2_table(cfg: config_lib.ModelConfig) -> list[Entry]:
  """The transformers Mamba2 name table; loading refuses an in_proj with extra MLP channels."""
  inner, g, n, h = cfg.mamba2_inner, cfg.mamba2_n_groups, cfg.mamba2_state_size, cfg.mamba2_num_heads
  width = 2 * inner + 2 * g * n + h
  table = _head(cfg, "backbone.embeddings.weight", "backbone.norm_f.weight")
  for i in range(cfg.num_layers):
    p, o = f"backbone.layers.{i}.", f"layer_{i}/"
    x, m = p + "mixer.", o + "mamba2/"

    def in_proj(w, i=i):
      if w.shape[0] != width:
        _refuse(
          "in_proj",
          f"layer {i} in_proj has {w.shape[0]} outputs, not 2I + 2GN + H = {width} (extra MLP "
          "channels are not supported)",
        )
      return (linear(w),)

    table += [
      Entry((x + "in_proj.weight",), (m + "in_proj/kernel",), in_proj, lambda k: (linear(k),)),
      _same(p + "norm.weight", o + "mixer_norm/scale"),
      Entry(
        (x + "conv1d.weight",),
        (m + "conv_kernel",),
        lambda w: (np.ascontiguousarray(w[:, 0, :].T),),
        lambda k: (k.T[:, None, :],),
      ),
      _same(x + "conv1d.bias", m + "conv_bias"),
      *[_same(x + name, m + name) for name in ("dt_bias", "A_log", "D")],
      _same(x + "norm.weight", m + "norm_scale"),
      _kernel(x + "out_proj.weight", m + "out_proj/kernel"),
    ]
  return table


def _load(table: list[Entry], t: Tensors) -> dict:
  """Our parameter tree from the tensors the table names."""
  flat = {}
  for entry in table:
    arrays = [t.take(name) for name in entry.hf]
    try:
      values = entry.load(*arrays)
    except UserError:
      raise
    except ValueError as e:  # a reshape or stack that the tensors' shapes do not fit
      shapes = sorted({a.shape for a in arrays})
      names = entry.hf[0] if len(entry.hf) == 1 else f"{entry.hf[0]} .. {entry.hf[-1]}"
      raise DataError(
        f"{t.path}: tensor {names} has shape {', '.join(map(str, shapes))}, which does not fit "
        f"{entry.ours[0]} ({cli.one_line(e)})"
      ) from e
    flat.update(zip(entry.ours, values, strict=True))
  params = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return params


def _dump(table: list[Entry], params: dict) -> dict[str, np.ndarray]:
  """The HF tensors the table names, from our (numpy) parameter tree."""
  flat = pytree.flatten(params)
  out = {}
  for entry in table:
    out.update(zip(entry.hf, entry.save(*(flat[name] for name in entry.ours)), strict=True))
  return out


# ------------------------------------------------------------------------------------------ config.json


class _Key(NamedTuple):
  """A config.json key with a model key of the same meaning; `default` None: required."""

  hf: str
  ours: str
  default: Any = None
  cast: Callable[[Any], Any] = lambda v: v


_DEEPSEEK_KEYS = (
  _Key("vocab_size", "vocab_size"),
  _Key("hidden_size", "hidden_size"),
  _Key("num_hidden_layers", "num_layers"),
  _Key("num_attention_heads", "num_heads"),
  _Key("qk_nope_head_dim", "head_dim"),
  _Key("v_head_dim", "v_head_dim"),
  _Key("qk_rope_head_dim", "d_rope"),
  _Key("kv_lora_rank", "kv_latent_dim"),
  _Key("intermediate_size", "intermediate_size"),
  _Key("max_position_embeddings", "max_seq_len", 2048),
  _Key("rms_norm_eps", "rms_norm_eps", 1e-6, float),
  _Key("tie_word_embeddings", "tie_embeddings", False, bool),
)
_MAMBA2_KEYS = (
  _Key("vocab_size", "vocab_size"),
  _Key("hidden_size", "hidden_size"),
  _Key("num_hidden_layers", "num_layers"),
  _Key("num_heads", "mamba2_num_heads"),
  _Key("head_dim", "mamba2_head_dim"),
  _Key("state_size", "mamba2_state_size"),
  _Key("n_groups", "mamba2_n_groups"),
  _Key("conv_kernel", "mamba2_conv_kernel"),
  _Key("expand", "mamba2_expand", 2),
  _Key("chunk_size", "mamba2_chunk_size", 256),
  _Key("layer_norm_epsilon", "rms_norm_eps", 1e-5, float),
  _Key("tie_word_embeddings", "tie_embeddings", False, bool),
)


def _refuse(key: str, why: str) -> None:
  raise ConfigError(f"hf.{key}", why)


def _require(hf: dict, keys: tuple[_Key, ...], where: str) -> None:
  for k in keys:
    if k.default is None and k.hf not in hf:
      _refuse(k.hf, f"is required and missing from {where}")


def _read_keys(hf: dict, keys: tuple[_Key, ...], m: ml_collections.ConfigDict) -> None:
  for k in keys:
    m[k.ours] = k.cast(hf.get(k.hf, k.default))


def _write_keys(cfg: config_lib.ModelConfig, keys: tuple[_Key, ...]) -> dict:
  return {k.hf: getattr(cfg, k.ours) for k in keys}


def _check_deepseek(hf: dict) -> None:
  """Raises ConfigError for every feature our model would only approximate."""
  model_type = hf.get("model_type")
  rope = hf.get("rope_parameters") or {}
  if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
    _refuse("rope_scaling", "RoPE scaling (YaRN or any rope_type other than default) is not supported")
  if hf.get("attention_bias"):
    _refuse("attention_bias", "attention biases are not supported")
  if hf.get("mlp_bias"):
    _refuse("mlp_bias", "MLP biases are not supported")
  if hf.get("hidden_act", "silu") != "silu":
    _refuse("hidden_act", f"only silu is supported, got {hf['hidden_act']!r}")
  if float(hf.get("rms_norm_eps", 1e-6)) != 1e-6:
    _refuse("rms_norm_eps", "must be 1e-6: the q/kv latent norms use 1e-6 in the reference, ours share the model's eps")
  heads = hf["num_attention_heads"]
  if hf.get("num_key_value_heads") not in (None, heads):
    _refuse("num_key_value_heads", f"must equal num_attention_heads={heads} for MLA")
  if not hf.get("kv_lora_rank"):
    _refuse("kv_lora_rank", "must be positive (MLA)")
  layers = hf["num_hidden_layers"]
  experts = hf.get("n_routed_experts") or 0
  first_dense = min(hf.get("first_k_dense_replace") or 0, layers)
  if not experts or first_dense >= layers:
    return
  if hf.get("moe_layer_freq", 1) != 1:
    _refuse("moe_layer_freq", "must be 1 (every layer after first_k_dense_replace is MoE)")
  if model_type == "deepseek_v3" or hf.get("scoring_func", "softmax") != "softmax":
    _refuse(
      "scoring_func", "sigmoid expert scores (DeepSeek-V3 routing) are not supported: the router here is a softmax"
    )
  if hf.get("topk_method", "greedy") != "greedy":
    _refuse("topk_method", f"only greedy top-k is supported, got {hf['topk_method']!r}")
  if (hf.get("n_group") or 1) > 1 or (hf.get("topk_group") or 1) > 1:
    _refuse("n_group", "group-limited routing is not supported")
  if float(hf.get("routed_scaling_factor", 1.0)) != 1.0:
    _refuse("routed_scaling_factor", "must be 1")
  if hf.get("norm_topk_prob"):
    _refuse(
      "norm_topk_prob",
      "top-k renormalisation is not supported for deepseek_v2 (transformers' router "
      "ignores it while the reference code applies it)",
    )


def deepseek_config(hf: dict) -> ml_collections.ConfigDict:
  """Our config for a DeepSeek-V2/V3 config.json (after `_check_deepseek`)."""
  c = config_lib.default_config()
  m = c.model
  _read_keys(hf, _DEEPSEEK_KEYS, m)
  layers = hf["num_hidden_layers"]
  experts = hf.get("n_routed_experts") or 0
  first_dense = min(hf.get("first_k_dense_replace") or 0, layers)
  rope = hf.get("rope_parameters") or {}
  m.name = hf.get("model_type", "deepseek")
  m.q_latent_dim = hf.get("q_lora_rank") or 0
  m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if experts and first_dense < layers:
    m.num_experts = experts
    m.experts_per_tok = hf["num_experts_per_tok"]
    m.moe_intermediate_size = hf["moe_intermediate_size"]
    m.first_dense_layers = first_dense
    m.num_shared_experts = hf.get("n_shared_experts") or 0
    m.shared_expert_enabled = m.num_shared_experts > 0
    if not m.shared_expert_enabled:
      m.num_shared_experts = 1  # unused; keeps validation's positivity rule
    m.norm_topk_prob = False
  c.trainer.seq_len = min(c.trainer.seq_len, m.max_seq_len)
  return c


def _deepseek_hf_config(cfg: config_lib.ModelConfig) -> dict:
  """The deepseek_v2 config.json of an MLA model (after `to_hf`'s refusals)."""
  moe = cfg.num_experts > 0
  return {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    **_write_keys(cfg, _DEEPSEEK_KEYS),
    "num_key_value_heads": cfg.num_heads,
    "q_lora_rank": cfg.q_latent_dim or None,
    "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
    "n_routed_experts": cfg.num_experts if moe else 0,
    "num_experts_per_tok": cfg.experts_per_tok if moe else None,
    "moe_intermediate_size": cfg.moe_intermediate_size,
    "first_k_dense_replace": cfg.first_dense_layers if moe else cfg.num_layers,
    "n_shared_experts": cfg.num_shared_experts if cfg.shared_expert_enabled else 0,
    "topk_method": "greedy",
    "n_group": None,
    "topk_group": None,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": False,
  }


def _json_float(value) -> float:
  """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
  return float(value["__float__"] if isinstance(value, dict) else value)


def _check_mamba2(hf: dict) -> None:
  if not hf.get("use_conv_bias", True):
    _refuse("use_conv_bias", "must be true (the mixer here always has a conv bias)")
  if hf.get("use_bias", False):
    _refuse("use_bias", "in_proj/out_proj biases are not supported")
  if hf.get("hidden_act", "silu") != "silu":
    _refuse("hidden_act", f"only silu is supported, got {hf['hidden_act']!r}")
  limit = [_json_float(v) for v in hf.get("time_step_limit") or (0.0, float("inf"))]
  if limit != [0.0, float("inf")]:
    _refuse("time_step_limit", f"must be (0, inf), got {limit}")
  if hf["hidden_size"] * hf.get("expand", 2) != hf["num_heads"] * hf["head_dim"]:
    _refuse("head_dim", "num_heads * head_dim must equal hidden_size * expand")


def mamba2_config(hf: dict) -> ml_collections.ConfigDict:
  """Our config for a transformers Mamba2 config.json (after `_check_mamba2`)."""
  c = config_lib.default_config()
  m = c.model
  _read_keys(hf, _MAMBA2_KEYS, m)
  m.name = "mamba2"
  m.num_heads = 1  # attention settings are unused: every layer is Mamba2
  m.layer_pattern = "M" * m.num_layers
  m.max_seq_len = 2048
  c.trainer.seq_len = min(c.trainer.seq_len, m.max_seq_len)
  return c


def _mamba2_hf_config(cfg: config_lib.ModelConfig) -> dict:
  return {
    "architectures": ["Mamba2ForCausalLM"],
    "model_type": "mamba2",
    **_write_keys(cfg, _MAMBA2_KEYS),
    "use_bias": False,
    "use_conv_bias": True,
    "hidden_act": "silu",
    "residual_in_fp32": True,
    "torch_dtype": "float32",
    "time_step_min": cfg.mamba2_dt_min,
    "time_step_max": cfg.mamba2_dt_max,
    "time_step_floor": cfg.mamba2_dt_init_floor,
  }


# ------------------------------------------------------------------------------------------ the two directions


def from_hf(path: str):
  """(config, params) from a Hugging Face folder (config.json + safetensors)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise DataError(f"{path}: no config.json")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{config_path}: not readable JSON ({cli.one_line(e)})") from e
  model_type = hf.get("model_type") if isinstance(hf, dict) else None
  if model_type not in _SUPPORTED:
    raise UserError(f"{config_path}: model_type {model_type!r} is not supported (supported: {', '.join(_SUPPORTED)})")
  mamba2 = model_type == "mamba2"
  _require(hf, _MAMBA2_KEYS if mamba2 else _DEEPSEEK_KEYS, config_path)
  if mamba2:
    _check_mamba2(hf)
    config = mamba2_config(hf)
  else:
    _check_deepseek(hf)
    config = deepseek_config(hf)
  config_lib.validate(config)
  cfg = config_lib.ModelConfig.from_config(config)
  t = Tensors(read_folder(path), path)
  if mamba2:
    table, skip = mamba2_table(cfg), ()
  else:
    interleaved = model_type == "deepseek_v2" or hf.get("rope_interleave", True)
    table = deepseek_table(cfg, interleaved, fused=lambda prefix: t.has(prefix + "experts.gate_up_proj"))
    skip = tuple(f"model.layers.{i}." for i in range(cfg.num_layers, cfg.num_layers + _MTP_LAYERS))
  params = _load(table, t)
  if (
    cfg.tie_embeddings and t.has("lm_head.weight") and not np.array_equal(t.take("lm_head.weight"), params["embedding"])
  ):
    raise DataError(f"{t.path}: tie_word_embeddings is set but lm_head.weight differs from the embeddings")
  t.check_all_used(skip)
  pytree.check_shapes(
    params, abstract_variables(cfg)[0], path, DataError, found_in="the safetensors", wanted_in="config.json"
  )
  return config, params


def to_hf(config, params, path: str) -> None:
  """Writes config.json and model.safetensors (float32): deepseek_v2 for MLA models, mamba2 for Mamba2 ones."""
  config_lib.validate(config)
  cfg = config_lib.ModelConfig.from_config(config)
  if all(kind == "mamba" for kind in cfg.layer_kinds) and not cfg.mamba_ffn:
    table, hf = mamba2_table(cfg), _mamba2_hf_config(cfg)
  else:
    if "mamba" in cfg.layer_kinds or not cfg.use_mla:
      raise UserError("to_hf writes DeepSeek (every layer MLA) or Mamba2 (every layer Mamba2, no FFN) models only")
    if not cfg.mla_latent_norms or cfg.mla_q_rope_from_input:
      key = "mla_latent_norms" if not cfg.mla_latent_norms else "mla_q_rope_from_input"
      raise ConfigError(f"model.{key}", "the seed trainer's MLA variant has no deepseek_v2 equivalent")
    if cfg.aux_free_bias:
      raise ConfigError("model.aux_free_bias", "the selection bias has no place in a deepseek_v2 checkpoint")
    if cfg.num_experts > 0 and cfg.norm_topk_prob and cfg.experts_per_tok > 1:
      raise ConfigError("model.norm_topk_prob", "deepseek_v2 in transformers does not renormalise the top-k weights")
    table, hf = deepseek_table(cfg), _deepseek_hf_config(cfg)
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
  pytree.check_shapes(
    params, abstract_variables(cfg)[0], "to_hf", DataError, found_in="the params", wanted_in="the config"
  )
  os.makedirs(path, exist_ok=True)
  write_file(_dump(table, params), os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
    f.write("\n")
