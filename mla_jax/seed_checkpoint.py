r"""The seed trainer's checkpoints (candle safetensors + its YAML config) as mla_jax config and params.

  python -m mla_jax.convert --seed=CHECKPOINT --seed_yaml=model.yaml --workdir=OUT

CHECKPOINT is a `.safetensors` file or the seed's checkpoint folder (its `*_final.safetensors`, else the
highest `*_step_N.safetensors`). The YAML is the file the run was trained with: the checkpoint folder's
`config.json` omits rope_theta and kv_heads; when it is there, its fields are checked against the YAML.
Only the YAML's `model:` section is read (the trainer settings keep mla_jax's defaults; override them
when training on from the written workdir).

What imports exactly (the seed's forward pass, reproduced to float32 rounding):
- GQA + SwiGLU layers (no kv_latent_dim): RMSNorm eps 1e-5, rotate-half RoPE over the whole head,
  K/V heads shared by consecutive query heads, untied embeddings.
- MLA + MoE layers: no RMSNorm on the latents (`model.mla_latent_norms=False`), the rope query from the
  input, q_rope = x W_QR (`model.mla_q_rope_from_input=True`), the separate rope key w_kr stored as the
  last d_rope columns of our w_dkv, scale 1/sqrt(head_dim + d_rope); softmax top-k routing renormalised
  over the k chosen experts (`norm_topk_prob`), and one shared expert of intermediate_size that the seed
  always builds and adds, whatever `shared_expert_enabled` says.

Refused, naming the defect, because the stored weights do not describe the function that was trained:
- Mamba2 layers: the seed's SSD intra-chunk term uses (sum_n C_l,n)(sum_n B_l,n) in place of C_l . B_s,
  its stored A_log is a never-used zero variable (the forward pass used the frozen log(1..H)), and its
  block has a LayerNorm and in/out projection biases that no Mamba2 here or in the paper has.
- Mamba1 layers (A = exp(-a_log) > 0, a growing state clamped to +-30) and Mamba3 layers.
- experts_per_tok = 1: the seed weights the chosen expert by exactly 1.0 (its router never received a
  gradient); here the weight is the routing probability.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings

import ml_collections
import numpy as np

from mla_jax import config as config_lib
from mla_jax import pytree, seed_yaml
from mla_jax.errors import ConfigError, DataError
from mla_jax.model import abstract_variables
from mla_jax.safetensors_io import Tensors, linear, read_file

SEED_RMS_NORM_EPS = 1e-5  # fixed in the seed trainer
_MAMBA2_DEFECT = (
  "Mamba2 layers (mamba_layers with mamba2_num_heads) cannot be imported: the seed trainer's SSD "
  "intra-chunk term multiplies (sum_n C)(sum_n B) instead of C_l . B_s, its stored A_log is an unused "
  "variable (the forward pass used a frozen log(1..H)), and its block adds a LayerNorm and projection "
  "biases, so the weights do not describe a Mamba2 layer"
)
_MAMBA1_DEFECT = (
  "Mamba1 layers (mamba_layers without mamba2_num_heads) cannot be imported: the seed "
  "trainer's Mamba1 uses A = exp(-a_log) > 0 with a state clamped to +-30"
)
_MAMBA3_DEFECT = (
  "Mamba3 layers (mamba3_enabled) cannot be imported: there is no Mamba3 layer here, and the "
  "seed trainer's shares the Mamba2 SSD defect"
)
# Seed keys with no meaning for the imported weights (the weights are float32 here; Mamba3 is refused).
_DROPPED_MODEL_KEYS = ("dtype", "mamba3_enabled", "mamba3_complex_rope", "mamba3_mimo_rank", "mamba3_use_conv")


def find_checkpoint(path: str) -> str:
  """The safetensors file to read: `path` itself, or in a folder the final, else the newest step file."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise DataError(f"{path}: checkpoint not found")
  files = glob.glob(os.path.join(path, "*.safetensors"))
  final = sorted(f for f in files if f.endswith("_final.safetensors"))
  if final:
    return final[-1]
  steps = [(int(m.group(1)), f) for f in files if (m := re.search(r"_step_(\d+)\.safetensors$", f))]
  if steps:
    return max(steps)[1]
  raise DataError(f"{path}: no *_final.safetensors or *_step_N.safetensors checkpoint")


def seed_config(yaml_path: str) -> ml_collections.ConfigDict:
  """Our config for the model a seed YAML describes, with the seed's fixed choices made explicit."""
  raw = seed_yaml.read_seed_yaml(yaml_path)
  model = dict(raw.get("model") or {})
  if model.get("mamba_layers"):
    if model.get("mamba3_enabled") and model.get("mamba2_num_heads"):
      raise ConfigError("model.mamba3_enabled", _MAMBA3_DEFECT)
    if model.get("mamba2_num_heads"):
      raise ConfigError("model.mamba_layers", _MAMBA2_DEFECT)
    raise ConfigError("model.mamba_layers", _MAMBA1_DEFECT)
  for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "max_seq_len", "rope_theta"):
    if key not in model:
      raise ConfigError(f"model.{key}", f"is required by the seed trainer and missing from {yaml_path}")
  mla = bool(model.get("kv_latent_dim"))
  if mla:
    for key in ("q_latent_dim", "d_rope", "num_experts", "experts_per_tok", "intermediate_size"):
      if not model.get(key):
        raise ConfigError(
          f"model.{key}", f"the seed trainer's MLA layers (always MLA + MoE) need it; missing from {yaml_path}"
        )
    if model["experts_per_tok"] == 1:
      raise ConfigError(
        "model.experts_per_tok",
        "1 cannot be imported: the seed trainer weights the chosen "
        "expert by exactly 1.0 (its router got no gradient), here the weight is the routing "
        "probability, so the checkpoint's function differs",
      )
    if model.get("shared_expert_enabled") is False:
      warnings.warn(
        f"{yaml_path}: shared_expert_enabled is false, but the seed trainer always builds and "
        "adds the shared expert; it is imported",
        stacklevel=2,
      )
  elif not model.get("kv_heads"):
    raise ConfigError(
      "model.kv_heads", f"the seed trainer's attention layers need kv_heads or kv_latent_dim; neither is in {yaml_path}"
    )
  for key in _DROPPED_MODEL_KEYS:
    model.pop(key, None)
  config = seed_yaml.config_from_mapping({"model": model}, yaml_path)  # trainer settings stay ours
  m = config.model
  m.rms_norm_eps = SEED_RMS_NORM_EPS
  m.tie_embeddings = False
  m.head_dim = m.v_head_dim = 0  # hidden_size // num_heads, as in the seed
  if mla:
    m.mla_latent_norms = False
    m.mla_q_rope_from_input = True
    m.norm_topk_prob = True
    m.shared_expert_enabled = True
    m.num_shared_experts = 1
    m.moe_intermediate_size = m.intermediate_size
    m.first_dense_layers = 0
  config_lib.validate(config)
  return config


def check_against_config_json(config: ml_collections.ConfigDict, checkpoint: str) -> None:
  """The seed writes config.json beside its checkpoints: its shape fields must agree with the YAML."""
  path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
  if not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not readable JSON ({e})") from e
  m = config.model
  for theirs, ours in (
    ("hidden_size", "hidden_size"),
    ("num_layers", "num_layers"),
    ("vocab_size", "vocab_size"),
    ("num_attention_heads", "num_heads"),
    ("kv_latent_dim", "kv_latent_dim"),
    ("q_latent_dim", "q_latent_dim"),
    ("d_rope", "d_rope"),
    ("num_experts", "num_experts"),
    ("experts_per_tok", "experts_per_tok"),
    ("intermediate_size", "intermediate_size"),
  ):
    value = saved.get(theirs)  # intermediate_size 0 in the YAML means the seed's default, 4 x hidden
    if value not in (None, m[ours]) and (m[ours] or ours != "intermediate_size"):
      raise ConfigError(f"model.{ours}", f"is {m[ours]} in the YAML but {theirs} is {value} in {path}")


def seed_params(tensors: dict[str, np.ndarray], cfg: config_lib.ModelConfig, where: str) -> dict:
  """Our parameter tree from the seed's tensors (candle Linear weights are [out, in])."""
  t = Tensors(tensors, where)
  H, Dn, Dr = cfg.num_heads, cfg.head_dim, cfg.d_rope
  params = {
    "embedding": t.take("embed_tokens.weight"),
    "final_norm": {"scale": t.take("norm.weight")},
    "lm_head": {"kernel": linear(t.take("lm_head.weight"))},
  }

  def kernel(name: str, *shape: int) -> dict:
    w = linear(t.take(name))
    if w.size != np.prod(shape):
      raise DataError(
        f"{where}: tensor {name} has shape {w.T.shape}, which does not fit the YAML's {tuple(shape)} (in, *out)"
      )
    return {"kernel": w.reshape(shape)}

  for i in range(cfg.num_layers):
    p = f"layers.{i}."
    a = p + "self_attn."
    layer = {
      "mixer_norm": {"scale": t.take(p + "input_layernorm.weight")},
      "ffn_norm": {"scale": t.take(p + "post_attention_layernorm.weight")},
    }
    if cfg.use_mla:
      layer["mla"] = {
        "w_dq": kernel(a + "w_dq.weight", cfg.hidden_size, cfg.q_latent_dim),
        "w_uq": kernel(a + "w_uq.weight", cfg.q_latent_dim, H, Dn),
        "w_qr": kernel(a + "w_qr.weight", cfg.hidden_size, H, Dr),
        "w_dkv": {
          "kernel": np.concatenate([linear(t.take(a + "w_dkv.weight")), linear(t.take(a + "w_kr.weight"))], axis=1)
        },
        "w_uk": kernel(a + "w_uk.weight", cfg.kv_latent_dim, H, Dn),
        "w_uv": kernel(a + "w_uv.weight", cfg.kv_latent_dim, H, Dn),
        "w_o": kernel(a + "o_proj.weight", H, Dn, cfg.hidden_size),
      }
      f = p + "moe."
      moe = {"router": {"kernel": linear(t.take(f + "router.gate.weight"))}}
      for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        moe[ours] = np.stack([linear(t.take(f"{f}experts.{j}.{theirs}.weight")) for j in range(cfg.num_experts)])
      for ours, theirs in (("shared_gate", "gate_proj"), ("shared_up", "up_proj"), ("shared_down", "down_proj")):
        moe[ours] = {"kernel": linear(t.take(f"{f}shared_expert.{theirs}.weight"))}
      layer["moe"] = moe
    else:
      K = cfg.kv_heads
      layer["gqa"] = {
        "w_q": kernel(a + "q_proj.weight", cfg.hidden_size, H, Dn),
        "w_k": kernel(a + "k_proj.weight", cfg.hidden_size, K, Dn),
        "w_v": kernel(a + "v_proj.weight", cfg.hidden_size, K, Dn),
        "w_o": kernel(a + "o_proj.weight", H, Dn, cfg.hidden_size),
      }
      layer["mlp"] = {name: {"kernel": linear(t.take(f"{p}mlp.{name}_proj.weight"))} for name in ("gate", "up", "down")}
    params[f"layer_{i}"] = layer
  t.check_all_used(())
  return params


def from_seed(checkpoint: str, yaml_path: str):
  """(config, params) from a seed-trainer checkpoint (file or folder) and the YAML it was trained with."""
  config = seed_config(yaml_path)
  path = find_checkpoint(checkpoint)
  check_against_config_json(config, path)
  cfg = config_lib.ModelConfig.from_config(config)
  tensors = read_file(path)
  params = seed_params(tensors, cfg, path)
  pytree.check_shapes(
    params, abstract_variables(cfg)[0], path, DataError, found_in="the checkpoint", wanted_in="the YAML"
  )
  return config, params
