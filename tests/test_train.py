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

from mla_jax.model import LanguageModel, init_params
from mla_jax.optim import decay_mask, make_optimizer, make_schedule
from mla_jax.train import train_and_evaluate
from mla_jax.train_step import TrainState, make_train_step

from conftest import tiny_config, tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = ["--config.model.hidden_size=64", "--config.model.num_layers=2", "--config.model.num_heads=4",
          "--config.model.intermediate_size=128", "--config.model.kv_latent_dim=32",
          "--config.model.q_latent_dim=32", "--config.model.d_rope=8", "--config.trainer.seq_len=32",
          "--config.trainer.max_steps=30", "--config.trainer.log_interval=5", "--config.trainer.eval_interval=15",
          "--config.trainer.eval_steps=2", "--config.trainer.warmup_steps=3",
          "--config.trainer.learning_rate=3e-3", "--config.data.max_bytes=1000000",
          "--config.sample.max_new_tokens=16"]


def test_train_entry_point_end_to_end(tmp_path):
  """Shrink configs/mla.py:quick and run the real `python -m mla_jax.train`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "mla_jax.train", "--config=configs/mla.py:quick",
                        f"--workdir={tmp_path}"] + SHRINK, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  for expected in ("model.kv_latent_dim = 32", "Parameters: total", "FLOPs per step", "Compiled the train step",
                   "validation loss", "Loss curve", "Sample (prompt"):
    assert expected in text, text[-2000:]
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r["loss"] for r in records if "loss" in r]
  assert len(train) == 6 and train[-1] < train[0] - 0.5, train
  assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
  assert any("val_loss" in r for r in records)
  assert (tmp_path / "loss.png").stat().st_size > 1000
  assert os.listdir(tmp_path / "checkpoints") == ["30"]


def test_hybrid_config_trains_when_shrunk(tmp_path):
  """configs/hybrid.py:quick with small widths runs the real loop, and its loss falls."""
  sys.path.insert(0, ROOT)
  from configs import hybrid  # pylint: disable=g-import-not-at-top
  config = hybrid.get_config("quick")
  m, t = config.model, config.trainer
  m.hidden_size, m.num_heads, m.intermediate_size, m.kv_latent_dim, m.q_latent_dim = 64, 4, 128, 32, 32
  m.mamba2_num_heads, m.mamba2_head_dim, m.mamba2_state_size, m.mamba2_chunk_size = 8, 16, 16, 16
  t.seq_len, t.max_steps, t.log_interval, t.eval_steps, t.learning_rate = 64, 16, 4, 2, 3e-3
  t.warmup_steps = 2
  config.data.max_bytes = 500_000
  config.sample.max_new_tokens = 0  # sampling is covered by test_train_entry_point_end_to_end
  out = io.StringIO()
  final = train_and_evaluate(config, str(tmp_path), stream=out)
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


def test_non_finite_update_is_skipped_and_counted():
  config = tiny_config("gqa")
  cfg = tiny_model_config("gqa")
  model = LanguageModel(cfg)
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  tx, schedule = make_optimizer(config.trainer, 10), make_schedule(config.trainer, 10)
  state = TrainState.create(params, tx, jax.random.PRNGKey(2))
  step = make_train_step(config, model, tx, schedule, donate=False)
  tokens = np.zeros((4, 9), np.int32)
  new_state, metrics = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  assert int(metrics["skipped"]) == 1 and int(new_state.skipped) == 1
  for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


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


def test_resume_continues_the_same_trajectory(tmp_path):
  def run(workdir, steps):
    config = tiny_config("mla")
    config.data.max_bytes = 300_000
    config.trainer.max_steps = 6
    config.trainer.save_interval = 3
    config.trainer.log_interval = 1
    config.sample.max_new_tokens = 0
    config.trainer.eval_steps = 0
    if steps < 6:  # an interrupted run: same schedule, stops early
      config.trainer.max_steps = 6
      return train_and_evaluate_until(config, str(workdir), steps)
    return train_and_evaluate(config, str(workdir), stream=io.StringIO())

  run(tmp_path / "unbroken", 6)
  run(tmp_path / "broken", 3)
  run(tmp_path / "broken", 6)
  losses = lambda d: [json.loads(l)["loss"] for l in open(d / "metrics.jsonl") if '"loss"' in l]
  assert losses(tmp_path / "unbroken") == losses(tmp_path / "broken")
  assert len(losses(tmp_path / "broken")) == 6


def train_and_evaluate_until(config, workdir, stop_after):
  """Runs the real loop but raises out of it after `stop_after` steps (a crash after a save)."""
  import mla_jax.train as train_lib  # pylint: disable=g-import-not-at-top

  class Stop(Exception):
    pass

  original = train_lib.BatchIterator.__next__

  def limited(self):
    if self.step >= stop_after:
      raise Stop()
    return original(self)

  train_lib.BatchIterator.__next__ = limited
  try:
    with pytest.raises(Stop):
      train_and_evaluate(config, workdir, stream=io.StringIO())
  finally:
    train_lib.BatchIterator.__next__ = original
