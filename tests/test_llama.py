"""Llama (GQA with RoPE and a SwiGLU MLP) through `from_hf` / `to_hf`. Torch-free but for the last test: the
comparison with transformers' own logits and greedy tokens is tests/test_hf_fixtures.py on the stored llama_*
fixtures."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from mla_jax import config as config_lib
from mla_jax import convert, pytree
from mla_jax.config import ModelConfig
from mla_jax.errors import ConfigError
from mla_jax.model import forward, init_params
from mla_jax.safetensors_io import read_folder

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf_fixtures", "llama_gqa_head_dim_12")
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 9))


def _config(**overrides):
  c = config_lib.default_config()
  c.model.update(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    kv_heads=2,
    intermediate_size=48,
    max_seq_len=64,
    rope_theta=500.0,
    rms_norm_eps=1e-5,
  )
  c.model.update(overrides)
  c.trainer.seq_len = 16
  return c


def _params(config, seed=0):
  params, _ = init_params(ModelConfig.from_config(config), jax.random.PRNGKey(seed))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  noisy = [np.asarray(x + 0.2 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys, strict=True)]
  return jax.tree_util.tree_unflatten(tree, noisy)


def _model_type(path) -> str:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)["model_type"]


@pytest.mark.parametrize("overrides", [{}, dict(head_dim=12, tie_embeddings=True, attention_multiplier=12**-0.5)])
def test_export_then_import_gives_back_the_model(tmp_path, overrides):
  config = _config(**overrides)
  params = _params(config)
  convert.to_hf(config, params, str(tmp_path))
  assert _model_type(tmp_path) == "llama"
  back_config, back = convert.from_hf(str(tmp_path))
  cfg, back_cfg = ModelConfig.from_config(config), ModelConfig.from_config(back_config)
  assert back_cfg.head_dim == cfg.head_dim and back_cfg.kv_heads == 2 and back_cfg.rope_theta == 500.0
  flat, flat_back = pytree.flatten(params), pytree.flatten(back)
  assert flat.keys() == flat_back.keys()
  for name in flat:
    np.testing.assert_array_equal(flat_back[name], flat[name], err_msg=name)
  np.testing.assert_array_equal(forward(back_cfg, back, TOKENS), forward(cfg, params, TOKENS))


def test_import_then_export_writes_the_checkpoint_again(tmp_path):
  config, params = convert.from_hf(FIXTURE)
  cfg = ModelConfig.from_config(config)
  assert (cfg.head_dim, cfg.kv_heads, cfg.rope_theta, cfg.rms_norm_eps) == (12, 2, 500.0, 1e-5)
  convert.to_hf(config, params, str(tmp_path))
  theirs, ours = read_folder(FIXTURE), read_folder(str(tmp_path))
  assert ours.keys() == theirs.keys()
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  assert convert.from_hf(str(tmp_path))[0].model == config.model


@pytest.mark.parametrize(
  "overrides",
  [
    dict(num_experts=4, moe_intermediate_size=16),  # MoE
    dict(use_rope=False),
    dict(residual_multiplier=0.5),
    dict(attention_multiplier=0.1),
  ],
)
def test_gqa_models_llama_cannot_hold_are_written_as_granitemoehybrid(tmp_path, overrides):
  config = _config(**overrides)
  convert.to_hf(config, _params(config), str(tmp_path))
  assert _model_type(tmp_path) == "granitemoehybrid"


@pytest.mark.parametrize(
  "key, value, refused",
  [
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}, "rope_parameters"),
    ("rope_parameters", {"rope_theta": 500.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_parameters"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("hidden_act", "gelu", "hidden_act"),
  ],
)
def test_import_refuses_what_it_cannot_reproduce(tmp_path, key, value, refused):
  path = str(tmp_path / "hf")
  shutil.copytree(FIXTURE, path)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config[key] = value
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ConfigError, match=rf"hf\.{refused}:"):
    convert.from_hf(path)


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = _config(head_dim=12)
  params = _params(config)
  convert.to_hf(config, params, str(tmp_path))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  assert type(model).__name__ == "LlamaForCausalLM"
  with torch.no_grad():
    theirs = model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
  ours = np.asarray(forward(ModelConfig.from_config(config), params, TOKENS))
  assert np.abs(theirs).max() > 1.0
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
