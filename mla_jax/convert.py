r"""Hugging Face DeepSeek-V2/V3 and Mamba2 checkpoints to and from mla_jax parameters.

  python -m mla_jax.convert --hf=PATH --workdir=OUT
  python -m mla_jax.convert --seed=CHECKPOINT --seed_yaml=model.yaml --workdir=OUT   # mla_jax.seed_checkpoint

`from_hf(path)` reads a folder with `config.json` and `*.safetensors` (sharded with
`model.safetensors.index.json` or not) and returns (config, params): a validated ConfigDict and the
parameter tree of `mla_jax.model.LanguageModel`. `to_hf(config, params, path)` writes the inverse: MLA models as
`deepseek_v2` (the format whose softmax top-k routing is ours), Mamba2-only models as `mamba2`. The command writes a workdir whose step-0
checkpoint `mla_jax.generate` and `mla_jax.evaluate` load (and that training resumes from); a
`tokenizer.json` beside the weights is copied into it, otherwise the byte tokenizer is used.

Exact, or refused with a UserError naming the feature: RoPE scaling (YaRN and every other rope_type),
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

import glob
import json
import os
import shutil
import sys
from typing import Optional

import ml_collections
import numpy as np

from mla_jax import cli
from mla_jax import config as config_lib
from mla_jax.errors import ConfigError, DataError, UserError

_DEEPSEEK = ("deepseek_v2", "deepseek_v3")
_SUPPORTED = _DEEPSEEK + ("mamba2",)


def interleaved_to_half(d: int) -> np.ndarray:
  """Column order that takes an interleaved-pair rope vector to the rotate-half layout: [0,2,..,1,3,..]."""
  return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a folder (sharded via model.safetensors.index.json, or every *.safetensors file)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(path, name) for name in files]
  else:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise DataError(f"{path}: no *.safetensors files")
  tensors = {}
  for name in files:
    if not os.path.isfile(name):
      raise DataError(f"{name}: listed in the index but missing")
    tensors.update(read_safetensor_file(name))
  return tensors


def read_safetensor_file(name: str) -> dict[str, np.ndarray]:
  """The tensors of one safetensors file as float32 arrays, or a DataError naming the file."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  tensors = {}
  try:
    with safe_open(name, framework="np") as f:
      for key in f.keys():
        tensors[key] = np.asarray(f.get_tensor(key), np.float32)
  except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy cannot hold
    raise DataError(f"{name}: cannot read as float32 numpy arrays ({cli.one_line(e)}); save it in float32") from e
  except (SafetensorError, OSError) as e:
    raise DataError(f"{name}: not a readable safetensors file ({cli.one_line(e)})") from e
  return tensors


def _refuse(key: str, why: str) -> None:
  raise ConfigError(f"hf.{key}", why)


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
    _refuse("rms_norm_eps", "must be 1e-6: the q/kv latent norms use 1e-6 in the reference, ours share the "
            "model's eps")
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
    _refuse("scoring_func", "sigmoid expert scores (DeepSeek-V3 routing) are not supported: the router here "
            "is a softmax")
  if hf.get("topk_method", "greedy") != "greedy":
    _refuse("topk_method", f"only greedy top-k is supported, got {hf['topk_method']!r}")
  if (hf.get("n_group") or 1) > 1 or (hf.get("topk_group") or 1) > 1:
    _refuse("n_group", "group-limited routing is not supported")
  if float(hf.get("routed_scaling_factor", 1.0)) != 1.0:
    _refuse("routed_scaling_factor", "must be 1")
  if hf.get("norm_topk_prob"):
    _refuse("norm_topk_prob", "top-k renormalisation is not supported for deepseek_v2 (transformers' router "
            "ignores it while the reference code applies it)")


def deepseek_config(hf: dict) -> ml_collections.ConfigDict:
  """Our config for a DeepSeek-V2/V3 config.json (after `_check_deepseek`)."""
  c = config_lib.default_config()
  m = c.model
  layers = hf["num_hidden_layers"]
  experts = hf.get("n_routed_experts") or 0
  first_dense = min(hf.get("first_k_dense_replace") or 0, layers)
  rope = hf.get("rope_parameters") or {}
  m.name = hf.get("model_type", "deepseek")
  m.vocab_size = hf["vocab_size"]
  m.hidden_size = hf["hidden_size"]
  m.num_layers = layers
  m.num_heads = hf["num_attention_heads"]
  m.head_dim = hf["qk_nope_head_dim"]
  m.v_head_dim = hf["v_head_dim"]
  m.d_rope = hf["qk_rope_head_dim"]
  m.kv_latent_dim = hf["kv_lora_rank"]
  m.q_latent_dim = hf.get("q_lora_rank") or 0
  m.intermediate_size = hf["intermediate_size"]
  m.max_seq_len = hf.get("max_position_embeddings", 2048)
  m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  m.rms_norm_eps = float(hf.get("rms_norm_eps", 1e-6))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
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


class _Tensors:
  """HF tensors by name; `take` records use so that leftovers can be reported."""

  def __init__(self, tensors: dict[str, np.ndarray], path: str):
    self.tensors, self.path, self.used = tensors, path, set()

  def take(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise DataError(f"{self.path}: tensor {name} is missing")
    self.used.add(name)
    return self.tensors[name]

  def has(self, name: str) -> bool:
    return name in self.tensors

  def check_all_used(self, skip_prefixes: tuple[str, ...]) -> None:
    left = sorted(k for k in self.tensors if k not in self.used and not k.startswith(skip_prefixes))
    if left:
      raise DataError(f"{self.path}: {len(left)} tensors have no place in the model, first {left[0]}")


def _linear(w_OI: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w_OI.T)


def deepseek_params(hf: dict, t: _Tensors, cfg: config_lib.ModelConfig) -> dict:
  """Our parameter tree from DeepSeek tensors (torch Linear weights are [out, in])."""
  H, Dn, Dr, Dv, C = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.v_head_dim, cfg.kv_latent_dim
  interleaved = hf.get("model_type") == "deepseek_v2" or hf.get("rope_interleave", True)
  perm = interleaved_to_half(Dr) if interleaved else np.arange(Dr)
  q_cols = np.concatenate([np.arange(Dn), Dn + perm])
  kv_cols = np.concatenate([np.arange(C), C + perm])
  params = {"embedding": t.take("model.embed_tokens.weight"), "final_norm": {"scale": t.take("model.norm.weight")}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": _linear(t.take("lm_head.weight"))}
  elif t.has("lm_head.weight") and not np.array_equal(t.take("lm_head.weight"), params["embedding"]):
    raise DataError(f"{t.path}: tie_word_embeddings is set but lm_head.weight differs from the embeddings")
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    mla = {}
    if cfg.q_latent_dim:
      mla["w_dq"] = {"kernel": _linear(t.take(a + "q_a_proj.weight"))}
      mla["q_norm"] = {"scale": t.take(a + "q_a_layernorm.weight")}
      mla["w_uq"] = {"kernel": _linear(t.take(a + "q_b_proj.weight")).reshape(-1, H, Dn + Dr)[..., q_cols]}
    else:
      mla["w_q"] = {"kernel": _linear(t.take(a + "q_proj.weight")).reshape(-1, H, Dn + Dr)[..., q_cols]}
    mla["w_dkv"] = {"kernel": _linear(t.take(a + "kv_a_proj_with_mqa.weight"))[:, kv_cols]}
    mla["kv_norm"] = {"scale": t.take(a + "kv_a_layernorm.weight")}
    kv_b_CHK = _linear(t.take(a + "kv_b_proj.weight")).reshape(C, H, Dn + Dv)
    mla["w_uk"] = {"kernel": np.ascontiguousarray(kv_b_CHK[..., :Dn])}
    mla["w_uv"] = {"kernel": np.ascontiguousarray(kv_b_CHK[..., Dn:])}
    mla["w_o"] = {"kernel": _linear(t.take(a + "o_proj.weight")).reshape(H, Dv, -1)}
    layer = {"mixer_norm": {"scale": t.take(p + "input_layernorm.weight")},
             "ffn_norm": {"scale": t.take(p + "post_attention_layernorm.weight")}, "mla": mla}
    f = p + "mlp."
    if cfg.ffn_kind(i) == "moe":
      E = cfg.num_experts
      moe = {"router": {"kernel": _linear(t.take(f + "gate.weight"))}}
      if t.has(f + "experts.gate_up_proj"):  # fused [E, 2F, D] and [E, D, F]
        gate_up = t.take(f + "experts.gate_up_proj")
        F = gate_up.shape[1] // 2
        moe["w_gate"] = np.ascontiguousarray(gate_up[:, :F].transpose(0, 2, 1))
        moe["w_up"] = np.ascontiguousarray(gate_up[:, F:].transpose(0, 2, 1))
        moe["w_down"] = np.ascontiguousarray(t.take(f + "experts.down_proj").transpose(0, 2, 1))
      else:
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
          moe[ours] = np.stack([_linear(t.take(f"{f}experts.{j}.{theirs}.weight")) for j in range(E)])
      if cfg.shared_expert_enabled and cfg.num_shared_experts:
        for ours, theirs in (("shared_gate", "gate_proj"), ("shared_up", "up_proj"), ("shared_down", "down_proj")):
          moe[ours] = {"kernel": _linear(t.take(f"{f}shared_experts.{theirs}.weight"))}
      layer["moe"] = moe
    else:
      layer["mlp"] = {name: {"kernel": _linear(t.take(f"{f}{name}_proj.weight"))} for name in ("gate", "up", "down")}
    params[f"layer_{i}"] = layer
  mtp = tuple(f"model.layers.{i}." for i in range(cfg.num_layers, cfg.num_layers + 8))
  t.check_all_used(mtp)
  return params


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
  m.name = "mamba2"
  m.vocab_size = hf["vocab_size"]
  m.hidden_size = hf["hidden_size"]
  m.num_layers = hf["num_hidden_layers"]
  m.num_heads = 1  # attention settings are unused: every layer is Mamba2
  m.layer_pattern = "M" * m.num_layers
  m.mamba2_num_heads = hf["num_heads"]
  m.mamba2_head_dim = hf["head_dim"]
  m.mamba2_state_size = hf["state_size"]
  m.mamba2_n_groups = hf["n_groups"]
  m.mamba2_conv_kernel = hf["conv_kernel"]
  m.mamba2_expand = hf.get("expand", 2)
  m.mamba2_chunk_size = hf.get("chunk_size", 256)
  m.rms_norm_eps = float(hf.get("layer_norm_epsilon", 1e-5))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  m.max_seq_len = 2048
  c.trainer.seq_len = min(c.trainer.seq_len, m.max_seq_len)
  return c


def mamba2_params(t: _Tensors, cfg: config_lib.ModelConfig) -> dict:
  inner, g, n, h = cfg.mamba2_inner, cfg.mamba2_n_groups, cfg.mamba2_state_size, cfg.mamba2_num_heads
  params = {"embedding": t.take("backbone.embeddings.weight"), "final_norm": {"scale": t.take("backbone.norm_f.weight")}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": _linear(t.take("lm_head.weight"))}
  elif t.has("lm_head.weight") and not np.array_equal(t.take("lm_head.weight"), params["embedding"]):
    raise DataError(f"{t.path}: tie_word_embeddings is set but lm_head.weight differs from the embeddings")
  for i in range(cfg.num_layers):
    p = f"backbone.layers.{i}."
    x = p + "mixer."
    in_proj = t.take(x + "in_proj.weight")
    if in_proj.shape[0] != 2 * inner + 2 * g * n + h:
      _refuse("in_proj", f"layer {i} in_proj has {in_proj.shape[0]} outputs, not 2I + 2GN + H = "
              f"{2 * inner + 2 * g * n + h} (extra MLP channels are not supported)")
    params[f"layer_{i}"] = {
        "mixer_norm": {"scale": t.take(p + "norm.weight")},
        "mamba2": {
            "in_proj": {"kernel": _linear(in_proj)},
            "conv_kernel": np.ascontiguousarray(t.take(x + "conv1d.weight")[:, 0, :].T),
            "conv_bias": t.take(x + "conv1d.bias"),
            "dt_bias": t.take(x + "dt_bias"), "A_log": t.take(x + "A_log"), "D": t.take(x + "D"),
            "norm_scale": t.take(x + "norm.weight"),
            "out_proj": {"kernel": _linear(t.take(x + "out_proj.weight"))},
        }}
  t.check_all_used(())
  return params


def from_hf(path: str):
  """(config, params) from a Hugging Face folder (config.json + safetensors)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise DataError(f"{path}: no config.json")
  with open(config_path) as f:
    hf = json.load(f)
  model_type = hf.get("model_type")
  if model_type not in _SUPPORTED:
    raise UserError(f"{config_path}: model_type {model_type!r} is not supported (supported: {', '.join(_SUPPORTED)})")
  if model_type == "mamba2":
    _check_mamba2(hf)
    config = mamba2_config(hf)
  else:
    _check_deepseek(hf)
    config = deepseek_config(hf)
  config_lib.validate(config)
  cfg = config_lib.ModelConfig.from_config(config)
  tensors = _Tensors(read_safetensors(path), path)
  params = mamba2_params(tensors, cfg) if model_type == "mamba2" else deepseek_params(hf, tensors, cfg)
  _check_shapes(cfg, params, path)
  return config, params


def _check_shapes(cfg: config_lib.ModelConfig, params: dict, where: str) -> None:
  """Raises DataError naming the first tensor whose shape differs from the model's."""
  import jax  # pylint: disable=g-import-not-at-top
  from mla_jax.generate import abstract_variables  # pylint: disable=g-import-not-at-top
  target = abstract_variables(cfg)["params"]
  flat = lambda tree: {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = flat(target), flat(params)
  for name in sorted(set(want) | set(got)):
    if want.get(name) != got.get(name):
      raise DataError(f"{where}: {name} has shape {got.get(name)} but the config needs {want.get(name)}")


def to_hf(config, params, path: str) -> None:
  """Writes config.json and model.safetensors (float32): deepseek_v2 for MLA models, mamba2 for Mamba2 ones."""
  config_lib.validate(config)
  cfg = config_lib.ModelConfig.from_config(config)
  if all(kind == "mamba" for kind in cfg.layer_kinds) and not cfg.mamba_ffn:
    _save(_mamba2_hf(cfg, _numpy_tree(params)), path)
    return
  if "mamba" in cfg.layer_kinds or not cfg.use_mla:
    raise UserError("to_hf writes DeepSeek (every layer MLA) or Mamba2 (every layer Mamba2, no FFN) models only")
  if not cfg.mla_latent_norms or cfg.mla_q_rope_from_input:
    key = "mla_latent_norms" if not cfg.mla_latent_norms else "mla_q_rope_from_input"
    raise ConfigError(f"model.{key}", "the seed trainer's MLA variant has no deepseek_v2 equivalent")
  if cfg.aux_free_bias:
    raise ConfigError("model.aux_free_bias", "the selection bias has no place in a deepseek_v2 checkpoint")
  moe = cfg.num_experts > 0
  if moe and cfg.norm_topk_prob and cfg.experts_per_tok > 1:
    raise ConfigError("model.norm_topk_prob", "deepseek_v2 in transformers does not renormalise the top-k weights")
  H, Dn, Dr, Dv, C = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.v_head_dim, cfg.kv_latent_dim
  inv = np.argsort(interleaved_to_half(Dr))
  q_cols = np.concatenate([np.arange(Dn), Dn + inv])
  kv_cols = np.concatenate([np.arange(C), C + inv])
  p = _numpy_tree(params)
  out = {"model.embed_tokens.weight": p["embedding"], "model.norm.weight": p["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"]["kernel"].T
  for i in range(cfg.num_layers):
    layer, pre = p[f"layer_{i}"], f"model.layers.{i}."
    mla, a = layer["mla"], pre + "self_attn."
    if cfg.q_latent_dim:
      out[a + "q_a_proj.weight"] = mla["w_dq"]["kernel"].T
      out[a + "q_a_layernorm.weight"] = mla["q_norm"]["scale"]
      out[a + "q_b_proj.weight"] = mla["w_uq"]["kernel"][..., q_cols].reshape(cfg.q_latent_dim, -1).T
    else:
      out[a + "q_proj.weight"] = mla["w_q"]["kernel"][..., q_cols].reshape(cfg.hidden_size, -1).T
    out[a + "kv_a_proj_with_mqa.weight"] = mla["w_dkv"]["kernel"][:, kv_cols].T
    out[a + "kv_a_layernorm.weight"] = mla["kv_norm"]["scale"]
    kv_b = np.concatenate([mla["w_uk"]["kernel"], mla["w_uv"]["kernel"]], axis=-1).reshape(C, H * (Dn + Dv))
    out[a + "kv_b_proj.weight"] = kv_b.T
    out[a + "o_proj.weight"] = mla["w_o"]["kernel"].reshape(H * Dv, -1).T
    out[pre + "input_layernorm.weight"] = layer["mixer_norm"]["scale"]
    out[pre + "post_attention_layernorm.weight"] = layer["ffn_norm"]["scale"]
    f = pre + "mlp."
    if cfg.ffn_kind(i) == "moe":
      m = layer["moe"]
      out[f + "gate.weight"] = m["router"]["kernel"].T
      for j in range(cfg.num_experts):
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
          out[f"{f}experts.{j}.{theirs}.weight"] = m[ours][j].T
      if cfg.shared_expert_enabled and cfg.num_shared_experts:
        for ours, theirs in (("shared_gate", "gate_proj"), ("shared_up", "up_proj"), ("shared_down", "down_proj")):
          out[f"{f}shared_experts.{theirs}.weight"] = m[ours]["kernel"].T
    else:
      for name in ("gate", "up", "down"):
        out[f"{f}{name}_proj.weight"] = layer["mlp"][name]["kernel"].T
  hf = {
      "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": H, "num_key_value_heads": H, "qk_nope_head_dim": Dn, "qk_rope_head_dim": Dr,
      "v_head_dim": Dv, "kv_lora_rank": C, "q_lora_rank": cfg.q_latent_dim or None,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "torch_dtype": "float32",
      "n_routed_experts": cfg.num_experts if moe else 0, "num_experts_per_tok": cfg.experts_per_tok if moe else None,
      "moe_intermediate_size": cfg.moe_intermediate_size, "first_k_dense_replace": cfg.first_dense_layers if moe
      else cfg.num_layers, "n_shared_experts": cfg.num_shared_experts if cfg.shared_expert_enabled else 0,
      "topk_method": "greedy", "n_group": None, "topk_group": None, "routed_scaling_factor": 1.0,
      "norm_topk_prob": False,
  }
  _save((out, hf), path)


def _mamba2_hf(cfg: config_lib.ModelConfig, p: dict) -> tuple[dict, dict]:
  out = {"backbone.embeddings.weight": p["embedding"], "backbone.norm_f.weight": p["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"]["kernel"].T
  for i in range(cfg.num_layers):
    layer, pre = p[f"layer_{i}"], f"backbone.layers.{i}."
    m, x = layer["mamba2"], pre + "mixer."
    out[pre + "norm.weight"] = layer["mixer_norm"]["scale"]
    out[x + "in_proj.weight"] = m["in_proj"]["kernel"].T
    out[x + "conv1d.weight"] = m["conv_kernel"].T[:, None, :]
    out[x + "conv1d.bias"] = m["conv_bias"]
    for name in ("dt_bias", "A_log", "D"):
      out[x + name] = m[name]
    out[x + "norm.weight"] = m["norm_scale"]
    out[x + "out_proj.weight"] = m["out_proj"]["kernel"].T
  hf = {
      "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_heads": cfg.mamba2_num_heads,
      "head_dim": cfg.mamba2_head_dim, "state_size": cfg.mamba2_state_size, "n_groups": cfg.mamba2_n_groups,
      "conv_kernel": cfg.mamba2_conv_kernel, "expand": cfg.mamba2_expand, "chunk_size": cfg.mamba2_chunk_size,
      "layer_norm_epsilon": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "use_bias": False,
      "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True, "torch_dtype": "float32",
      "time_step_min": cfg.mamba2_dt_min, "time_step_max": cfg.mamba2_dt_max,
      "time_step_floor": cfg.mamba2_dt_init_floor,
  }
  return out, hf


def _save(tensors_and_config: tuple[dict, dict], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  out, hf = tensors_and_config
  os.makedirs(path, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
    f.write("\n")


def _numpy_tree(params):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def write_workdir(config, params, workdir: str, tokenizer_json: Optional[str] = None) -> None:
  """A step-0 checkpoint (params, fresh optimizer state, the config) that generate/evaluate/train load."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mla_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mla_jax.data import load_tokenizer  # pylint: disable=g-import-not-at-top
  from mla_jax.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from mla_jax.train_step import TrainState  # pylint: disable=g-import-not-at-top

  tokenizer = load_tokenizer(tokenizer_json or config.data.tokenizer)
  if config.model.vocab_size < tokenizer.vocab_size:
    raise UserError(f"the model's vocabulary ({config.model.vocab_size}) is smaller than the tokenizer's "
                    f"({tokenizer.vocab_size}); put the model's tokenizer.json beside its weights")
  ckpt_lib.prepare_workdir(workdir)
  if os.path.isdir(ckpt_lib.checkpoint_dir(workdir)) and os.listdir(ckpt_lib.checkpoint_dir(workdir)):
    raise UserError(f"{workdir}: already holds checkpoints; choose an empty workdir")
  if tokenizer_json:
    dest = os.path.join(os.path.abspath(workdir), "tokenizer.json")
    shutil.copyfile(tokenizer_json, dest)
    config.data.tokenizer = dest
  config_lib.validate(config)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = make_optimizer(config.trainer, config.trainer.max_steps)
  state = TrainState.create(params, tx, jax.random.PRNGKey(config.trainer.seed))
  data_state = {"step": 0, "seed": config.trainer.seed, "batch_size": config.trainer.batch_size,
                "seq_len": config_lib.seq_len(config)}
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    checkpointer.save(0, state, data_state, config)
  finally:
    checkpointer.close()


def convert(hf_path: str, workdir: str, stream=sys.stdout) -> None:
  config, params = from_hf(hf_path)
  tokenizer_json = os.path.join(hf_path, "tokenizer.json")
  _write_and_report(config, params, workdir, hf_path, tokenizer_json if os.path.isfile(tokenizer_json) else None,
                    stream)


def convert_seed(checkpoint: str, yaml_path: str, workdir: str, tokenizer_json: Optional[str] = None,
                 stream=sys.stdout) -> None:
  from mla_jax.seed_checkpoint import from_seed  # pylint: disable=g-import-not-at-top
  config, params = from_seed(checkpoint, yaml_path)
  if tokenizer_json is None:
    stream.write(f"note: the workdir uses the byte tokenizer; give --tokenizer=tokenizer.json if the seed run used "
                 f"another (its vocabulary has {config.model.vocab_size} entries)\n")
  _write_and_report(config, params, workdir, checkpoint, tokenizer_json, stream)


def _write_and_report(config, params, workdir: str, source: str, tokenizer_json: Optional[str], stream) -> None:
  write_workdir(config, params, workdir, tokenizer_json)
  cfg = config_lib.ModelConfig.from_config(config)
  stream.write(f"{source} -> {os.path.join(os.path.abspath(workdir), 'checkpoints', '0')}: {cfg.num_layers} layers, "
               f"{cfg.num_experts} experts, vocab {cfg.vocab_size}, tokenizer {config.data.tokenizer}\n")
  stream.flush()


def main(argv: Optional[list[str]] = None) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("hf", None, "Hugging Face model folder (config.json + *.safetensors).")
  flags.DEFINE_string("seed", None, "Seed-trainer checkpoint: a .safetensors file or its checkpoint folder.")
  flags.DEFINE_string("seed_yaml", None, "The seed-trainer YAML the --seed checkpoint was trained with.")
  flags.DEFINE_string("tokenizer", None, "tokenizer.json for a --seed checkpoint (default: the byte tokenizer).")
  flags.DEFINE_string("workdir", None, "Workdir to create with the converted step-0 checkpoint.")
  cli.parse_flags(argv)
  f = flags.FLAGS

  def go():
    if not f.workdir or bool(f.hf) == bool(f.seed):
      raise UserError("give --workdir and one of --hf or --seed (with --seed_yaml)")
    if f.seed:
      if not f.seed_yaml:
        raise UserError("--seed needs --seed_yaml: the checkpoint folder's config.json lacks rope_theta and kv_heads")
      convert_seed(f.seed, f.seed_yaml, f.workdir, f.tokenizer)
    else:
      convert(f.hf, f.workdir)

  cli.run(go)


if __name__ == "__main__":
  main()
