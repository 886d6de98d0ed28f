"""The training loop: the real entry point on a shrunk config, accumulation, resume, the optimizer."""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config
from jax.sharding import PartitionSpec as P

from mla_jax import metric_writers, trainer
from mla_jax.config import ModelConfig
from mla_jax.data import BatchIterator
from mla_jax.layers.common import param_role
from mla_jax.model import LanguageModel, abstract_variables, count_params, flops_per_token, init_params
from mla_jax.optim import decay_mask, make_optimizer, make_schedule
from mla_jax.pytree import path_names
from mla_jax.train_state import TrainState
from mla_jax.train_step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = [
  "--config.model.hidden_size=64",
  "--config.model.num_layers=2",
  "--config.model.num_heads=4",
  "--config.model.intermediate_size=128",
  "--config.model.kv_latent_dim=32",
  "--config.model.q_latent_dim=32",
  "--config.model.d_rope=8",
  "--config.trainer.seq_len=32",
  "--config.trainer.max_steps=30",
  "--config.trainer.log_interval=5",
  "--config.trainer.eval_interval=15",
  "--config.trainer.eval_steps=2",
  "--config.trainer.warmup_steps=3",
  "--config.trainer.learning_rate=3e-3",
  "--config.data.max_bytes=1000000",
  "--config.sample.max_new_tokens=16",
]


def test_train_entry_point_end_to_end(tmp_path):
  """Shrink configs/mla.py:quick and run the real `python -m mla_jax.train`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "mla_jax.train",
      "--config=configs/mla.py:quick",
      f"--workdir={tmp_path}",
      "--config.trainer.profile_steps=3,4",
    ]
    + SHRINK,
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  for expected in (
    f"Config: mla: 2 layers (mla+mlp x2), hidden 64, 4 heads, vocab 320; learning rate 0.003, "
    f"warmup 3 steps; every key in {tmp_path / 'config.json'}",
    "Parameters: total",
    "FLOPs per step",
    "Compiled the train step",
    "validation loss",
    "Loss curve",
    "Sample (prompt",
    f"Profile of steps 3-4: {tmp_path / 'profile'}",
  ):
    assert expected in text, text[-2000:]
  assert json.load(open(tmp_path / "config.json"))["model"]["kv_latent_dim"] == 32
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r["loss"] for r in records if "loss" in r]
  assert len(train) == 6 and train[-1] < train[0] - 0.5, train
  assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
  assert any("val_loss" in r for r in records)
  assert (tmp_path / "loss.png").stat().st_size > 1000
  assert os.listdir(tmp_path / "checkpoints") == ["30"]
  # The same records in TensorBoard, with the sample text; the profile of steps 3-4 beside them.
  scalars = metric_writers.scalars(str(tmp_path))
  assert [v for _, v in scalars["train/loss"]] == pytest.approx(train) and "val/loss" in scalars
  assert len(scalars["train/learning_rate"]) == 6 and len(scalars["perf/tokens_per_s"]) == 6
  assert "train/grad_norm" in scalars and "perf/model_tflops_per_s" in scalars
  tags = {v.tag for e in metric_writers.read_events(str(tmp_path)) for v in e.summary.value}
  assert "sample/text_summary" in tags
  traces = [n for _, _, names in os.walk(tmp_path / "profile") for n in names]
  assert any(n.endswith(".xplane.pb") for n in traces), traces


def test_hybrid_config_trains_when_shrunk(tmp_path):
  """configs/hybrid.py:quick with small widths runs the real loop, and its loss falls."""
  from configs import hybrid

  config = hybrid.get_config("quick")
  m, t = config.model, config.trainer
  m.hidden_size, m.num_heads, m.intermediate_size, m.kv_latent_dim, m.q_latent_dim = 64, 4, 128, 32, 32
  m.mamba2_num_heads, m.mamba2_head_dim, m.mamba2_state_size, m.mamba2_chunk_size = 8, 16, 16, 16
  t.seq_len, t.max_steps, t.log_interval, t.eval_steps, t.learning_rate = 64, 16, 4, 2, 3e-3
  t.warmup_steps = 2
  config.data.max_bytes = 500_000
  config.sample.max_new_tokens = 0  # sampling is covered by test_train_entry_point_end_to_end
  out = io.StringIO()
  final = trainer.train_and_evaluate(config, str(tmp_path), stream=out)
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
  assert losses[-1] < losses[0] - 0.5, losses
  assert "mamba2" in out.getvalue() and np.isfinite(final["val_loss"])


def test_gradient_accumulation_is_one_update_on_summed_gradients():
  config = tiny_config("mla")
  config.trainer.max_grad_norm = 0.0  # clipping is per step either way; compare raw updates
  cfg = tiny_model_config("mla")
  model = LanguageModel(cfg)
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, cfg.vocab_size), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  results = []
  for accum in (1, 4):
    config.trainer.gradient_accumulation = accum
    tx, schedule = make_optimizer(config.trainer, 10), make_schedule(config.trainer, 10)
    state = TrainState.create(params, tx, jax.random.PRNGKey(2))
    step = make_train_step(config, model, tx, schedule, donate=False)
    new_state, metrics = step(state, batch)
    results.append((new_state, metrics))
  for new_state, metrics in results[1:]:
    np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], results[0][1]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(results[0][0].params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_update_is_skipped_and_the_schedule_stays_with_the_step():
  """A non-finite step keeps the params, is counted, and still advances the learning-rate schedule: the
  next step logs and applies schedule(step)."""
  config = tiny_config("gqa")
  t = config.trainer
  t.learning_rate, t.warmup_steps, t.max_grad_norm = 1e-2, 4, 0.0
  cfg = tiny_model_config("gqa")
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  tx, schedule = make_optimizer(t, 10), make_schedule(t, 10)
  step = make_train_step(config, LanguageModel(cfg), tx, schedule, donate=False)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 9), 0, cfg.vocab_size), np.int32)
  good = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((4, 8), np.float32)}
  bad = dict(good, weights=good["weights"] * np.float32("nan"))  # a non-finite loss and gradient
  state, metrics = step(TrainState.create(params, tx, jax.random.PRNGKey(2)), bad)
  assert int(metrics["skipped"]) == 1 and int(state.skipped) == 1
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  state, metrics = step(state, good)
  assert int(metrics["skipped"]) == 0 and int(state.skipped) == 0 and int(state.step) == 2
  logged = float(metrics["learning_rate"])
  np.testing.assert_allclose(logged, float(schedule(1)), rtol=1e-6)
  # Adam's first update moves each parameter by lr * g / (|g| + eps) (norm scales get no weight decay), so
  # the largest change of the final norm's scale is the rate the optimizer applied.
  change = state.params["final_norm"]["scale"] - params["final_norm"]["scale"]
  np.testing.assert_allclose(float(jnp.max(jnp.abs(change))), logged, rtol=1e-4)


def test_schedule_and_decay_mask():
  config = tiny_config("mla")
  t = config.trainer
  t.learning_rate, t.warmup_steps, t.min_lr_ratio = 1.0, 10, 0.1
  schedule = make_schedule(t, 110)
  assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - 1.0) < 1e-6
  assert abs(float(schedule(110)) - 0.1) < 1e-6 and 0.1 < float(schedule(60)) < 1.0
  params, _ = init_params(tiny_model_config("mla"), jax.random.PRNGKey(0))
  mask = decay_mask(t, params)
  assert mask["layer_0"]["mla"]["w_uk"]["kernel"] is True
  assert mask["layer_0"]["mixer_norm"]["scale"] is False and mask["embedding"] is False
  t.decay_norms = t.decay_embeddings = True
  mask = decay_mask(t, params)
  assert mask["layer_0"]["mixer_norm"]["scale"] is True and mask["embedding"] is True


def _by_layer_role(cfg, tree) -> dict:
  """{(layer index within the scanned period, parameter name): [values]} of a scanned or unscanned tree."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [name for name in path_names(path) if name != "layers"]
    if names[0].startswith("layer_"):
      names[0] = f"layer_{int(names[0][6:]) % cfg.scan_period}"
    out.setdefault("/".join(names), []).append(value)
  return out


def test_decay_mask_and_counts_follow_the_role_not_the_rank_under_scan():
  t = tiny_config("hybrid").trainer
  trees = {}
  for scan in (False, True):  # 4 layers: (Mamba2, MLA + MoE) x 2, stacked on a 'layers' axis when scanned
    cfg = tiny_model_config(
      "hybrid",
      num_layers=4,
      mamba_layers=(0, 2),
      num_experts=4,
      experts_per_tok=2,
      moe_intermediate_size=32,
      num_shared_experts=1,
      scan_layers=scan,
    )
    params, specs, _ = abstract_variables(cfg, 8)
    trees[scan] = (cfg, params)
    for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]:
      axes = [a for a in spec if a != "layers"]  # a role agrees with the logical axes of the unstacked leaf
      assert (param_role(path) in ("matrix", "embedding")) == (len(axes) >= 2), (path, spec)
  (cfg0, params0), (cfg1, params1) = trees[False], trees[True]
  assert cfg1.scan_period == 2 and params1["layers"]["layer_0"]["mamba2"]["A_log"].shape == (2, 8)
  for decay_norms in (False, True):
    t.decay_norms = decay_norms
    m, scanned = _by_layer_role(cfg0, decay_mask(t, params0)), _by_layer_role(cfg1, decay_mask(t, params1))
    assert sorted(m) == sorted(scanned)
    for name, values in m.items():
      assert set(values) == set(scanned[name]) and len(set(values)) == 1, name
    for name in ("A_log", "D", "dt_bias", "conv_bias"):
      assert m[f"layer_0/mamba2/{name}"] == [False, False]
    assert m["layer_0/mamba2/norm_scale"] == m["layer_1/mla/kv_norm/scale"] == [decay_norms] * 2
    for name in ("conv_kernel", "in_proj/kernel", "out_proj/kernel"):
      assert m[f"layer_0/mamba2/{name}"] == [True, True]
    for name in ("w_gate", "w_up", "w_down", "router/kernel", "shared_down/kernel"):
      assert m[f"layer_1/moe/{name}"] == [True, True]
  assert count_params(cfg0, params0) == count_params(cfg1, params1)
  assert flops_per_token(cfg0, params0, 32) == flops_per_token(cfg1, params1, 32)
  mamba2 = 3 * 8 + 160 + 128  # A_log, D, dt_bias, conv_bias, norm_scale
  vectors = 2 * mamba2 + 64 * (2 * 1 + 2 * 2 + 1) + 2 * (32 + 48)  # + 7 RMSNorm(64) + MLA q / kv norms
  assert count_params(cfg0, params0)["vectors"] == vectors


def test_resume_continues_the_same_trajectory(tmp_path, monkeypatch, capsys):
  """Also: progress lines by time, the resume line last before training, the warmup warning, a finished
  run started again, and a failed start that leaves nothing behind."""

  def run(workdir, steps, log_interval=1):
    config = tiny_config("mla")
    config.data.max_bytes = 300_000
    config.trainer.max_steps = 6
    config.trainer.warmup_steps = 10  # longer than the run: warned about
    config.trainer.save_interval = 3
    config.trainer.log_interval = log_interval
    config.sample.max_new_tokens = 0
    config.trainer.eval_steps = 0
    if steps < 6:  # an interrupted run: same schedule, stops early
      return train_and_evaluate_until(config, str(workdir), steps)
    out = io.StringIO()
    return trainer.train_and_evaluate(config, str(workdir), stream=out), out.getvalue()

  with monkeypatch.context() as m:
    m.setattr(trainer, "PROGRESS_SECONDS", 0.0)  # a progress line after every step, records every 2
    _, text = run(tmp_path / "unbroken", 6, log_interval=2)
  assert [int(line.split()[1].split("/")[0]) for line in text.splitlines() if line.startswith("step ")] == [
    1,
    2,
    3,
    4,
    5,
    6,
  ]
  assert "trainer.warmup_steps=10 is not below the 6 training steps" in capsys.readouterr().err
  run(tmp_path / "broken", 3)
  _, text = run(tmp_path / "broken", 6)
  lines = text.splitlines()
  resumed = lines.index(f"Resuming from {tmp_path / 'broken' / 'checkpoints'} step 3")
  assert lines[resumed - 1].startswith("Config: model: 2 layers (mla+mlp x2)")
  assert lines[resumed + 1].startswith("step")
  losses = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if "loss" in r}
  assert losses(tmp_path / "unbroken") == {s: l for s, l in losses(tmp_path / "broken").items() if s % 2 == 0}
  assert sorted(losses(tmp_path / "broken")) == [1, 2, 3, 4, 5, 6]

  files = lambda d: {p: os.stat(os.path.join(r, p)).st_mtime_ns for r, _, names in os.walk(d) for p in names}
  before = files(tmp_path / "unbroken")
  result, text = run(tmp_path / "unbroken", 6)  # started again when finished: nothing compiled or written
  assert result == {"already_complete": True, "step": 6}
  assert text == (
    f"Already complete: {tmp_path / 'unbroken' / 'checkpoints' / '6'} is the final checkpoint of "
    "this 6-step run; nothing to do (raise trainer.max_steps to train further)\n"
  )
  assert files(tmp_path / "unbroken") == before

  run(tmp_path / "new" / "failed", 0)  # fails in its first step: no empty workdir, checkpoints/ or metrics
  assert not (tmp_path / "new").exists()


def train_and_evaluate_until(config, workdir, stop_after):
  """Runs the real loop but raises out of it after `stop_after` steps (a crash after a save)."""

  class Stop(Exception):
    pass

  original = BatchIterator.__next__

  def limited(self):
    if self.step >= stop_after:
      raise Stop()
    return original(self)

  BatchIterator.__next__ = limited
  try:
    with pytest.raises(Stop):
      trainer.train_and_evaluate(config, workdir, stream=io.StringIO())
  finally:
    BatchIterator.__next__ = original


def test_a_converted_workdir_trains_on_from_its_step_0(tmp_path):
  """configs/workdir.py: the config stored with a converted (step-0) checkpoint continues training from it,
  starting from the converted weights."""
  from configs import workdir as workdir_config
  from mla_jax import workdir

  config = tiny_config("moe", num_layers=1)
  config.data.max_bytes, config.sample.max_new_tokens, config.model.vocab_size = 200_000, 0, 320
  config.trainer.eval_steps = 0
  cfg = ModelConfig.from_config(config)
  params, _ = init_params(cfg, jax.random.PRNGKey(7), 8)
  workdir.write(config, params, str(tmp_path))
  resumed = workdir_config.get_config(str(tmp_path))
  assert resumed.model.to_dict() == config.model.to_dict()
  resumed.trainer.max_steps = 1
  out = io.StringIO()
  trainer.train_and_evaluate(resumed, str(tmp_path), stream=out)
  assert f"Resuming from {tmp_path / 'checkpoints'} step 0" in out.getvalue()
  assert workdir.load(str(tmp_path)).step == 1
