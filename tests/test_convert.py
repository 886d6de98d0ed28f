"""Hugging Face interop through the public `mla_jax.convert.from_hf` / `to_hf` (mla_jax.hf).

The name tables, export round trips, refusals and bad folders run everywhere. The comparisons with
transformers (logits, greedy decoding, loading exports) need torch and transformers, which are not in the
test extra: pip install torch transformers (CPU torch).
"""

import functools
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mla_jax import convert, hf, pytree
from mla_jax.config import ModelConfig
from mla_jax.decode import Decoder
from mla_jax.errors import ConfigError, DataError, UserError
from mla_jax.model import abstract_variables, forward
from mla_jax.safetensors_io import Tensors, read_folder
from mla_jax.workdir import load, write_from_hf

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs torch (CPU) and transformers")

VOCAB = 320  # >= the byte tokenizer's 257, so converted workdirs load with it

COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=4,
  kv_lora_rank=16,
  qk_rope_head_dim=8,
  qk_nope_head_dim=8,
  v_head_dim=12,
  max_position_embeddings=64,
  rope_parameters={"rope_type": "default", "rope_theta": 500.0},
)


def _randomize(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if p.ndim == 1 else 0.3 * noise)
  return model


def _hf_model(tmp_path, kind, **overrides):
  if kind == "v3":
    cfg = transformers.DeepseekV3Config(
      **{
        **COMMON,
        "first_k_dense_replace": 3,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        **overrides,
      }
    )
    model = transformers.DeepseekV3ForCausalLM(cfg)
  else:
    cfg = transformers.DeepseekV2Config(
      **{
        **COMMON,
        "first_k_dense_replace": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "n_shared_experts": 2,
        **overrides,
      }
    )
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


@needs_transformers
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


@needs_transformers
def test_greedy_generation_matches_and_workdir_loads(tmp_path):
  model, path = _hf_model(tmp_path, "v2", q_lora_rank=24)
  workdir = str(tmp_path / "run")
  write_from_hf(path, workdir, stream=io.StringIO())
  _, cfg, variables, _, step = load(workdir)
  assert step == 0
  prompt = TOKENS[0, :6]
  ours, _ = Decoder(cfg, temperature=0.0).generate(variables, prompt, 6, jax.random.PRNGKey(0))
  with torch.no_grad():
    theirs = model.generate(
      torch.as_tensor(prompt[None], dtype=torch.long),
      max_new_tokens=6,
      do_sample=False,
      min_new_tokens=6,
      pad_token_id=0,
    )
  np.testing.assert_array_equal(ours[0], theirs[0, len(prompt) :].numpy())


@needs_transformers
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


def _edit_config(path, drop=(), **changes):
  with open(os.path.join(path, "config.json")) as f:
    values = {k: v for k, v in json.load(f).items() if k not in drop}
  values.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(values, f)


MAMBA2 = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  num_hidden_layers=2,
  num_heads=8,
  head_dim=8,
  state_size=16,
  n_groups=2,
  conv_kernel=4,
  expand=2,
  chunk_size=8,
  layer_norm_epsilon=1e-5,
)


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


@needs_transformers
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
    expected = model.generate(
      torch.as_tensor(prompt[None], dtype=torch.long),
      max_new_tokens=6,
      do_sample=False,
      min_new_tokens=6,
      pad_token_id=0,
    )
  np.testing.assert_array_equal(generated[0], expected[0, len(prompt) :].numpy())


@needs_transformers
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


# ------------------------------------------------------------------------- without transformers

DEEPSEEK = {
  **COMMON,
  "model_type": "deepseek_v2",
  "first_k_dense_replace": 1,
  "n_routed_experts": 4,
  "num_experts_per_tok": 2,
  "moe_intermediate_size": 16,
  "n_shared_experts": 2,
  "q_lora_rank": 24,
}
DENSE = {**DEEPSEEK, "n_routed_experts": 0, "q_lora_rank": None, "tie_word_embeddings": True}
MODELS = {"moe": DEEPSEEK, "dense": DENSE, "mamba2": {**MAMBA2, "model_type": "mamba2"}}  # as config.json keys


def _config(spec: dict):
  return {"mamba2": hf.mamba2_config, "llama": hf.llama_config}.get(spec["model_type"], hf.deepseek_config)(spec)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{model: (folder that to_hf wrote, config, params)} for random weights of each of MODELS."""
  out = {}
  for name, spec in MODELS.items():
    config = _config(spec)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32),  # noqa: B023
      abstract_variables(ModelConfig.from_config(config))[0],
    )
    path = str(tmp_path_factory.mktemp(name) / "hf")
    convert.to_hf(config, params, path)
    out[name] = (path, config, params)
  return out


def _copy(src, tmp_path, edit_tensors=None, drop=(), **changes):
  path = str(tmp_path / "hf")
  shutil.copytree(src, path)
  if edit_tensors:
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit_tensors(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"))
  _edit_config(path, drop, **changes)
  return path


@pytest.mark.parametrize("model", sorted(MODELS))
def test_export_round_trip_is_identity(exported, model):
  path, config, params = exported[model]
  with open(os.path.join(path, "config.json")) as f:
    assert json.load(f)["model_type"] == ("mamba2" if model == "mamba2" else "deepseek_v2")
  config2, params2 = convert.from_hf(path)
  assert config2.model.to_dict() == config.model.to_dict()
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


LLAMA = {**COMMON, "model_type": "llama", "num_key_value_heads": 2, "head_dim": 12}  # head_dim != hidden / heads

# case: (config.json keys, name table, interleaved rope of a DeepSeek key or None)
TABLES = {
  "deepseek_moe_interleaved": (DEEPSEEK, functools.partial(hf.deepseek_table, interleaved=True), True),
  "deepseek_dense_rotate_half": (DENSE, functools.partial(hf.deepseek_table, interleaved=False), False),
  "deepseek_moe_fused_experts": (
    {**DEEPSEEK, "q_lora_rank": None, "n_shared_experts": 0},
    functools.partial(hf.deepseek_table, fused=lambda prefix: True),
    True,
  ),
  "mamba2": (MODELS["mamba2"], hf.mamba2_table, None),
  "llama_head_dim_12": (LLAMA, hf.llama_table, None),
}


@pytest.mark.parametrize("case", sorted(TABLES))
def test_name_table_covers_the_model_once_and_both_directions_invert(case):
  spec, make_table, interleaved = TABLES[case]
  cfg = ModelConfig.from_config(_config(spec))
  table = make_table(cfg)
  wanted = pytree.flatten(abstract_variables(cfg)[0])
  ours, theirs = [n for e in table for n in e.ours], [n for e in table for n in e.hf]
  assert sorted(ours) == sorted(wanted) and len(set(theirs)) == len(theirs)
  rng = np.random.default_rng(0)
  for entry in table:
    mine = [rng.standard_normal(wanted[n].shape).astype(np.float32) for n in entry.ours]
    saved = entry.save(*mine)
    assert len(saved) == len(entry.hf)
    back = entry.load(*saved)
    for a, b in zip(back, mine, strict=True):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(entry.save(*back), saved, strict=True):
      np.testing.assert_array_equal(a, b)
    t = Tensors(dict(zip(entry.hf, saved, strict=True)), "t")
    for a, b in zip(hf._load_entry(entry, t, np.dtype(np.float32)), back, strict=True):  # stacks fill in place
      np.testing.assert_array_equal(a, b)
    if entry.transpose is not None:  # slices read without `load`
      index = tuple(slice(1, None, 2 if d == 0 else 1) for d in range(back[0].ndim))
      np.testing.assert_array_equal(hf._read_slice(entry, t, index, np.dtype(np.float32)), back[0][index])
  if interleaved is not None:  # the rope part of the key: interleaved pairs become [even | odd] columns
    C = cfg.kv_latent_dim
    (dkv,) = [e for e in table if e.hf == ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight",)]
    w_OI = rng.standard_normal((C + cfg.d_rope, cfg.hidden_size)).astype(np.float32)
    rope_O = np.concatenate([w_OI[C::2], w_OI[C + 1 :: 2]]) if interleaved else w_OI[C:]
    np.testing.assert_array_equal(dkv.load(w_OI)[0], np.concatenate([w_OI[:C], rope_O]).T)


def test_fused_experts_index_shards_and_mtp_layers_read_alike(exported, tmp_path):
  src, _, params = exported["moe"]
  t = load_file(os.path.join(src, "model.safetensors"))
  for i in (1, 2):  # the MoE layers, as newer transformers save them
    f = f"model.layers.{i}.mlp."
    stack = lambda name: np.stack([t.pop(f"{f}experts.{j}.{name}.weight") for j in range(4)])  # noqa: B023
    t[f + "experts.gate_up_proj"] = np.concatenate([stack("gate_proj"), stack("up_proj")], 1)
    t[f + "experts.down_proj"] = stack("down_proj")
  t["model.layers.3.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"]  # multi-token prediction
  path = tmp_path / "sharded"
  path.mkdir()
  shard = {name: f"model-{1 + k % 2:05d}-of-00002.safetensors" for k, name in enumerate(sorted(t))}
  for file in set(shard.values()):
    save_file({name: t[name] for name in t if shard[name] == file}, str(path / file))
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
  shutil.copy(os.path.join(src, "config.json"), path)
  _, params2 = convert.from_hf(str(path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("model", ["moe", "mamba2"])
def test_streamed_read_equals_the_full_read_and_bfloat16_shards_round_trip(exported, tmp_path, model):
  path, config, params = exported[model]
  cfg = ModelConfig.from_config(config)
  table = hf.mamba2_table(cfg) if model == "mamba2" else hf.deepseek_table(cfg)
  full = hf._load(table, Tensors(read_folder(path), path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, convert.from_hf(path)[1], full)
  out = str(tmp_path / "bf16")
  convert.to_hf(config, params, out, dtype="bfloat16", max_shard_bytes=20_000)
  files = sorted(os.listdir(out))
  assert "model.safetensors.index.json" in files and "model-00002-of-" in " ".join(files)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  rounded = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16), params)
  _, back = convert.from_hf(out)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b.astype(np.float32)), back, rounded)
  _, back16 = convert.from_hf(out, dtype="bfloat16")
  assert {x.dtype for x in jax.tree_util.tree_leaves(back16)} == {np.dtype(ml_dtypes.bfloat16)}
  jax.tree_util.tree_map(np.testing.assert_array_equal, back16, rounded)


SHARDED_CHECK = """
import json, sys
import jax, numpy as np
from mla_jax import hf, pytree, sharding
path, preset = sys.argv[1], json.loads(sys.argv[2])
mesh = jax.make_mesh(tuple(preset), sharding.MESH_AXES)
config, expected = hf.from_hf(path)
_, params = hf.load_sharded(path, mesh)
out = {}
for name, x in pytree.flatten(params).items():
  want = pytree.flatten(expected)[name]
  out[name] = dict(
    equal=bool(np.array_equal(np.asarray(x), want)) and x.dtype == want.dtype,
    split=max(s.data.size for s in x.addressable_shards) < x.size,
  )
print(json.dumps(out))
"""


@pytest.mark.parametrize("preset", [(1, 2, 2, 2), (2, 4, 1, 1)], ids=["fsdp_tensor_expert", "data_fsdp"])
def test_sharded_placement_equals_from_hf_on_8_devices(exported, preset):
  path = exported["moe"][0]
  flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  run = subprocess.run(
    [sys.executable, "-c", SHARDED_CHECK, path, json.dumps(preset)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  assert got and all(v["equal"] for v in got.values()), [n for n, v in got.items() if not v["equal"]]
  # the sliced reads (stacked experts, plain kernels) and the whole-parameter ones (kv_b) are both split
  for name in ("layer_1/moe/w_gate", "layer_0/mlp/down/kernel", "layer_0/mla/w_uk/kernel", "embedding"):
    assert got[name]["split"], name


@pytest.mark.parametrize(
  "model, changes, key",
  [
    ("moe", dict(model_type="deepseek_v3", scoring_func="softmax"), "scoring_func"),  # V3 MoE: sigmoid scores
    ("dense", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}), "rope_scaling"),
    ("dense", dict(attention_bias=True), "attention_bias"),
    ("dense", dict(rms_norm_eps=1e-5), "rms_norm_eps"),
    ("dense", dict(num_key_value_heads=2), "num_key_value_heads"),
    ("dense", dict(drop=("qk_nope_head_dim",)), "qk_nope_head_dim"),
    ("moe", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1), "topk_method"),
    ("moe", dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    ("moe", dict(norm_topk_prob=True), "norm_topk_prob"),
    ("mamba2", dict(use_conv_bias=False), "use_conv_bias"),
    ("mamba2", dict(use_bias=True), "use_bias"),
    ("mamba2", dict(time_step_limit=[0.0, 10.0]), "time_step_limit"),
  ],
)
def test_unsupported_features_are_refused(exported, tmp_path, model, changes, key):
  path = _copy(exported[model][0], tmp_path, **changes)
  with pytest.raises(ConfigError, match=key) as e:
    convert.from_hf(path)
  assert e.value.key == f"hf.{key}"


def test_mamba2_time_step_limit_as_transformers_writes_infinity_is_accepted(exported, tmp_path):
  path = _copy(exported["mamba2"][0], tmp_path, time_step_limit=[0.0, {"__float__": "Infinity"}])
  assert convert.from_hf(path)[0].model.layer_pattern == "MM"


def _set(name, value):
  return lambda tensors: tensors.update({name: value(tensors) if callable(value) else value})


@pytest.mark.parametrize(
  "model, edit, error, words",
  [
    (
      "moe",
      lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"),
      DataError,
      "tensor model.layers.1.mlp.experts.2.up_proj.weight is missing",
    ),
    (
      "moe",
      _set("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)),
      DataError,
      "1 tensors have no place in the model, first model.layers.0.mlp.extra.weight",
    ),
    (
      "moe",
      _set("model.layers.0.self_attn.o_proj.weight", np.zeros((32, 40), np.float32)),
      DataError,
      r"tensor model.layers.0.self_attn.o_proj.weight has shape \(32, 40\), which does not fit layer_0/mla/w_o/kernel",
    ),
    (
      "moe",
      _set("model.layers.0.input_layernorm.weight", np.ones(31, np.float32)),
      DataError,
      r"layer_0/mixer_norm/scale has shape \(31,\) in the safetensors but \(32,\) in config.json",
    ),
    (
      "dense",
      _set("lm_head.weight", lambda t: t["model.embed_tokens.weight"] + 1),
      DataError,
      "tie_word_embeddings is set but lm_head.weight differs from the embeddings",
    ),
    (
      "mamba2",
      _set("backbone.layers.1.mixer.in_proj.weight", np.zeros((204, 32), np.float32)),
      ConfigError,
      r"layer 1 in_proj has 204 outputs, not 2I \+ 2GN \+ H = 200",
    ),
  ],
  ids=["missing", "leftover", "misfit", "shape", "untied_lm_head", "mamba2_extra_mlp"],
)
def test_bad_folders_are_refused_naming_the_folder_and_tensor(exported, tmp_path, model, edit, error, words):
  path = _copy(exported[model][0], tmp_path, edit)
  with pytest.raises(error, match=words) as e:
    convert.from_hf(path)
  assert error is ConfigError or str(e.value).startswith(f"{path}: ")


def test_unreadable_or_foreign_config_json_is_refused(tmp_path):
  with pytest.raises(DataError, match="no config.json"):
    convert.from_hf(str(tmp_path))
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(DataError, match="config.json: not readable JSON"):
    convert.from_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
    convert.from_hf(str(tmp_path))


@pytest.mark.filterwarnings("ignore:model.* is ignored")  # the MLA keys of the GQA case
def test_to_hf_refuses_what_deepseek_v2_cannot_hold(exported, tmp_path):
  _, config, params = exported["moe"]
  seed_mla = config.copy_and_resolve_references()
  seed_mla.model.mla_latent_norms = False
  with pytest.raises(ConfigError) as e:
    convert.to_hf(seed_mla, params, str(tmp_path / "out"))
  assert e.value.key == "model.mla_latent_norms"
  mixed = config.copy_and_resolve_references()  # MLA with Mamba2 layers: neither deepseek nor granitemoehybrid
  mixed.model.update(layer_pattern="M" + "A" * (mixed.model.num_layers - 1), mamba2_num_heads=8)
  with pytest.raises(UserError, match="writes MLA models as DeepSeek"):
    convert.to_hf(mixed, params, str(tmp_path / "out"))
  wrong = jax.tree_util.tree_map(lambda x: x, params)
  wrong["layer_0"]["mixer_norm"]["scale"] = np.ones(31, np.float32)
  with pytest.raises(DataError, match=r"to_hf: layer_0/mixer_norm/scale has shape \(31,\) in the params but \(32,\)"):
    convert.to_hf(config, wrong, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
