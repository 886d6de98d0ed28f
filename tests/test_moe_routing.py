"""Softmax and sigmoid (DeepSeek-V3) routing with groups, bias and scaling; their config rules; deepseek_v3
folders through `mla_jax.convert.from_hf` / `to_hf` (without transformers)."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from mla_jax import convert, hf, pytree
from mla_jax.config import ModelConfig, default_config, validate
from mla_jax.errors import ConfigError
from mla_jax.layers.moe import MoE
from mla_jax.model import abstract_variables, forward
from mla_jax.ops import moe

_route = jax.jit(moe.route, static_argnums=(1, 2, 4, 5, 6, 7))

ROUTES = {  # (router, k, n_group, topk_group, scaling) over E = 8 experts
  "softmax": ("softmax", 2, 1, 1, 1.0),
  "softmax_k1_scaled": ("softmax", 1, 1, 1, 2.5),
  "softmax_groups": ("softmax", 3, 4, 2, 1.0),
  "sigmoid": ("sigmoid", 2, 1, 1, 1.0),
  "sigmoid_k1": ("sigmoid", 1, 1, 1, 1.0),
  "sigmoid_groups_scaled": ("sigmoid", 3, 4, 2, 2.5),
  "sigmoid_groups_of_one": ("sigmoid", 2, 8, 3, 1.0),
  "sigmoid_one_group_kept": ("sigmoid", 2, 2, 1, 1.0),
}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("case", sorted(ROUTES))
def test_route_matches_per_token_reference(case, norm, bias):
  router, k, n_group, topk_group, scaling = ROUTES[case]
  rng = np.random.default_rng(0)
  logits_TE = rng.standard_normal((32, 8)).astype(np.float32) * 2
  bias_E = rng.standard_normal(8).astype(np.float32) * 0.3 if bias else None
  args = (k, norm, bias_E, router, n_group, topk_group, scaling)
  weights_TK, experts_TK, probs_TE = _route(jnp.asarray(logits_TE), *args)
  want_w, want_e, want_p = moe.route_reference(logits_TE, *args)
  np.testing.assert_array_equal(np.asarray(experts_TK), want_e)
  np.testing.assert_allclose(np.asarray(weights_TK), want_w, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(probs_TE), want_p, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(probs_TE).sum(-1), 1.0, rtol=1e-6)
  if n_group > 1:  # every chosen expert is in one of the token's topk_group groups
    assert all(len(set(row // (8 // n_group))) <= topk_group for row in np.asarray(experts_TK))
  if router == "sigmoid" and norm:
    np.testing.assert_allclose(np.asarray(weights_TK).sum(-1), scaling, rtol=1e-6)


def test_group_limit_changes_the_choice():
  """Expert 0 has the best score but its group's two best sum lowest: group-limited routing skips it."""
  logits_TE = jnp.array([[3.0, -5.0, 1.0, 1.0, 1.2, 1.2, 0.5, 0.5]])
  _, plain_TK, _ = _route(logits_TE, 2, True, None, "sigmoid", 1, 1, 1.0)
  _, grouped_TK, _ = _route(logits_TE, 2, True, None, "sigmoid", 4, 2, 1.0)
  assert 0 in np.asarray(plain_TK)[0]
  assert sorted(np.asarray(grouped_TK)[0].tolist()) == [4, 5]


def _model(**overrides) -> ModelConfig:
  c = default_config()
  c.model.update(hidden_size=16, num_heads=2, num_experts=8, experts_per_tok=2, moe_intermediate_size=8)
  c.model.update(overrides)
  validate(c)
  return ModelConfig.from_config(c, vocab_size=64)


def test_sigmoid_layer_reads_score_bias_and_the_aux_free_bias_adds_to_it():
  cfg = _model(router="sigmoid", aux_free_bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.0)
  x_BTD = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 16)), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(MoE(cfg).init, jax.random.key(0), x_BTD))
  assert shapes["params"]["score_bias"].shape == (8,) and shapes["moe_bias"]["bias"].shape == (8,)
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.5, jnp.float32), shapes["params"])
  running_E = jnp.asarray(rng.standard_normal(8), jnp.float32)
  apply = jax.jit(MoE(cfg).apply)
  y_BTD, aux = apply({"params": params, "moe_bias": {"bias": running_E}}, x_BTD)
  # The same layer without the collection, its score_bias holding the sum, gives the same output.
  summed = {**params, "score_bias": params["score_bias"] + running_E}
  y2_BTD, aux2 = jax.jit(MoE(dataclasses.replace(cfg, aux_free_bias=False)).apply)({"params": summed}, x_BTD)
  np.testing.assert_allclose(y2_BTD, y_BTD, atol=1e-6)
  np.testing.assert_array_equal(aux2["load"], aux["load"])
  moved = {**params, "score_bias": params["score_bias"].at[0].add(5.0)}
  _, aux3 = apply({"params": moved, "moe_bias": {"bias": running_E}}, x_BTD)
  assert float(aux3["load"][0]) == 0.5  # expert 0's bias puts it into every token's top-2

  def loss(p):
    y, aux = MoE(cfg).apply({"params": p, "moe_bias": {"bias": running_E}}, x_BTD)
    return jnp.sum(y**2) + aux["load_balance"]

  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.max(jnp.abs(grads["router"]["kernel"]))) > 1e-4
  np.testing.assert_array_equal(grads["score_bias"], np.zeros(8))  # the optimizer never moves it


@pytest.mark.parametrize(
  "overrides, key",
  [
    (dict(n_group=3), "model.n_group"),
    (dict(n_group=4, topk_group=5), "model.topk_group"),
    (dict(n_group=4, topk_group=0), "model.topk_group"),
    (dict(n_group=4, topk_group=1, experts_per_tok=3), "model.experts_per_tok"),
    (dict(routed_scaling_factor=0.0), "model.routed_scaling_factor"),
    (dict(router="softplus"), "model.router"),
  ],
)
def test_routing_config_rules_name_the_key(overrides, key):
  with pytest.raises(ConfigError) as e:
    _model(**overrides)
  assert e.value.key == key


# --------------------------------------------------------------------------- deepseek_v3 folders

V3 = dict(
  model_type="deepseek_v3",
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=4,
  kv_lora_rank=16,
  qk_rope_head_dim=8,
  qk_nope_head_dim=8,
  v_head_dim=12,
  max_position_embeddings=64,
  first_k_dense_replace=1,
  n_routed_experts=8,
  num_experts_per_tok=3,
  moe_intermediate_size=16,
  n_shared_experts=1,
  n_group=4,
  topk_group=2,
  routed_scaling_factor=2.5,
  norm_topk_prob=True,
  scoring_func="sigmoid",
  topk_method="noaux_tc",
  q_lora_rank=24,
)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 9))


def _write_v3(path, spec, interleaved=True, seed=0):
  """A deepseek_v3 folder: to_hf's, or with `interleaved` False rewritten in the rotate-half layout."""
  config = hf.deepseek_config(spec)
  cfg = ModelConfig.from_config(config)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.3).astype(np.float32), abstract_variables(cfg)[0])
  convert.to_hf(config, params, path)
  if not interleaved:
    flat = pytree.flatten(params)
    tensors = {}
    for entry in hf.deepseek_table(cfg, interleaved=False):
      tensors.update(zip(entry.hf, entry.save(*(flat[name] for name in entry.ours)), strict=True))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    _edit(path, rope_interleave=False)
  return config, params


def _edit(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    values = json.load(f)
  values.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(values, f)


@pytest.mark.parametrize(
  "q_lora_rank, interleaved, groups",
  [(24, True, (4, 2)), (None, True, (1, 1)), (24, False, (1, 1)), (None, False, (4, 2))],
)
def test_v3_folder_round_trip_is_identity(tmp_path, q_lora_rank, interleaved, groups):
  spec = {**V3, "q_lora_rank": q_lora_rank, "n_group": groups[0], "topk_group": groups[1]}
  path = str(tmp_path / "hf")
  config, params = _write_v3(path, spec, interleaved)
  with open(os.path.join(path, "config.json")) as f:
    written = json.load(f)
  assert written["model_type"] == "deepseek_v3" and written["scoring_func"] == "sigmoid"
  assert (written["n_group"], written["topk_group"], written["routed_scaling_factor"]) == (*groups, 2.5)
  config2, params2 = convert.from_hf(path)
  assert config2.model.to_dict() == config.model.to_dict()
  assert (config2.model.router, config2.model.n_group, config2.model.norm_topk_prob) == ("sigmoid", groups[0], True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  logits = np.asarray(forward(config2, params2, TOKENS))
  # The checkpoint's e_score_correction_bias reaches the forward pass: moving it changes the logits.
  for sign in (1, -1):  # all tokens to experts 5-7, then to 0-2: each differs from the random choice
    moved = jax.tree.map(lambda x: x, params2)
    moved["layer_1"]["moe"]["score_bias"] = 9 * sign * np.arange(8, dtype=np.float32)
    assert np.abs(np.asarray(forward(config2, moved, TOKENS)) - logits).max() > 1e-3


@pytest.mark.parametrize(
  "changes, key",
  [
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(topk_group=1), "num_experts_per_tok"),
    (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
  ],
)
def test_v3_routing_that_cannot_be_exact_is_refused(tmp_path, changes, key):
  path = str(tmp_path / "hf")
  _write_v3(path, V3)
  _edit(path, **changes)
  with pytest.raises(ConfigError, match=key) as e:
    convert.from_hf(path)
  assert e.value.key == f"hf.{key}"


def test_to_hf_refuses_softmax_groups(tmp_path):
  config = hf.deepseek_config({**V3, "model_type": "deepseek_v2", "norm_topk_prob": False})
  config.model.update(n_group=4, topk_group=2)
  cfg = ModelConfig.from_config(config)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract_variables(cfg)[0])
  with pytest.raises(ConfigError) as e:
    convert.to_hf(config, params, str(tmp_path / "out"))
  assert e.value.key == "model.n_group"
