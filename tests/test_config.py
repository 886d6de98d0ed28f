"""Every validation rule raises an error naming its key; unread keys warn; seed YAML files load; overrides
work; every config error reaches the command line as one line; --help lists the flags and config files."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
from conftest import tiny_config

from mla_jax import config
from mla_jax.config import (
  ModelConfig,
  default_config,
  from_saved,
  mla_enabled,
  model_layer_kinds,
  moe_enabled,
  q_latent_enabled,
  validate,
  warn_unused_vocab,
)
from mla_jax.errors import CheckpointError, ConfigError, DataError, TrainingError, UserError, WorkdirError
from mla_jax.seed_yaml import load_seed_yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _set(cfg, dotted, value):
  section, key = dotted.split(".")
  cfg[section][key] = value


BAD = [
  ({"model.hidden_size": 60, "model.num_heads": 8}, "model.hidden_size", "not divisible by model.num_heads"),
  (
    {"model.kv_latent_dim": 0, "model.d_rope": 0, "model.q_latent_dim": 0, "model.kv_heads": 3},
    "model.kv_heads",
    "not divisible",
  ),
  ({"model.kv_heads": 3}, "model.kv_heads", "not divisible"),  # unused by MLA, but wrong for any model
  ({"model.d_rope": 7}, "model.d_rope", "must be even"),
  ({"model.d_rope": 0}, "model.d_rope", "must be positive when kv_latent_dim"),
  (
    {"model.q_latent_dim": 0, "model.mla_q_rope_from_input": True},
    "model.mla_q_rope_from_input",
    "needs MLA with query compression",
  ),
  ({"model.hidden_size": 0}, "model.hidden_size", "must be positive"),
  ({"model.num_layers": -1}, "model.num_layers", "must be positive"),
  ({"model.kv_latent_dim": -4}, "model.kv_latent_dim", ">= 0"),
  ({"model.num_experts": 4, "model.experts_per_tok": 5}, "model.experts_per_tok", "1 <= experts_per_tok"),
  ({"model.num_experts": 4, "model.experts_per_tok": 0}, "model.experts_per_tok", "1 <= experts_per_tok"),
  ({"model.mamba_layers": (0, 9)}, "model.mamba_layers", "outside"),
  ({"model.mamba_layers": (0,), "model.mamba2_num_heads": 0}, "model.mamba2_num_heads", "must be positive"),
  (
    {"model.mamba_layers": (0,), "model.mamba2_num_heads": 8, "model.mamba2_head_dim": 8},
    "model.mamba2_head_dim",
    "must equal",
  ),
  (
    {"model.mamba_layers": (0,), "model.mamba2_num_heads": 8, "model.mamba2_n_groups": 3},
    "model.mamba2_n_groups",
    "not divisible",
  ),
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


def _warnings_of(cfg) -> list[str]:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")  # Python's own filter: each message once per place
    validate(cfg)
    validate(cfg)
  return [str(w.message) for w in caught]


def test_keys_the_model_does_not_read_warn_once_naming_the_key():
  for kind in ("gqa", "mla", "mla_noq", "moe", "mamba2", "hybrid"):
    assert _warnings_of(tiny_config(kind)) == [], kind
  from configs import gqa, hybrid, mamba2, mla, moe

  for module in (gqa, hybrid, mamba2, mla, moe):  # the config files set nothing their model ignores
    assert _warnings_of(module.get_config()) == [] and _warnings_of(module.get_config("quick")) == []
  with warnings.catch_warnings(record=True):
    mla_kv = tiny_config("mla", kv_heads=2)
  [kv] = _warnings_of(mla_kv)
  assert kv.startswith("model.kv_heads=2 is ignored by MLA layers")
  gqa_cfg = tiny_config("gqa")
  gqa_cfg.model.v_head_dim, gqa_cfg.model.q_latent_dim, gqa_cfg.model.d_rope = 8, 16, 8
  ignored = _warnings_of(gqa_cfg)
  assert [w.split(" is ")[0] for w in ignored] == ["model.v_head_dim=8", "model.q_latent_dim=16", "model.d_rope=8"]
  assert all("it is an MLA key and model.kv_latent_dim is 0" in w for w in ignored)


def test_vocab_far_above_the_tokenizer_warns_with_the_wasted_parameters():
  cfg = load_seed_yaml(os.path.join(HERE, "data", "seed_mla.yaml"))
  with pytest.warns(UserWarning) as caught:
    warn_unused_vocab(cfg, 257)
  assert str(caught[0].message) == (
    "model.vocab_size=128,354 is far above the tokenizer's vocabulary (257): 128,097 embedding and output rows "
    "are never used, 131,171,328 parameters wasted; model.vocab_size=0 follows the tokenizer"
  )
  cfg.model.tie_embeddings = True
  with pytest.warns(UserWarning, match="128,097 embedding rows are never used, 65,585,664 parameters"):
    warn_unused_vocab(cfg, 257)
  for vocab in (0, 320, 32_768):  # follows the tokenizer, padded for sharding, a tokenizer of 32,000
    cfg.model.vocab_size = vocab
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      warn_unused_vocab(cfg, 257 if vocab < 1000 else 32_000)


def test_every_user_error_can_be_built_from_one_message():
  for error_type in (UserError, ConfigError, DataError, CheckpointError, WorkdirError, TrainingError):
    assert str(error_type("what went wrong")) == "what went wrong"
  error = ConfigError("model.d_rope", "must be even: got 7")
  assert (error.key, error.rule, str(error)) == (
    "model.d_rope",
    "must be even: got 7",
    "config error: model.d_rope: must be even: got 7",
  )
  # ml_collections re-raises a config file's error as type(e)(text holding the traceback)
  text = (
    'Error whilst parsing config file:\n\nTraceback (most recent call last):\n  File "x.py", line 1\n'
    "mla_jax.errors.ConfigError: config error: config: YAML file a.yaml not found\n"
  )
  again = ConfigError(text)
  assert (again.key, again.rule, str(again)) == (
    "config",
    "YAML file a.yaml not found",
    "config error: config: YAML file a.yaml not found",
  )
  copy = pickle.loads(pickle.dumps(error))
  assert (copy.key, copy.rule, str(copy)) == (error.key, error.rule, str(error))


# (tiny_config kind, model overrides) -> each 0 sentinel's resolved ModelConfig value.
SENTINELS = [
  ("mla", {}, {"head_dim": 64 // 4, "v_head_dim": 16, "kv_heads": 4, "intermediate_size": 128}),
  (
    "gqa",
    {"head_dim": 8, "intermediate_size": 0},
    {"head_dim": 8, "v_head_dim": 8, "kv_heads": 2, "intermediate_size": 4 * 64, "moe_intermediate_size": 256},
  ),
  ("mla", {"v_head_dim": 12}, {"head_dim": 16, "v_head_dim": 12}),
  ("moe", {}, {"moe_intermediate_size": 64, "num_shared_experts": 1}),
  (
    "moe",
    {"moe_intermediate_size": 0, "shared_expert_enabled": False},
    {"moe_intermediate_size": 128, "num_shared_experts": 0},
  ),
  ("hybrid", {}, {"mamba2_head_dim": 64 * 2 // 8, "layer_kinds": ("mamba", "attention", "mamba")}),
  ("hybrid", {"mamba2_head_dim": 16}, {"mamba2_head_dim": 16}),
  ("hybrid", {"mamba_layers": (), "layer_pattern": "AMA"}, {"layer_kinds": ("attention", "mamba", "attention")}),
  ("gqa", {"vocab_size": 300}, {"vocab_size": 300}),
  ("gqa", {}, {"vocab_size": 100, "mamba2_head_dim": 0, "layer_kinds": ("attention", "attention")}),
]


@pytest.mark.parametrize("kind,overrides,resolved", SENTINELS)
def test_each_zero_sentinel_resolves(kind, overrides, resolved):
  mc = ModelConfig.from_config(tiny_config(kind, **overrides), vocab_size=100)
  assert {key: getattr(mc, key) for key in resolved} == resolved


def test_vocab_size_zero_needs_the_tokenizer():
  with pytest.raises(ConfigError, match="model.vocab_size: is 0 and no tokenizer gave a vocabulary size"):
    ModelConfig.from_config(tiny_config("mla"))


# (tiny_config kind, model overrides) -> (MLA, query latent, MoE, mixer per layer, FFN per layer, scan period).
MODES = [
  ("gqa", {}, (False, False, False, ("gqa", "gqa"), ("mlp", "mlp"), 1)),
  ("gqa", {"q_latent_dim": 0, "kv_heads": 1}, (False, False, False, ("gqa", "gqa"), ("mlp", "mlp"), 1)),
  ("mla", {}, (True, True, False, ("mla", "mla"), ("mlp", "mlp"), 1)),
  ("mla_noq", {}, (True, False, False, ("mla", "mla"), ("mlp", "mlp"), 1)),
  ("moe", {}, (True, True, True, ("mla", "mla"), ("moe", "moe"), 1)),
  ("moe", {"first_dense_layers": 1}, (True, True, True, ("mla", "mla"), ("mlp", "moe"), 2)),
  ("mamba2", {}, (False, False, False, ("mamba2", "mamba2"), (None, None), 1)),
  ("mamba2", {"mamba_ffn": True}, (False, False, False, ("mamba2", "mamba2"), ("mlp", "mlp"), 1)),
  ("hybrid", {}, (True, True, False, ("mamba2", "mla", "mamba2"), (None, "mlp", None), 3)),
  (
    "hybrid",
    {"mamba_layers": (), "layer_pattern": "MAM", "num_experts": 4, "moe_intermediate_size": 64},
    (True, True, True, ("mamba2", "mla", "mamba2"), (None, "moe", None), 3),
  ),
]


@pytest.mark.parametrize("kind,overrides,modes", MODES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MODES)])
def test_mode_switches_agree_for_a_config_section_and_its_model_config(kind, overrides, modes):
  cfg = tiny_config(kind, **overrides)
  mc = ModelConfig.from_config(cfg, vocab_size=100)
  mla, q_latent, moe, mixers, ffns, period = modes
  for m in (cfg.model, mc):  # the switches read keys that ModelConfig keeps as they are
    assert (mla_enabled(m), q_latent_enabled(m), moe_enabled(m)) == (mla, q_latent, moe)
    assert model_layer_kinds(m) == tuple("mamba" if x == "mamba2" else "attention" for x in mixers)
  assert (mc.use_mla, mc.use_q_latent, mc.use_moe) == (mla, q_latent, moe)
  assert mc.attention_kind == ("mla" if mla else "gqa")
  assert tuple(mc.mixer_kind(i) for i in range(mc.num_layers)) == mixers
  assert tuple(mc.ffn_kind(i) for i in range(mc.num_layers)) == ffns
  assert mc.scan_period == period


def _other_value(k: config.Key):
  """A value other than the row's default; a 0 sentinel becomes 1, which every resolver keeps."""
  if k.choices:
    return next(c for c in k.choices if c != k.default)
  if isinstance(k.default, bool):
    return not k.default
  return k.default + 1


def test_the_key_tables_are_the_only_schema():
  """default_config, ModelConfig's fields and from_config all come from the tables: every model key is a
  ModelConfig field (of the table's type, reading that key) or declared as none."""
  defaults = default_config()
  for section, keys in config.SECTIONS.items():
    assert list(defaults[section].keys()) == sorted(k.name for k in keys if k.config), section
    assert all(defaults[section][k.name] == k.default for k in keys if k.config), section
  fields = dataclasses.fields(ModelConfig)
  rows = [k for k in config.MODEL if k.field]
  assert [(f.name, f.type) for f in fields] == [(k.name, k.field_type) for k in rows]
  assert [k.name for k in config.MODEL if not k.field] == ["name", "mamba_layers", "layer_pattern"]
  assert all(k.resolve for k in config.MODEL if not k.config)  # fields that are not keys are computed
  hash(ModelConfig.from_config(defaults, vocab_size=10))
  with pytest.raises(dataclasses.FrozenInstanceError):
    ModelConfig.from_config(defaults, vocab_size=10).hidden_size = 3

  base = tiny_config("hybrid", num_experts=4, moe_intermediate_size=64, vocab_size=50)
  mc = ModelConfig.from_config(base)
  for f in fields:
    assert isinstance(getattr(mc, f.name), f.type if f.name != "layer_kinds" else tuple), f.name
  for k in (k for k in rows if k.config):
    changed = config.ml_collections.ConfigDict(base.to_dict())
    changed.model[k.name] = _other_value(k)
    assert getattr(ModelConfig.from_config(changed), k.name) == _other_value(k), k.name


def test_a_model_section_saved_before_newer_keys_resolves_with_their_defaults():
  cfg = tiny_config("mla")
  old = {k: v for k, v in cfg.model.to_dict().items() if k not in ("remat", "attention_chunk_size")}
  assert ModelConfig.from_config(config.ml_collections.ConfigDict(old), vocab_size=64) == (
    ModelConfig.from_config(cfg, vocab_size=64)
  )


@pytest.mark.parametrize("name", ["seed_mla", "seed_moe", "seed_hybrid"])
def test_seed_yaml_examples_load_and_validate(name):
  cfg = load_seed_yaml(os.path.join(HERE, "data", f"{name}.yaml"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    validate(cfg)
  assert [str(w.message).split(" is ")[0] for w in caught] == (["model.kv_heads=4"] if name == "seed_mla" else [])
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
  from configs import gqa, mla
  from configs import yaml as yaml_cfg

  for cfg in (
    gqa.get_config(),
    mla.get_config(),
    mla.get_config("quick"),
    yaml_cfg.get_config(os.path.join(HERE, "data", "seed_mla.yaml")),
  ):
    with warnings.catch_warnings(record=True):
      validate(cfg)
  m = mla.get_config().model
  assert (
    m.hidden_size,
    m.num_layers,
    m.num_heads,
    m.kv_latent_dim,
    m.q_latent_dim,
    m.d_rope,
    m.intermediate_size,
    m.max_seq_len,
  ) == (512, 8, 8, 192, 192, 16, 2048, 2048)
  assert gqa.get_config().model.kv_latent_dim == 0 and gqa.get_config().model.kv_heads == 4


def _run_command_lines(cases: list[tuple[str, list[str]]]) -> list[dict]:
  """[{"rc", "stdout", "stderr"}] of `python -m MODULE ARGS` for each case (tests/cli_helper.py)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    [sys.executable, "tests/cli_helper.py"],
    input=json.dumps(cases),
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def test_command_lines_report_config_errors_in_one_line_and_help_lists_flags_and_configs(tmp_path):
  """Config errors through the real entry points (YAML files included), warnings, and --help."""
  files = {
    "unknown_key": "model:\n  hidden_sise: 64\n",
    "broken": "model: [1, 2\n",
    "bad_type": "model:\n  hidden_size: big\n",
    "bad_rule": "model:\n  kv_latent_dim: 32\n  d_rope: 7\n",
  }
  for name, text in files.items():
    (tmp_path / f"{name}.yaml").write_text(text)
  w = tmp_path / "w"
  yaml = lambda name, *rest: [f"--config=configs/yaml.py:{tmp_path / name}.yaml", f"--workdir={w}", *rest]
  quick = lambda *rest: ["--config=configs/mla.py:quick", f"--workdir={w}", *rest]
  errors = [  # (args, the one line on stderr); all fail before anything is compiled
    (
      yaml("missing"),
      f"error: flag --config=configs/yaml.py:{tmp_path}/missing.yaml: config error: config: "
      f"YAML file {tmp_path}/missing.yaml not found",
    ),
    (
      yaml("unknown_key"),
      f"error: flag --config=configs/yaml.py:{tmp_path}/unknown_key.yaml: config error: "
      "model.hidden_sise: unknown key; did you mean model.hidden_size?",
    ),
    (
      yaml("broken"),
      f"error: flag --config=configs/yaml.py:{tmp_path}/broken.yaml: config error: config: "
      f"{tmp_path}/broken.yaml is not valid YAML (while parsing a flow sequence)",
    ),
    (
      yaml("bad_type"),
      f"error: flag --config=configs/yaml.py:{tmp_path}/bad_type.yaml: config error: "
      f"model.hidden_size: expected a int, got 'big' in {tmp_path}/bad_type.yaml",
    ),
    (yaml("bad_rule"), "error: config error: model.d_rope: must be even (RoPE rotates pairs), got 7"),
    (
      ["--config=configs/yaml.py", f"--workdir={w}"],
      "error: flag --config=configs/yaml.py: config error: config: configs/yaml.py needs a path: ",
    ),
    (
      quick("--config.model.kv_latnt_dim=3"),
      "error: config error: model.kv_latnt_dim: unknown key; did you mean model.kv_latent_dim?",
    ),
    (quick("--config.trainr.max_steps=3"), "error: config error: trainr.max_steps: unknown key; did you mean trainer?"),
    (quick("--config.model.d_rope=7"), "error: config error: model.d_rope: must be even (RoPE rotates pairs), got 7"),
    (
      quick("--config.model.kv_heads=3"),
      "error: config error: model.kv_heads: model.num_heads=8 is not divisible by kv_heads=3",
    ),  # unused by MLA, wrong for any model
    (quick("--config.trainer.max_steps=ten"), "error: flag --config.trainer.max_steps=ten: invalid literal"),
    (["--config=configs/mla.py:bogus", f"--workdir={w}"], "unknown config argument 'bogus'"),
    (
      ["--config=configs/nope.py", f"--workdir={w}"],
      "error: flag --config: cannot load config file 'configs/nope.py' (missing or unreadable); config files: "
      + ", ".join(
        f"configs/{n}"
        for n in sorted(os.listdir(os.path.join(ROOT, "configs")))
        if n.endswith(".py") and not n.startswith("_")
      ),
    ),
  ]
  # The seed's MLA YAML loads (warning about its kv_heads and its vocabulary) and a failed start leaves no
  # workdir behind.
  seed = [
    "--config=configs/yaml.py:tests/data/seed_mla.yaml",
    f"--workdir={tmp_path / 'new' / 'run'}",
    "--config.data.corpus=/nonexistent/corpus",
  ]
  entry_points = ["train", "generate", "evaluate", "convert"]
  if os.path.exists(os.path.join(ROOT, "mla_jax", "compile.py")):
    entry_points.append("compile")
  cases = [("mla_jax.train", args) for args, _ in errors] + [("mla_jax.train", seed)]
  cases += [(f"mla_jax.{name}", ["--help"]) for name in entry_points]
  results = _run_command_lines(cases)

  for (args, expected), out in zip(errors, results):
    lines = out["stderr"].strip().splitlines()
    assert out["rc"] == 2 and len(lines) == 1, (args, out)
    assert lines[0].startswith("error: ") and expected in lines[0], (args, lines)
  out = results[len(errors)]
  assert out["rc"] == 2 and out["stderr"].strip().splitlines() == [
    "warning: model.kv_heads=4 is ignored by MLA layers (their keys and values come from the kv_latent_dim "
    "latent); it only sets the GQA row that generate --report_cache compares against",
    "warning: model.vocab_size=128,354 is far above the tokenizer's vocabulary (257): 128,097 embedding and "
    "output rows are never used, 131,171,328 parameters wasted; model.vocab_size=0 follows the tokenizer",
    "error: /nonexistent/corpus: data path not found",
  ], out
  assert not (tmp_path / "new").exists()

  helps = dict(zip(entry_points, results[len(errors) + 1 :]))
  for name, out in helps.items():
    assert out["rc"] == 0 and "Unknown command line flag" not in out["stderr"], (name, out)
    assert f"python -m mla_jax.{name}" in out["stdout"] and "\nFlags:\n" in out["stdout"], (name, out["stdout"])
  expected = {
    "train": [
      "  --workdir\n      Directory for checkpoints, metrics and plots.",
      "  --config.SECTION.KEY=VALUE\n",
      "  --num_processes\n      Multi-process:",
      "  configs/mla.py[:quick]",
      'The seed\'s "Standalone MLA" example',
      "  configs/yaml.py:path/to/model.yaml",
    ],
    "generate": [
      "  --prompt\n      Text to continue.",
      "  --temperature\n      Sampling temperature; 0 is greedy. (default: 0.8)",
      "  configs/hybrid.py[:quick]",
    ],
    "evaluate": ["  --workdir\n      Training workdir whose newest checkpoint is evaluated."],
    "convert": ["  --hf\n      Hugging Face model folder", "  --seed_yaml\n"],
  }
  for name, texts in expected.items():
    for text in texts:
      assert text in helps[name]["stdout"], (name, text, helps[name]["stdout"])
  assert "--chex_n_cpu_devices" not in helps["train"]["stdout"]  # only the entry point's own flags
  assert "--experimental_orbax" not in helps["train"]["stdout"]


def test_a_config_saved_before_newer_keys_loads_with_their_defaults():
  config = default_config()
  config.model.mamba_layers, config.model.mamba2_num_heads = (0, 2), 8
  saved = json.loads(config.to_json())
  del saved["model"]["remat"], saved["trainer"]["loss_chunk_size"]
  restored = from_saved(saved)
  validate(restored)
  assert restored.to_json() == config.to_json()
