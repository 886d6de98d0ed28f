"""DeepSeek-V2/V3 and Mamba2 interop with transformers: logits, greedy decoding, export round trip, refusals.

Needs torch and transformers (not in the test extra): pip install torch transformers (CPU torch).
"""

import io
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers interop tests need torch (CPU)")
transformers = pytest.importorskip("transformers", reason="the transformers interop tests need transformers")

from mla_jax import convert  # noqa: E402
from mla_jax.config import ModelConfig  # noqa: E402
from mla_jax.errors import ConfigError  # noqa: E402
from mla_jax.generate import Decoder, load  # noqa: E402
from mla_jax.model import forward  # noqa: E402

VOCAB = 320  # >= the byte tokenizer's 257, so converted workdirs load with it

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4,
              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
              rope_parameters={"rope_type": "default", "rope_theta": 500.0})


def _randomize(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if p.ndim == 1 else 0.3 * noise)
  return model


def _hf_model(tmp_path, kind, **overrides):
  if kind == "v3":
    cfg = transformers.DeepseekV3Config(**{**COMMON, "first_k_dense_replace": 3, "n_routed_experts": 4,
                                           "num_experts_per_tok": 2, "moe_intermediate_size": 16, **overrides})
    model = transformers.DeepseekV3ForCausalLM(cfg)
  else:
    cfg = transformers.DeepseekV2Config(**{**COMMON, "first_k_dense_replace": 1, "n_routed_experts": 4,
                                           "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                           "n_shared_experts": 2, **overrides})
    model = transformers.DeepseekV2ForCausalLM(cfg)
  model = _randomize(model.float().eval())
  path = str(tmp_path / "hf")
  model.save_pretrained(path)
  return model, path


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 13))

CASES = {
    "v3_dense_q_latent": ("v3", dict(q_lora_rank=24)),
    "v3_dense_no_q_latent_tied": ("v3", dict(q_lora_rank=None, tie_word_embeddings=True)),
    "v3_dense_rotate_half": ("v3", dict(q_lora_rank=24, rope_interleave=False)),
    "v2_moe_shared_q_latent": ("v2", dict(q_lora_rank=24)),
    "v2_moe_no_q_latent": ("v2", dict(q_lora_rank=None, n_shared_experts=1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
  kind, overrides = CASES[case]
  model, path = _hf_model(tmp_path, kind, **overrides)
  config, params = convert.from_hf(path)
  cfg = ModelConfig.from_config(config)
  assert cfg.use_mla and cfg.q_latent_dim == (overrides["q_lora_rank"] or 0)
  assert (cfg.num_experts > 0) == (kind == "v2")
  ours = np.asarray(forward(cfg, params, TOKENS))
  theirs = _hf_logits(model, TOKENS)
  assert np.abs(theirs).max() > 1.0  # the weights are large enough for a meaningful comparison
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_and_workdir_loads(tmp_path):
  model, path = _hf_model(tmp_path, "v2", q_lora_rank=24)
  workdir = str(tmp_path / "run")
  convert.convert(path, workdir, stream=io.StringIO())
  _, cfg, variables, _, step = load(workdir)
  assert step == 0
  prompt = TOKENS[0, :6]
  ours, _ = Decoder(cfg, temperature=0.0).generate(variables, prompt, 6, jax.random.PRNGKey(0))
  with torch.no_grad():
    theirs = model.generate(torch.as_tensor(prompt[None], dtype=torch.long), max_new_tokens=6, do_sample=False,
                            min_new_tokens=6, pad_token_id=0)
  np.testing.assert_array_equal(ours[0], theirs[0, len(prompt):].numpy())


@pytest.mark.parametrize("case", ["v3_dense_q_latent", "v2_moe_shared_q_latent"])
def test_to_hf_round_trip_is_identity_and_loads_in_transformers(tmp_path, case):
  kind, overrides = CASES[case]
  model, path = _hf_model(tmp_path, kind, **overrides)
  config, params = convert.from_hf(path)
  out = str(tmp_path / "export")
  convert.to_hf(config, params, out)
  config2, params2 = convert.from_hf(out)
  assert config2.model.to_dict() == {**config.model.to_dict(), "name": "deepseek_v2"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(model, TOKENS), atol=1e-5, rtol=1e-5)


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)


@pytest.mark.parametrize("changes, key", [
    (dict(first_k_dense_replace=1), "scoring_func"),  # V3 MoE: sigmoid scores
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps"),
])
def test_unsupported_features_are_refused(tmp_path, changes, key):
  _, path = _hf_model(tmp_path, "v3", q_lora_rank=None)
  _edit_config(path, **changes)
  with pytest.raises(ConfigError, match=key):
    convert.from_hf(path)


@pytest.mark.parametrize("changes, key", [
    (dict(topk_method="group_limited_greedy", n_group=2, topk_group=1), "topk_method"),
    (dict(routed_scaling_factor=2.0), "routed_scaling_factor"),
    (dict(norm_topk_prob=True), "norm_topk_prob"),
])
def test_unsupported_routing_is_refused(tmp_path, changes, key):
  _, path = _hf_model(tmp_path, "v2", q_lora_rank=None)
  _edit_config(path, **changes)
  with pytest.raises(ConfigError, match=key):
    convert.from_hf(path)


MAMBA2 = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=16,
              n_groups=2, conv_kernel=4, expand=2, chunk_size=8, layer_norm_epsilon=1e-5)


def _hf_mamba2(tmp_path, **overrides):
  cfg = transformers.Mamba2Config(**{**MAMBA2, **overrides})
  model = transformers.Mamba2ForCausalLM(cfg).float().eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("A_log", "dt_bias")):
        continue  # keep the decay and step-size inits in their working ranges
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if p.ndim == 1 else 0.3 * noise)
  path = str(tmp_path / "hf_mamba2")
  model.save_pretrained(path)
  return model, path


@pytest.mark.parametrize("tied", [True, False])
def test_mamba2_logits_and_greedy_generation_match_transformers(tmp_path, tied):
  model, path = _hf_mamba2(tmp_path, tie_word_embeddings=tied)
  config, params = convert.from_hf(path)
  cfg = ModelConfig.from_config(config)
  assert set(cfg.layer_kinds) == {"mamba"} and cfg.mamba2_n_groups == 2 and cfg.tie_embeddings == tied
  ours = np.asarray(forward(cfg, params, TOKENS))
  theirs = _hf_logits(model, TOKENS)
  assert np.abs(theirs).max() > 1.0
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  prompt = TOKENS[0, :6]
  generated, _ = Decoder(cfg, temperature=0.0).generate({"params": params}, prompt, 6, jax.random.PRNGKey(0))
  with torch.no_grad():
    expected = model.generate(torch.as_tensor(prompt[None], dtype=torch.long), max_new_tokens=6, do_sample=False,
                              min_new_tokens=6, pad_token_id=0)
  np.testing.assert_array_equal(generated[0], expected[0, len(prompt):].numpy())


def test_mamba2_round_trip_is_identity(tmp_path):
  model, path = _hf_mamba2(tmp_path, tie_word_embeddings=False)
  config, params = convert.from_hf(path)
  out = str(tmp_path / "export")
  convert.to_hf(config, params, out)
  config2, params2 = convert.from_hf(out)
  assert config2.model.to_dict() == config.model.to_dict()
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(model, TOKENS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes, key", [
    (dict(use_conv_bias=False), "use_conv_bias"),
    (dict(use_bias=True), "use_bias"),
    (dict(time_step_limit=[0.0, 10.0]), "time_step_limit"),
])
def test_mamba2_unsupported_features_are_refused(tmp_path, changes, key):
  _, path = _hf_mamba2(tmp_path)
  _edit_config(path, **changes)
  with pytest.raises(ConfigError, match=key):
    convert.from_hf(path)
