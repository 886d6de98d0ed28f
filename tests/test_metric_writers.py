"""metrics.jsonl + TensorBoard events, resume truncation, and the profiler's step window."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from mla_jax import metric_writers, profiling
from mla_jax.config import profile_window
from mla_jax.errors import ConfigError


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
  with metric_writers.MetricWriter(str(tmp_path)) as w:
    w.write({"step": 1, "loss": 2.5, "learning_rate": 1e-3, "tokens_per_s": 100.0})
    w.write({"step": 2, "val_loss": 2.0})
    w.histogram(1, "moe/expert_load", [0.1, 0.2, 0.7])
    w.text(2, "sample", "hello")
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 1, "loss": 2.5, "learning_rate": 1e-3, "tokens_per_s": 100.0}, {"step": 2, "val_loss": 2.0}]
  s = metric_writers.scalars(str(tmp_path))
  assert s["train/loss"] == [(1, 2.5)] and s["perf/tokens_per_s"] == [(1, 100.0)]
  assert s["val/loss"] == [(2, 2.0)] and s["train/learning_rate"][0][0] == 1
  events = metric_writers.read_events(str(tmp_path))
  tags = {v.tag for e in events for v in e.summary.value}
  assert {"moe/expert_load", "sample/text_summary"} <= tags


def test_resume_keeps_records_up_to_the_checkpoint_and_purges_later_events(tmp_path):
  with metric_writers.MetricWriter(str(tmp_path)) as w:
    for step in (1, 2, 3, 4):
      w.write({"step": step, "loss": float(10 - step)})
  with metric_writers.MetricWriter(str(tmp_path), start_step=2) as w:  # resumed from the step-2 checkpoint
    assert [r["step"] for r in w.history] == [1, 2]
    w.write({"step": 3, "loss": 0.5})
  assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
  # The second event file opens with a purge marker at step 3: TensorBoard drops the first run's 3 and 4.
  events = metric_writers.read_events(str(tmp_path))
  purges = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
  assert purges == [3]


def test_disabled_writer_writes_nothing(tmp_path):
  with metric_writers.MetricWriter(str(tmp_path), enabled=False) as w:
    w.write({"step": 1, "loss": 1.0})
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text", ["10", "a,b", "0,3", "5,4", "1,2,3", "-1,2"])
def test_bad_profile_steps_name_the_key(text):
  with pytest.raises(ConfigError, match=r"trainer\.profile_steps"):
    profile_window(text)


def test_profiler_traces_the_window(tmp_path):
  assert profile_window("") is None and profile_window(" 2, 3") == (2, 3)
  said = []
  prof = profiling.StepProfiler((2, 3), str(tmp_path), said.append)
  f = jax.jit(lambda x: x @ x)
  x = jnp.ones((8, 8))
  for step in (1, 2, 3, 4):
    prof.before(step)
    assert prof.active == (step in (2, 3))
    x = f(x) / 8
    prof.after(step, x)
  assert not prof.active and len(said) == 1 and "steps 2-3" in said[0]
  files = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "profile") for n in names]
  assert any(n.endswith(".xplane.pb") for n in files), files
