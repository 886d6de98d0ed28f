"""Every validation rule raises an error naming its key; seed YAML files load; overrides work."""

import os
import subprocess
import sys

import pytest

from mla_jax.config import ModelConfig, default_config, validate
from mla_jax.errors import ConfigError
from mla_jax.seed_yaml import load_seed_yaml

from conftest import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _set(cfg, dotted, value):
  section, key = dotted.split(".")
  cfg[section][key] = value


BAD = [
    ({"model.hidden_size": 60, "model.num_heads": 8}, "model.hidden_size", "not divisible by model.num_heads"),
    ({"model.kv_latent_dim": 0, "model.d_rope": 0, "model.q_latent_dim": 0, "model.kv_heads": 3},
     "model.kv_heads", "not divisible"),
    ({"model.d_rope": 7}, "model.d_rope", "must be even"),
    ({"model.d_rope": 0}, "model.d_rope", "must be positive when kv_latent_dim"),
    ({"model.q_latent_dim": 0, "model.mla_q_rope_from_input": True}, "model.mla_q_rope_from_input",
     "needs MLA with query compression"),
    ({"model.hidden_size": 0}, "model.hidden_size", "must be positive"),
    ({"model.num_layers": -1}, "model.num_layers", "must be positive"),
    ({"model.kv_latent_dim": -4}, "model.kv_latent_dim", ">= 0"),
    ({"model.num_experts": 4, "model.experts_per_tok": 5}, "model.experts_per_tok", "1 <= experts_per_tok"),
    ({"model.num_experts": 4, "model.experts_per_tok": 0}, "model.experts_per_tok", "1 <= experts_per_tok"),
    ({"model.mamba_layers": (0, 9)}, "model.mamba_layers", "outside"),
    ({"model.mamba_layers": (0,), "model.mamba2_num_heads": 0}, "model.mamba2_num_heads", "must be positive"),
    ({"model.mamba_layers": (0,), "model.mamba2_num_heads": 8, "model.mamba2_head_dim": 8},
     "model.mamba2_head_dim", "must equal"),
    ({"model.mamba_layers": (0,), "model.mamba2_num_heads": 8, "model.mamba2_n_groups": 3},
     "model.mamba2_n_groups", "not divisible"),
    ({"model.layer_pattern": "MMX"}, "model.layer_pattern", "only 'M'"),
    ({"model.layer_pattern": "MAA"}, "model.layer_pattern", "num_layers"),
    ({"model.dtype": "float16"}, "model.dtype", "must be one of"),
    ({"trainer.batch_size": 6, "trainer.gradient_accumulation": 4}, "trainer.batch_size", "not divisible"),
    ({"trainer.seq_len": 128}, "trainer.seq_len", "exceeds model.max_seq_len"),
    ({"trainer.learning_rate": 0.0}, "trainer.learning_rate", "must be positive"),
    ({"mesh.fsdp": 0}, "mesh.fsdp", "positive size or -1"),
]


@pytest.mark.parametrize("changes,key,rule", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_each_rule_names_its_key(changes, key, rule):
  cfg = tiny_config("mla")
  for dotted, value in changes.items():
    _set(cfg, dotted, value)
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  assert e.value.key == key
  assert rule in str(e.value)
  assert str(e.value).startswith(f"config error: {key}:")


def test_unknown_key_suggests_nearest():
  cfg = tiny_config("mla")
  cfg.model.kv_latnt_dim = 3
  with pytest.raises(ConfigError, match="did you mean model.kv_latent_dim"):
    validate(cfg)


def test_unknown_section_suggests_nearest():
  cfg = tiny_config("mla")
  cfg.trainr = {"batch_size": 2}
  with pytest.raises(ConfigError, match="did you mean trainer"):
    validate(cfg)


def test_no_compression_warns():
  cfg = tiny_config("mla", kv_latent_dim=64)
  with pytest.warns(UserWarning, match="no compression"):
    validate(cfg)


def test_seed_noop_key_warns():
  cfg = tiny_config("mla")
  cfg.trainer.group_size = 4
  with pytest.warns(UserWarning, match="trainer.group_size"):
    validate(cfg)


def test_model_config_defaults_resolve():
  mc = ModelConfig.from_config(tiny_config("mla"), vocab_size=100)
  assert mc.head_dim == 16 and mc.v_head_dim == 16 and mc.kv_heads == 4
  assert mc.mixer_kind(0) == "mla" and mc.ffn_kind(0) == "mlp"
  hybrid = ModelConfig.from_config(tiny_config("hybrid"), vocab_size=100)
  assert hybrid.layer_kinds == ("mamba", "attention", "mamba")
  assert hybrid.mamba2_head_dim == 64 * 2 // 8
  assert hybrid.ffn_kind(0) is None and hybrid.ffn_kind(1) == "mlp"


@pytest.mark.parametrize("name", ["seed_mla", "seed_moe", "seed_hybrid"])
def test_seed_yaml_examples_load_and_validate(name):
  cfg = load_seed_yaml(os.path.join(HERE, "data", f"{name}.yaml"))
  validate(cfg)
  if name == "seed_mla":
    assert cfg.model.hidden_size == 512 and cfg.model.vocab_size == 128354 and cfg.trainer.max_steps == 5000
    assert cfg.trainer.seq_len == 0  # trains at max_seq_len like the seed
  if name == "seed_moe":
    assert cfg.model.num_experts == 4 and cfg.trainer.load_balance_alpha == 0.01
  if name == "seed_hybrid":
    assert cfg.model.mamba_layers == (0, 1, 2, 4, 5, 6)
    mc = ModelConfig.from_config(cfg, vocab_size=256)
    assert [mc.mixer_kind(i) for i in (3, 7)] == ["mla", "mla"]


def test_yaml_unknown_key_and_type(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model:\n  hidden_sise: 64\n")
  with pytest.raises(ConfigError, match="did you mean model.hidden_size"):
    load_seed_yaml(str(bad))
  bad.write_text("model:\n  hidden_size: big\n")
  with pytest.raises(ConfigError, match="model.hidden_size: expected a int"):
    load_seed_yaml(str(bad))
  bad.write_text("model: [1, 2\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_seed_yaml(str(bad))
  with pytest.raises(ConfigError, match="not found"):
    load_seed_yaml(str(tmp_path / "missing.yaml"))


def test_config_files_build():
  sys.path.insert(0, ROOT)
  from configs import gqa, mla, yaml as yaml_cfg  # pylint: disable=g-import-not-at-top
  for cfg in (gqa.get_config(), mla.get_config(), mla.get_config("quick"),
              yaml_cfg.get_config(os.path.join(HERE, "data", "seed_mla.yaml"))):
    validate(cfg)
  m = mla.get_config().model
  assert (m.hidden_size, m.num_layers, m.num_heads, m.kv_latent_dim, m.q_latent_dim, m.d_rope,
          m.intermediate_size, m.max_seq_len) == (512, 8, 8, 192, 192, 16, 2048, 2048)
  assert gqa.get_config().model.kv_latent_dim == 0 and gqa.get_config().model.kv_heads == 4


def test_cli_override_and_unknown_override_fail_cleanly(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "mla_jax.train", "--config=configs/mla.py:quick", f"--workdir={tmp_path}"]
  out = subprocess.run(cmd + ["--config.model.d_rope=7"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config error: model.d_rope: must be even (RoPE rotates pairs), got 7")
  out = subprocess.run(cmd + ["--config.model.kv_latnt_dim=3"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0 and "kv_latnt_dim" in out.stderr and "Traceback" not in out.stderr
