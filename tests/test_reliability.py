"""Long runs: exact resume, preemption, killed saves, corrupt or mismatched checkpoints, resharding on
restore, non-finite stops, failed saves and bad inputs.

One shrunk configs/mla.py:quick run (12 steps, saves every 4) is the reference; subprocess runs use the
same flags and the same persistent compilation cache, so the train step compiles once.
"""

import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config
from orbax.checkpoint._src.path import atomicity
from reliability_helper import build_state, eval_loss

from configs import mla as mla_config
from mla_jax import checkpoint as ckpt_lib
from mla_jax import train_step as train_step_lib
from mla_jax.data import BatchIterator
from mla_jax.errors import CheckpointError, TrainingError, WorkdirError
from mla_jax.trainer import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(
  os.environ,
  JAX_PLATFORMS="cpu",
  JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".pytest_cache", "jax"),
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
)
ENV.pop("XLA_FLAGS", None)
STEPS = 12
BASE = {
  "model.hidden_size": 64,
  "model.num_layers": 2,
  "model.num_heads": 4,
  "model.intermediate_size": 128,
  "model.kv_latent_dim": 32,
  "model.q_latent_dim": 32,
  "model.d_rope": 8,
  "trainer.seq_len": 32,
  "trainer.batch_size": 4,
  "trainer.max_steps": STEPS,
  "trainer.warmup_steps": 3,
  "trainer.learning_rate": 3e-3,
  "trainer.log_interval": 1,
  "trainer.save_interval": 4,
  "trainer.max_checkpoints": 1,
  "trainer.keep_best": True,
  "trainer.eval_steps": 1,
  "trainer.eval_interval": 1000,
  "sample.max_new_tokens": 0,
  "data.max_bytes": 300_000,
}


def quick_config(**changes):
  """configs/mla.py:quick with BASE (and `changes`, dotted keys with '__' for '.') applied."""
  config = mla_config.get_config("quick")
  for key, value in {**BASE, **{k.replace("__", "."): v for k, v in changes.items()}}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def cli_flags(workdir, **changes) -> list[str]:
  """The command-line flags that build quick_config(**changes) in `workdir`."""
  values = {**BASE, **{k.replace("__", "."): v for k, v in changes.items()}}
  return ["--config=configs/mla.py:quick", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()]


def run_inline(workdir, config=None) -> tuple[dict, str]:
  out = io.StringIO()
  result = train_and_evaluate(config or quick_config(), str(workdir), stream=out)
  return result, out.getvalue()


def losses(workdir) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def saved_state(workdir, step: int):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def assert_trees_equal(a, b) -> None:
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The unbroken 12-step run: (workdir, printed output)."""
  workdir = tmp_path_factory.mktemp("reference")
  _, text = run_inline(workdir)
  return workdir, text


def test_preempted_and_resumed_run_is_identical_to_an_unbroken_one(reference, tmp_path, monkeypatch):
  ref, ref_text = reference
  next_batch = BatchIterator.__next__

  def preempt_before_step_6(self):
    if self.step == 5:
      os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: finish step 6, save, return
    return next_batch(self)

  with monkeypatch.context() as m:
    m.setattr(BatchIterator, "__next__", preempt_before_step_6)
    result, text = run_inline(tmp_path)
  assert result["stopped_by"] == "SIGTERM" and result["step"] == 6
  assert "Stopped by SIGTERM after step 6" in text and "To resume, run:" in text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]
  _, text = run_inline(tmp_path)
  assert f"Resuming from {tmp_path / 'checkpoints'} step 6" in text

  assert losses(tmp_path) == losses(ref) and len(losses(ref)) == STEPS
  assert_trees_equal(saved_state(tmp_path, STEPS), saved_state(ref, STEPS))

  # keep_best: the newest checkpoint plus the lowest validation loss; each carries the loss measured there.
  with open(ref / "metrics.jsonl") as f:
    val = {r["step"]: r["val_loss"] for r in map(json.loads, f) if "val_loss" in r}
  assert sorted(val) == [4, 8, 12]
  best = min(val, key=val.get)
  kept = sorted(int(s) for s in os.listdir(ref / "checkpoints"))
  assert kept == sorted({best, STEPS})
  manager = ckpt_lib.Checkpointer(ref, max_to_keep=1, keep_best=True)
  assert manager.best_step() == (best, pytest.approx(val[best]))
  assert all(manager.manager.metrics(s)["val_loss"] == pytest.approx(val[s]) for s in kept)
  manager.close()
  assert f"Best checkpoint: {ref / 'checkpoints' / str(best)}" in ref_text


def test_keep_best_retention_keeps_newest_and_lowest_validation_loss(tmp_path):
  state = {"w": jnp.arange(6.0)}
  checkpointer = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, keep_best=True, async_save=False)
  for step, val_loss in zip(range(1, 6), [3.0, 1.0, 2.0, 4.0, 5.0]):
    checkpointer.save(step, state, {"step": step}, tiny_config(), val_loss)
  checkpointer.save(6, state, {"step": 6}, tiny_config())  # e.g. a SIGTERM save: no validation loss
  checkpointer.close()
  checkpointer = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, keep_best=True)
  assert checkpointer.all_steps() == [2, 5, 6]
  assert checkpointer.best_step() == (2, 1.0)
  checkpointer.close()


def _run(args, **kwargs):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kwargs
  )


def test_sigkill_during_a_save_resumes_from_the_last_good_checkpoint(reference, tmp_path):
  ref, _ = reference
  helper = [sys.executable, "tests/reliability_helper.py", "hold-save", "8", "--"]
  proc = subprocess.Popen(
    helper + cli_flags(tmp_path), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  ckpt = tmp_path / "checkpoints"
  deadline = time.time() + 300
  while not (ckpt.is_dir() and any(n.startswith("8.orbax-checkpoint-tmp") for n in os.listdir(ckpt))):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  proc.kill()  # SIGKILL while step 8 is being written
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  names = os.listdir(ckpt)
  assert "8" not in names and "4" in names and any(n.startswith("8.orbax-checkpoint-tmp") for n in names)

  out = _run(["-m", "mla_jax.train", *cli_flags(tmp_path)])
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resuming from {ckpt} step 4" in out.stdout
  assert not any("tmp" in n for n in os.listdir(ckpt))
  assert losses(tmp_path) == losses(ref)
  assert_trees_equal(saved_state(tmp_path, STEPS), saved_state(ref, STEPS))


def test_sigterm_saves_the_current_step_and_prints_the_resume_command(reference, tmp_path):
  ref, _ = reference
  flags = cli_flags(tmp_path)
  proc = subprocess.Popen(
    [sys.executable, "tests/reliability_helper.py", "slow-data", "0.3", "--", *flags],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  for line in proc.stdout:
    if line.startswith("step "):
      break
  proc.send_signal(signal.SIGTERM)
  rest, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "SIGTERM received: finishing the current step and writing a checkpoint, then exiting.\n" in err
  stopped = re.search(r"Stopped by SIGTERM after step (\d+); saved (\S+)\. To resume, run:\n  (.+)\n", rest)
  assert stopped, rest[-2000:]
  step = int(stopped.group(1))
  assert 1 <= step < STEPS and stopped.group(2) == str(tmp_path / "checkpoints" / str(step))
  assert int(saved_state(tmp_path, step)["step"]) == step
  command = f"cd {shlex.quote(ROOT)} && {shlex.join([sys.executable, '-m', 'mla_jax.train', *flags])}"
  assert stopped.group(3) == command  # what the SIGKILL test runs to resume
  assert [loss for s, loss in losses(tmp_path)] == [loss for s, loss in losses(ref)][:step]


STOP_SIGNALS_SCRIPT = """
import signal, sys, time
from mla_jax.preemption import StopSignals
with StopSignals():
  signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # the main thread is busy outside Python
  print("ready", flush=True)
  time.sleep(60)
print("not reached", flush=True)
"""


def test_ctrl_c_is_acknowledged_at_once_and_a_second_one_exits_without_saving():
  """While the main thread waits (here: cannot run Python handlers), the first Ctrl-C is answered at once
  and the second one exits with 130."""
  start = time.time()
  proc = subprocess.Popen(
    [sys.executable, "-c", STOP_SIGNALS_SCRIPT],
    cwd=ROOT,
    env=ENV,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  assert proc.stdout.readline() == "ready\n"
  proc.send_signal(signal.SIGINT)
  first = proc.stderr.readline() + proc.stderr.readline()
  assert first == (
    "\nCtrl-C (SIGINT) received: finishing the current step and writing a checkpoint, then "
    "exiting; press Ctrl-C again to stop at once without saving.\n"
  )
  assert proc.poll() is None  # still running: the step and the save would go on
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 130 and out == ""
  assert err == "\nSecond Ctrl-C: stopping now without saving (the last complete checkpoint is kept).\n"
  assert time.time() - start < 30


def _truncate_tree(directory) -> None:
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path):
  config = tiny_config("mla")
  config.model.vocab_size = 64
  state = build_state(config)
  target = ckpt_lib.abstract(state)
  checkpointer = ckpt_lib.Checkpointer(tmp_path)
  for step in (2, 4):
    checkpointer.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), {"step": step}, config)
  checkpointer.wait()
  ckpt, aside = tmp_path / "checkpoints", tmp_path / "checkpoints.corrupt"

  _truncate_tree(ckpt / "4" / "state")  # a partly copied checkpoint
  warnings = []
  step, restored, meta = checkpointer.restore_latest(target, warn=warnings.append)
  assert step == 2 and meta["data"] == {"step": 2} and int(restored.step) == 2
  assert_trees_equal(restored.params, state.params)
  assert len(warnings) == 1 and f"checkpoint {ckpt / '4'} is unreadable" in warnings[0]
  assert f"moved it to {aside / '4'} and resuming from step 2" in warnings[0]
  assert checkpointer.all_steps() == [2] and sorted(os.listdir(aside)) == ["4"]

  checkpointer.save(4, state, {"step": 4}, config)  # the step can be written again
  checkpointer.wait()
  (ckpt / "4" / "meta" / "metadata").write_text("{not json")
  warnings.clear()
  assert checkpointer.restore_latest(target, warn=warnings.append)[0] == 2
  assert len(warnings) == 1 and sorted(os.listdir(aside)) == ["4", "4.1"]

  _truncate_tree(ckpt / "2")
  with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*checkpoints \(step 2: "):
    checkpointer.restore_latest(target, warn=warnings.append)
  assert os.listdir(ckpt) == ["2"] and len(warnings) == 1  # nothing moved when nothing is readable
  checkpointer.close()


def test_a_restore_failure_that_is_not_corruption_propagates_and_moves_nothing(tmp_path, monkeypatch):
  config = tiny_config("mla")
  config.model.vocab_size = 64
  state = build_state(config)
  target = ckpt_lib.abstract(state)
  checkpointer = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  for step in (2, 4):
    checkpointer.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), {"step": step}, config)
  ckpt, before = tmp_path / "checkpoints", _mtimes(tmp_path)
  restore = checkpointer.manager.restore
  failures = [
    MemoryError(),
    OSError(errno.EIO, "Input/output error"),
    PermissionError(errno.EACCES, "denied"),
    ValueError("RESOURCE_EXHAUSTED: Error reading local file: out of memory"),
    RuntimeError("UNAVAILABLE: connection reset"),
    KeyboardInterrupt(),
  ]
  for failure in failures:  # the newest checkpoint fails to load for a reason that is not its files

    def fail(step, *args, failure=failure, **kwargs):
      if step == 4:
        raise failure
      return restore(step, *args, **kwargs)

    monkeypatch.setattr(checkpointer.manager, "restore", fail)
    warnings = []
    with pytest.raises(type(failure)):
      checkpointer.restore_latest(target, warn=warnings.append)
    assert not warnings and _mtimes(tmp_path) == before and not (tmp_path / "checkpoints.corrupt").exists()
  assert checkpointer.all_steps() == [2, 4]
  wrapped = Exception("Encountered error while reading array index")  # orbax wraps tensorstore errors
  wrapped.__cause__ = ValueError('OUT_OF_RANGE: Error reading "params.embedding/0.0"')
  assert ckpt_lib.is_unreadable(wrapped) and ckpt_lib.is_unreadable(FileNotFoundError(errno.ENOENT, "gone"))
  wrapped.__cause__.__context__ = MemoryError()
  assert not ckpt_lib.is_unreadable(wrapped) and not ckpt_lib.is_unreadable(KeyError("state"))

  monkeypatch.setattr(checkpointer.manager, "restore", restore)
  sharding = ckpt / "4" / "state" / "_sharding"  # half written: tensorstore's FAILED_PRECONDITION
  sharding.write_bytes(sharding.read_bytes()[:100])
  warnings = []
  step, restored, _ = checkpointer.restore_latest(target, warn=warnings.append)
  assert step == 2 and int(restored.step) == 2 and len(warnings) == 1 and "FAILED_PRECONDITION" in warnings[0]
  assert os.listdir(tmp_path / "checkpoints.corrupt") == ["4"]
  checkpointer.close()


def test_restore_onto_8_devices_and_back_gives_the_same_loss(tmp_path):
  config = tiny_config("mla")
  config.model.vocab_size = 64
  config.trainer.batch_size = 8
  state = build_state(config)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (8, 33), 0, 64), np.int32)
  np.save(tmp_path / "batch.npy", tokens)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  loss_1 = eval_loss(config, state, batch)
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "one")
  checkpointer.save(3, state, {"step": 3}, config)
  checkpointer.close()

  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(
    [
      sys.executable,
      "tests/reliability_helper.py",
      "reshard",
      str(tmp_path / "one"),
      str(tmp_path / "eight"),
      str(tmp_path / "batch.npy"),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  eight = json.loads(out.stdout.strip().splitlines()[-1])
  assert eight["devices"] == 8 and eight["split_leaves"] > 10
  np.testing.assert_allclose(eight["loss"], loss_1, rtol=1e-5)

  back = ckpt_lib.Checkpointer(tmp_path / "eight")
  step, restored, _ = back.restore_latest(ckpt_lib.abstract(state))
  back.close()
  assert step == 3 and all(len(x.sharding.device_set) == 1 for x in jax.tree_util.tree_leaves(restored))
  assert_trees_equal(restored, state)
  assert eval_loss(config, restored, batch) == loss_1


POISON = 300  # a token id the byte tokenizer never produces (the model vocabulary is padded to 320)


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
  make_loss_fn, batch_at = train_step_lib.make_loss_fn, BatchIterator.batch_at

  def poisoned_loss_fn(config, model):
    loss_fn = make_loss_fn(config, model)

    def fn(params, model_state, batch):
      loss, metrics = loss_fn(params, model_state, batch)
      return loss * jnp.where(batch["inputs"][0, 0] == POISON, jnp.nan, 1.0), metrics  # NaN loss and gradients

    return fn

  def poisoned_batch_at(self, step):
    batch = batch_at(self, step)
    if step + 1 in (3, 6, 7, 8):  # 1-based steps whose update is non-finite
      batch["inputs"][0, 0] = POISON
    return batch

  monkeypatch.setattr(train_step_lib, "make_loss_fn", poisoned_loss_fn)
  monkeypatch.setattr(BatchIterator, "batch_at", poisoned_batch_at)
  out = io.StringIO()
  with pytest.raises(
    TrainingError,
    match=r"step 8: 3 consecutive non-finite updates "
    r"\(trainer.max_skipped_steps=3\)",
  ):
    train_and_evaluate(quick_config(trainer__max_skipped_steps=3), str(tmp_path), stream=out)
  assert "step 3: non-finite loss or gradient, update skipped (1 in a row, limit 3)" in out.getvalue()
  with open(tmp_path / "metrics.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
  assert [records[s]["skipped"] for s in range(1, 8)] == [0, 0, 1, 0, 0, 1, 1]
  assert [records[s]["skipped_total"] for s in range(1, 8)] == [0, 0, 1, 1, 1, 2, 3]
  assert os.listdir(tmp_path / "checkpoints") == ["4"]  # step 8 reached the limit: nothing saved after 4
  assert int(saved_state(tmp_path, 4)["skipped"]) == 0


def test_failed_save_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def disk_full_at_8(self):
    if self.get_final().name == "8":
      raise OSError(errno.ENOSPC, "No space left on device")
    return await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_8)
  with pytest.raises(
    CheckpointError,
    match=r"saving checkpoint step 8 in .* failed \(disk full\): .*No space "
    r"left on device.*; the last complete checkpoint is step 4, unchanged",
  ):
    run_inline(tmp_path)
  monkeypatch.undo()
  checkpointer = ckpt_lib.Checkpointer(tmp_path)
  assert checkpointer.all_steps() == [4]
  checkpointer.close()
  assert int(saved_state(tmp_path, 4)["step"]) == 4


def test_too_little_disk_space_is_refused_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1 << 20))
  with pytest.raises(WorkdirError, match=r"has 1.0 MiB free but one checkpoint needs about \d+\.\d MiB"):
    run_inline(tmp_path)
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def _bad_cases(tmp_path, ref) -> list[tuple[str, list[str], str]]:
  (tmp_path / "empty.bin").write_bytes(b"")
  (tmp_path / "short.txt").write_text("print(1)\n")
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "ckpt_file").mkdir()
  (tmp_path / "ckpt_file" / "checkpoints").write_text("x")
  corrupt = tmp_path / "corrupt"
  shutil.copytree(ref, corrupt)
  for step in os.listdir(corrupt / "checkpoints"):
    _truncate_tree(corrupt / "checkpoints" / step / "state")
  w = str(tmp_path / "w")
  kv16 = "params/layer_0/mla/kv_norm/scale has shape (32,) in the checkpoint but (16,) in the config"
  unwritable = []
  if os.path.isdir("/sys"):  # sysfs refuses new files, even to root
    unwritable.append(("unwritable workdir", cli_flags("/sys"), "workdir /sys is not usable"))
  return unwritable + [
    # Config errors (unknown keys, bad values and types, missing config and YAML files) are covered by
    # tests/test_config.py's command-line test.
    ("keep_best without eval", cli_flags(w, trainer__eval_steps=0), "trainer.keep_best: needs trainer.eval_steps"),
    (
      "missing data",
      cli_flags(w, data__corpus="/nonexistent/tokens.bin"),
      "/nonexistent/tokens.bin: data path not found",
    ),
    ("empty token file", cli_flags(w, data__corpus=tmp_path / "empty.bin"), "empty.bin: token file is empty"),
    (
      "too little data",
      cli_flags(w, data__corpus=tmp_path / "short.txt"),
      "training tokens are too few for one batch of 4 x 32",
    ),
    ("workdir is a file", cli_flags(tmp_path / "a_file"), "a_file is not usable: [Errno 20] exists and is not"),
    ("checkpoints is a file", cli_flags(tmp_path / "ckpt_file"), "ckpt_file/checkpoints"),
    ("mismatched checkpoint", cli_flags(ref, model__kv_latent_dim=16), kv16),
    ("every checkpoint unreadable", cli_flags(corrupt), "no readable checkpoint in"),
    ("missing --workdir", ["--config=configs/mla.py:quick"], "Flag --workdir must have a value"),
    ("unknown flag", cli_flags(w) + ["--bogus"], "Unknown command line flag 'bogus'"),
  ]


def _mtimes(directory) -> dict[str, int]:
  return {
    os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, files in os.walk(directory) for n in files
  }


def test_bad_inputs_fail_with_one_clear_line(reference, tmp_path):
  ref, _ = reference
  before = _mtimes(ref)
  cases = _bad_cases(tmp_path, ref)
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "mla_jax.train", *args],
      cwd=ROOT,
      env=ENV,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for _, args, _ in cases
  ]
  for (name, _, expected), proc in zip(cases, procs):
    _, err = proc.communicate(timeout=600)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (name, err[-3000:])
    assert lines[0].startswith("error: ") and expected in lines[0], (name, lines[0])
  assert _mtimes(ref) == before  # the mismatched run wrote nothing into the reference workdir
