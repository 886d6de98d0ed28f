"""Granite 4.0-H (granitemoehybrid) through `from_hf` / `to_hf`, and the model keys it needs: the muP-style
multipliers, attention without RoPE and the shared-MLP width. Torch-free: the comparison with transformers'
own outputs is tests/test_hf_fixtures.py on the stored granitemoehybrid_* fixtures."""

import dataclasses
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
from mla_jax.model import LanguageModel, forward, init_params, lm_head_weight
from mla_jax.safetensors_io import read_folder

FIXTURE = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "data", "hf_fixtures", "granitemoehybrid_moe_rope_tied"
)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 9))


def _config(**overrides):
  """A tiny Granite-shaped hybrid: Mamba2 and GQA layers, each with MoE plus a shared MLP, every multiplier set."""
  c = config_lib.default_config()
  c.model.update(
    vocab_size=64,
    hidden_size=32,
    num_layers=4,
    num_heads=4,
    kv_heads=2,
    max_seq_len=64,
    rms_norm_eps=1e-5,
    layer_pattern="MAMA",
    mamba_ffn=True,
    mamba2_num_heads=8,
    mamba2_state_size=16,
    mamba2_n_groups=2,
    mamba2_chunk_size=8,
    num_experts=4,
    experts_per_tok=2,
    intermediate_size=24,  # Granite's dense FFN width is its shared MLP's
    moe_intermediate_size=16,
    shared_intermediate_size=24,
    embedding_multiplier=2.0,
    residual_multiplier=0.5,
    attention_multiplier=0.1,
    logits_scaling=3.0,
    use_rope=False,
    tie_embeddings=True,
  )
  c.model.update(overrides)
  c.trainer.seq_len = 16
  return c


def _params(config, seed=0):
  params, _ = init_params(ModelConfig.from_config(config), jax.random.PRNGKey(seed))
  # Larger weights than the init's, so that every layer moves the logits.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  noisy = [np.asarray(x + 0.2 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys, strict=True)]
  return jax.tree_util.tree_unflatten(tree, noisy)


ROUND_TRIPS = {
  "moe_no_rope_tied": {},
  "moe_rope_untied_default_scale": dict(
    use_rope=True, rope_theta=500.0, tie_embeddings=False, attention_multiplier=0.0
  ),
  "dense": dict(num_experts=0, shared_intermediate_size=0, moe_intermediate_size=0),
  "attention_only_rope": dict(layer_pattern="AA", num_layers=2, mamba_ffn=False, mamba2_num_heads=0, use_rope=True),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_export_then_import_gives_back_the_model(tmp_path, case):
  config = _config(**ROUND_TRIPS[case])
  params = _params(config)
  convert.to_hf(config, params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model_type"] == "granitemoehybrid"
  back_config, back = convert.from_hf(str(tmp_path))
  cfg = ModelConfig.from_config(config)
  # attention_multiplier 0 (1/sqrt(head_dim)) is written as its value.
  assert ModelConfig.from_config(back_config) == dataclasses.replace(
    cfg, attention_multiplier=cfg.attention_multiplier or cfg.head_dim**-0.5
  )
  flat, flat_back = pytree.flatten(params), pytree.flatten(back)
  assert flat.keys() == flat_back.keys()
  for name in flat:
    np.testing.assert_array_equal(flat_back[name], flat[name], err_msg=name)
  # Equal resolved configs and bit-equal params give equal logits; the one field that may differ (an explicit
  # 1/sqrt(head_dim) for 0) gives the same logits by the default-multiplier test below.


def test_import_then_export_writes_the_checkpoint_again(tmp_path):
  """The names both ways against a folder that transformers wrote (router.layer, input_linear, shared_mlp)."""
  config, params = convert.from_hf(FIXTURE)
  convert.to_hf(config, params, str(tmp_path))
  theirs, ours = read_folder(FIXTURE), read_folder(str(tmp_path))
  theirs.pop("lm_head.weight", None)  # tied: transformers may store the copy, to_hf does not
  assert ours.keys() == theirs.keys()
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  assert convert.from_hf(str(tmp_path))[0].model == config.model


def _edited_fixture(tmp_path, **changes):
  path = str(tmp_path / "hf")
  shutil.copytree(FIXTURE, path)
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  return path


@pytest.mark.parametrize(
  "key, value",
  [
    ("num_experts_per_tok", 1),
    ("position_embedding_type", "alibi"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 500.0, "factor": 2.0}),
    ("attention_bias", True),
    ("mamba_proj_bias", True),
    ("mamba_conv_bias", False),
    ("hidden_act", "gelu"),
    ("time_step_limit", [0.0, 1.0]),
    ("attention_multiplier", 0.0),
    ("head_dim", 16),
    ("layer_types", ["mamba", "attention", "mamba"]),
  ],
)
def test_import_refuses_what_it_cannot_reproduce(tmp_path, key, value):
  with pytest.raises(ConfigError, match=rf"hf\.{key}:"):
    convert.from_hf(_edited_fixture(tmp_path, **{key: value}))


@pytest.mark.parametrize(
  "overrides, key",
  [
    (dict(router="sigmoid"), "router"),
    (dict(first_dense_layers=1), "first_dense_layers"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(experts_per_tok=1), "experts_per_tok"),
    (dict(routed_scaling_factor=2.0), "routed_scaling_factor"),
    (dict(shared_expert_enabled=False), "shared_expert_enabled"),
    (dict(mamba_ffn=False), "mamba_ffn"),
    (dict(head_dim=16), "head_dim"),
  ],
)
def test_export_refuses_what_granite_cannot_express(tmp_path, overrides, key):
  config = _config(**overrides)
  with pytest.raises(ConfigError, match=rf"model\.{key}:"):
    convert.to_hf(config, {}, str(tmp_path))  # refused before the params are read


MLA = dict(layer_pattern="", num_layers=2, kv_heads=0, kv_latent_dim=16, d_rope=8, use_rope=True)
MAMBA2 = dict(layer_pattern="MM", num_layers=2, mamba_ffn=False)


@pytest.mark.parametrize(
  "overrides, key",
  [
    (dict(MLA, shared_intermediate_size=40), "shared_intermediate_size"),
    (dict(MLA, embedding_multiplier=2.0), "embedding_multiplier"),
    (dict(MLA, attention_multiplier=0.2), "attention_multiplier"),
    (dict(MAMBA2, logits_scaling=3.0), "logits_scaling"),
    (dict(MAMBA2, residual_multiplier=0.5), "residual_multiplier"),
  ],
)
def test_deepseek_and_mamba2_exports_refuse_granite_features(tmp_path, overrides, key):
  config = _plain(**overrides)
  with pytest.raises(ConfigError, match=rf"model\.{key}:"):
    convert.to_hf(config, {}, str(tmp_path))  # refused before the params are read


def test_validation_names_the_new_keys():
  for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
    with pytest.raises(ConfigError, match=rf"model\.{key}:"):
      config_lib.validate(_config(**{key: 0.0}))
  with pytest.raises(ConfigError, match=r"model\.use_rope:"):
    config_lib.validate(_config(**dict(MLA, use_rope=False)))
  config_lib.validate(_config(head_dim=7, num_layers=2, layer_pattern="AA"))  # odd heads are fine without RoPE
  with pytest.raises(ConfigError, match=r"model\.head_dim:"):
    config_lib.validate(_config(head_dim=7, num_layers=2, layer_pattern="AA", use_rope=True))


# ------------------------------------------------------------------------------------------ the keys' math


def _plain(**overrides):
  """The Granite-shaped model with every new key at its default."""
  base = dict(embedding_multiplier=1.0, residual_multiplier=1.0, attention_multiplier=0.0, logits_scaling=1.0)
  return _config(**{**base, "use_rope": True, "shared_intermediate_size": 0, "moe_intermediate_size": 24, **overrides})


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_default_attention_multiplier_and_shared_width_are_the_explicit_values(attention):
  mla = dict(MLA, layer_pattern="MA", num_layers=2) if attention == "mla" else dict(layer_pattern="MA", num_layers=2)
  config = _plain(**mla)
  params = _params(config)
  cfg = ModelConfig.from_config(config)
  width = cfg.head_dim + cfg.d_rope if attention == "mla" else cfg.head_dim
  explicit = _plain(**mla, attention_multiplier=width**-0.5, shared_intermediate_size=24)
  np.testing.assert_array_equal(forward(explicit, params, TOKENS), forward(config, params, TOKENS))
  other = _plain(**mla, attention_multiplier=0.5 * width**-0.5)
  assert not np.allclose(forward(other, params, TOKENS), forward(config, params, TOKENS), atol=1e-3)


def test_logits_scaling_divides_the_logits_and_the_hidden_states_for_the_loss():
  config = _plain()
  params = _params(config)
  scaled = _plain(logits_scaling=3.0)
  base = np.asarray(forward(config, params, TOKENS))
  np.testing.assert_allclose(forward(scaled, params, TOKENS), base / 3.0, rtol=1e-6, atol=0)
  cfg = ModelConfig.from_config(scaled)
  hidden, _, _ = LanguageModel(cfg).apply({"params": params}, TOKENS, return_hidden=True)
  np.testing.assert_allclose(hidden @ lm_head_weight(cfg, params), base / 3.0, atol=1e-5, rtol=1e-5)


def test_embedding_and_residual_multipliers_scale_the_residual_stream():
  """Every norm is scale-invariant (eps aside), so multiplying the embeddings and every branch by the same c
  multiplies the whole residual stream by c and leaves the logits as they were; either one alone does not."""
  config = _plain(rms_norm_eps=1e-12)
  params = _params(config)
  base = np.asarray(forward(config, params, TOKENS))
  both = forward(_plain(rms_norm_eps=1e-12, embedding_multiplier=4.0, residual_multiplier=4.0), params, TOKENS)
  np.testing.assert_allclose(both, base, atol=1e-4, rtol=1e-4)
  for key in ("embedding_multiplier", "residual_multiplier"):
    alone = forward(_plain(rms_norm_eps=1e-12, **{key: 4.0}), params, TOKENS)
    assert not np.allclose(alone, base, atol=1e-2), key


@pytest.mark.parametrize("use_rope", [False, True])
def test_attention_without_rope_ignores_the_order_of_earlier_tokens(use_rope):
  # One layer: the last token attends over the set of its predecessors' keys and values, which no order reaches.
  config = _plain(layer_pattern="A", num_layers=1, use_rope=use_rope, num_experts=0)
  params = _params(config)
  tokens = TOKENS[:1]
  swapped = tokens.copy()
  swapped[0, [1, 4]] = tokens[0, [4, 1]]
  last, last_swapped = forward(config, params, tokens)[0, -1], forward(config, params, swapped)[0, -1]
  assert np.allclose(last, last_swapped, atol=1e-5) == (not use_rope)
