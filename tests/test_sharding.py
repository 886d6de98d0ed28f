"""Sharding: mesh presets train exactly like one device, FSDP splits the weights, the divisibility rules
raise errors naming their keys, two processes train like one, and the launch scripts print their commands.

The multi-device parts run in subprocesses with simulated CPU devices (this process has one device):
tests/sharding_check.py (8 devices, every preset) and the real trainer as two processes of 2 devices
each, compared with one process of one device (see `Runs`).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

from mla_jax import distributed, sharding, train_state
from mla_jax.config import ModelConfig
from mla_jax.errors import ConfigError, UserError
from mla_jax.model import LanguageModel, abstract_variables
from mla_jax.optim import make_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import sharding_check  # noqa: E402  pylint: disable=g-import-not-at-top

TIMEOUT = 900
# Adam divides by sqrt(v) + eps, so a weight whose first gradient is near eps (1e-8) moves by up to
# lr x (its relative gradient difference): float32 reduction order alone can shift it by a few 1e-5 at
# lr 3e-4. Gradients themselves are compared through the optimizer moments, far tighter.
PARAM_ATOL = {"mla": 1e-5, "hybrid": 1e-5, "moe": 5e-5}
MOMENT_ATOL = 1e-7
TRAIN_FLAGS = [
  "--config=configs/mla.py:quick",
  "--config.model.hidden_size=64",
  "--config.model.num_layers=1",
  "--config.model.num_heads=4",
  "--config.model.intermediate_size=128",
  "--config.model.kv_latent_dim=32",
  "--config.model.q_latent_dim=32",
  "--config.model.d_rope=8",
  "--config.trainer.batch_size=8",
  "--config.trainer.seq_len=32",
  "--config.trainer.max_steps=4",
  "--config.trainer.log_interval=2",
  "--config.trainer.eval_interval=4",
  "--config.trainer.eval_steps=1",
  "--config.trainer.warmup_steps=1",
  "--config.data.max_bytes=300000",
  "--config.sample.max_new_tokens=4",
]


def _env(devices: int) -> dict:
  flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Runs:
  """The subprocesses. The 8-device check and the one-process reference run (about one core each) start
  together when a test first needs one of them; the two-process run, whose collectives wait on each other
  and slow down when its processes share the cores with other work, starts after them.
  `wait(name)` returns (returncode, stdout, stderr)."""

  FIRST, SECOND = ("check", "single"), ("process0", "process1")

  def __init__(self, tmp):
    self.tmp = tmp
    self.procs = {}
    self.results = {}

  def _command(self, name: str):
    if name == "check":
      return [sys.executable, os.path.join(HERE, "sharding_check.py"), str(self.tmp / "check.json")], _env(8)
    if name == "single":
      return (
        [sys.executable, "-m", "mla_jax.train", f"--workdir={self.tmp / 'one'}"]
        + TRAIN_FLAGS
        + ["--config.sample.max_new_tokens=0"],
        _env(1),
      )
    return (
      [sys.executable, "-m", "mla_jax.train", f"--workdir={self.tmp / 'two'}"]
      + TRAIN_FLAGS
      + [
        "--config.mesh.fsdp=-1",
        "--config.mesh.data=1",
        f"--coordinator_address=localhost:{self.port}",
        "--num_processes=2",
        f"--process_id={name[-1]}",
      ],
      _env(2),
    )

  def _start(self, names) -> None:
    self.port = _free_port()
    for name in names:
      args, env = self._command(name)
      self.procs[name] = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )

  def wait(self, name: str):
    if name not in self.procs:
      if name in self.SECOND:
        for earlier in self.FIRST:
          if earlier in self.procs:
            self.wait(earlier)
        self._start(self.SECOND)
      else:
        self._start(self.FIRST if not self.procs else (name,))
    if name not in self.results:
      out, err = self.procs[name].communicate(timeout=TIMEOUT)
      self.results[name] = (self.procs[name].returncode, out, err)
    return self.results[name]

  def close(self):
    for proc in self.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  r = Runs(tmp_path_factory.mktemp("sharding"))
  yield r
  r.close()


@pytest.fixture(scope="module")
def check(runs):
  code, out, err = runs.wait("check")
  assert code == 0, (out + err)[-4000:]
  with open(runs.tmp / "check.json") as f:
    return json.load(f)


def _case(check, kind, preset):
  return next(c for c in check["cases"] if c["kind"] == kind and c["preset"] == preset)


@pytest.mark.parametrize("kind,preset", sharding_check.CASES)
def test_preset_trains_like_one_device(check, kind, preset):
  c = _case(check, kind, preset)
  expected_mesh = {
    "data": {"data": 8},
    "fsdp": {"fsdp": 8},
    "fsdp_tensor": {"fsdp": 4, "tensor": 2},
    "expert": {"data": 2, "expert": 4},
  }[preset]
  assert c["mesh"] == {**{a: 1 for a in sharding.MESH_AXES}, **expected_mesh}
  np.testing.assert_allclose(c["losses"], c["ref_losses"], rtol=1e-5)
  assert c["opt_diff"] < MOMENT_ATOL, c["opt_diff"]
  assert c["param_diff"] < PARAM_ATOL[kind], c["param_diff"]


@pytest.mark.parametrize("kind", ["mla", "moe", "hybrid"])
def test_fsdp_gives_each_device_an_eighth_of_every_matrix(check, kind):
  c = _case(check, kind, "fsdp")
  matrices = {k: v for k, v in c["shards"].items() if v["ndim"] >= 2}
  assert len(matrices) >= 8
  for name, v in matrices.items():
    if "conv_kernel" in name:  # Mamba2's depthwise conv [K, E] is split only over `tensor`
      assert v["shard_sizes"] == [v["size"]], name
      continue
    assert v["shard_sizes"] == [v["size"] // 8], (name, v)
    assert c["mu_shards"][name] == [v["size"] // 8], name  # Adam's moments split like the weight
  # What stays whole (norm scales, Mamba2 vectors and conv kernel) is under 2% of the parameters
  # (MaxText's sharding_tolerance).
  total = sum(v["size"] for v in c["shards"].values())
  whole = sum(v["size"] for v in c["shards"].values() if v["shard_sizes"] == [v["size"]])
  assert whole < 0.02 * total, (whole, total)


def test_tensor_and_expert_axes_split_their_weights(check):
  shards = _case(check, "moe", "fsdp_tensor")["shards"]
  # w_uq [q_latent, heads, head_dim]: q_latent over fsdp (4), heads over tensor (2).
  w_uq = shards["layer_0/mla/w_uq/kernel"]
  assert w_uq["shard_sizes"] == [w_uq["size"] // 8]
  expert = _case(check, "moe", "expert")["shards"]["layer_0/moe/w_gate"]
  assert expert["shard_sizes"] == [expert["size"] // 4]  # 4 experts over expert=4: one each


def test_sharded_decode_caches_match_one_device(check):
  for kind, result in check["decode"].items():
    assert result["diff"] < 1e-5, (kind, result)
    assert all(spec.startswith("P(('data', 'fsdp', 'expert')") for spec in result["specs"]), result
  assert "'tensor'" in result["specs"][0]  # GQA caches split their key/value heads
  hybrid = check["decode"]["hybrid"]["specs"]
  assert sum("'tensor'" in spec for spec in hybrid) == 1  # the Mamba2 SSM state; MLA's latent is whole
  # One sequence cannot split over 4 batch devices: that dimension stays whole, the heads still split.
  assert check["decode"]["gqa"]["batch1_specs"][0] == "P(None, 'tensor', None, None)"


def test_two_processes_train_like_one(runs):
  results = [runs.wait(f"process{i}") for i in range(2)]
  for code, out, err in results:
    assert code == 0, (out + err)[-4000:]
  single_code, single_out, single_err = runs.wait("single")
  assert single_code == 0, (single_out + single_err)[-4000:]
  main_out, other_out = results[0][1], results[1][1]
  assert "Mesh: data 1, fsdp 4, tensor 1, expert 1 over 4 cpu device(s) in 2 process(es)" in main_out
  assert "Memory per device" in main_out and "Sample (prompt" in main_out
  # Only process 0 prints (the collectives library announces its connections on every process).
  assert [l for l in other_out.splitlines() if not l.startswith("[Gloo]")] == [], other_out[-2000:]

  def records(workdir):
    with open(runs.tmp / workdir / "metrics.jsonl") as f:
      return [json.loads(line) for line in f]

  two, one = records("two"), records("one")
  for key in ("loss", "val_loss"):
    got = [r[key] for r in two if key in r]
    want = [r[key] for r in one if key in r]
    assert len(got) == len(want) >= 1
    np.testing.assert_allclose(got, want, rtol=1e-5)
  assert os.listdir(runs.tmp / "two" / "checkpoints") == ["4"]
  assert (runs.tmp / "two" / "loss.png").exists()


# ----------------------------------------------------------------------------------- config checks


def _config(kind="mla", mesh=None, **trainer):
  config = tiny_config(kind)
  for key, value in (mesh or {}).items():
    config.mesh[key] = value
  for key, value in trainer.items():
    config.trainer[key] = value
  return config


BAD = [
  (
    dict(mesh={"data": 2, "fsdp": 2}),
    8,
    "mesh",
    "mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 x mesh.expert=1 = 4 must equal the device count 8",
  ),
  (dict(mesh={"data": -1, "fsdp": -1}), 8, "mesh.fsdp", "only one mesh axis may be -1"),
  (dict(mesh={"tensor": 3}), 8, "mesh.data", "8 devices are not divisible"),
  (
    dict(mesh={"data": 1, "fsdp": -1}, batch_size=4),
    8,
    "trainer.batch_size",
    "4 is not divisible by the data-parallel size mesh.data=1 x mesh.fsdp=8 x mesh.expert=1 = 8",
  ),
  (
    dict(mesh={"data": -1}, batch_size=8, gradient_accumulation=2),
    8,
    "trainer.gradient_accumulation",
    "8 / 2 = 4 rows must divide over the data-parallel size",
  ),
  (dict(mesh={"tensor": 8}), 8, "model.num_heads", "4 heads are not divisible by mesh.tensor=8"),
  (
    dict(kind="gqa", mesh={"tensor": 4}),
    4,
    "model.kv_heads",
    "2 GQA key/value heads are not divisible by mesh.tensor=4",
  ),
  (
    dict(kind="moe", mesh={"expert": 8}, batch_size=8),
    8,
    "model.num_experts",
    "4 experts are not divisible by mesh.expert=8",
  ),
]


@pytest.mark.parametrize("overrides,devices,key,text", BAD)
def test_divisibility_rules_name_their_keys(overrides, devices, key, text):
  overrides = dict(overrides)
  config = _config(overrides.pop("kind", "mla"), **overrides)
  with pytest.raises(ConfigError) as e:
    sharding.check_config(config, devices)
  assert e.value.key == key and text in str(e.value), str(e.value)


def test_mamba2_heads_must_divide_over_tensor():
  config = tiny_config("mamba2", mamba2_num_heads=4)
  config.mesh.tensor = 8
  with pytest.raises(ConfigError, match="model.mamba2_num_heads: 4 Mamba2 heads are not divisible by mesh.tensor=8"):
    sharding.check_config(config, 8)
  config.model.mamba2_num_heads = 8
  assert sharding.check_config(config, 8) == {"data": 1, "fsdp": 1, "tensor": 8, "expert": 1}


def test_a_parameter_its_mesh_axis_does_not_divide_is_named():
  config = tiny_config("mla", q_latent_dim=36)
  cfg = ModelConfig.from_config(config, vocab_size=64)
  params, specs, _ = abstract_variables(cfg, 8)
  rules = sharding.axis_rules(config)
  sharding.check_param_shapes(params, specs, {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}, rules)
  with pytest.raises(ConfigError) as e:
    sharding.check_param_shapes(params, specs, {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}, rules)
  assert e.value.key == "mesh.fsdp"
  assert (
    "parameter layer_0/mla/w_uq/kernel (36, 4, 24): dimension 0 ('q_latent', size 36) is not divisible "
    "by mesh.fsdp=8" in str(e.value)
  )


def test_one_device_plan_is_one_process_holding_every_row():
  config = tiny_config("mla")
  cfg = ModelConfig.from_config(config, vocab_size=64)
  plan = train_state.plan(config, LanguageModel(cfg), make_optimizer(config.trainer, 10), 8)
  assert plan.data_shard == (0, 1) and plan.mesh.size == jax.device_count() == 1
  batch = plan.put({"inputs": np.zeros((4, 8), np.int32)})
  assert batch["inputs"].shape == (4, 8) and batch["inputs"].sharding == plan.batch


# ----------------------------------------------------------------------------------- multi-process


def test_distributed_arguments_from_flags_and_environment(monkeypatch):
  monkeypatch.setattr(distributed.shutil, "which", lambda _: None)  # no scontrol: parse the node list
  assert distributed.distributed_args(env={}) is None
  assert distributed.distributed_args(env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_JOB_NODELIST": "gpu[003-004,9],cpu1"}
  assert distributed.distributed_args(env=slurm) == {
    "coordinator_address": "gpu003:8476",
    "num_processes": 16,
    "process_id": 9,
  }
  assert distributed.distributed_args("node7:1234", 16, env=slurm)["coordinator_address"] == "node7:1234"
  assert distributed.distributed_args("10.0.0.1:99", 4, 2, env={}) == {
    "coordinator_address": "10.0.0.1:99",
    "num_processes": 4,
    "process_id": 2,
  }
  with pytest.raises(UserError, match="must be given together"):
    distributed.distributed_args("10.0.0.1:99", 4, env={})
  assert distributed.distributed_args(multihost=True, env={}) == {}
  assert distributed.distributed_args(env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
  assert distributed.distributed_args(env={"TPU_WORKER_HOSTNAMES": "w0"}) is None
  assert distributed.slurm_first_host("node17") == "node17"
  assert distributed.slurm_first_host("a01,a02") == "a01"


# ----------------------------------------------------------------------------------- launch scripts


def _dry_run(args, env=None):
  out = subprocess.run(
    ["bash"] + args,
    cwd=ROOT,
    env=dict(os.environ, DRY_RUN="1", **(env or {})),
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_tpu_pod_dry_run_prints_every_command():
  out = _dry_run(
    [
      "launch/tpu_pod.sh",
      "--name=mla-pod",
      "--zone=us-central2-b",
      "--accelerator=v4-32",
      "--config=configs/moe.py",
      "--bucket=my-bucket",
      "--delete",
      "--",
      "--config.mesh.fsdp=-1",
      "--config.mesh.data=1",
    ]
  )
  lines = out.splitlines()
  assert "# v4-32: 4 worker(s), one training process each" in lines
  assert (
    "+ gcloud compute tpus tpu-vm create mla-pod --zone=us-central2-b --accelerator-type=v4-32 "
    "--version=tpu-ubuntu2204-base"
  ) in lines
  assert any(l.startswith("+ gcloud compute tpus tpu-vm scp ") and "--worker=all" in l for l in lines)
  tar = next(l.split() for l in lines if l.startswith("+ tar "))
  if "-T" in tar:  # a git checkout: the tarball holds the listed files, no ignored one (.venv, caches)
    with open(tar[tar.index("-T") + 1]) as f:
      copied = f.read().split("\0")
    assert "mla_jax/train.py" in copied and "configs/mla.py" in copied
    assert not [p for p in copied if p.startswith((".venv/", ".git/", ".pytest_cache/")) or "__pycache__" in p]
  else:
    assert "--exclude=.venv" in tar
  ssh = [l for l in lines if l.startswith("+ gcloud compute tpus tpu-vm ssh mla-pod --zone=us-central2-b --worker=all")]
  assert len(ssh) == 2 and "pip install" in ssh[0] and "gcsfuse --implicit-dirs my-bucket /gcs/my-bucket" in ssh[0]
  assert (
    "python3 -m mla_jax.train --config=configs/moe.py --workdir=/gcs/my-bucket/runs/mla-pod --multihost "
    "--config.mesh.fsdp=-1 --config.mesh.data=1"
  ) in ssh[1]
  assert lines[-1] == "+ gcloud compute tpus tpu-vm delete mla-pod --zone=us-central2-b --quiet"


def test_slurm_dry_run_prints_every_command():
  out = _dry_run(
    ["launch/gpu_slurm.sbatch", "configs/hybrid.py", "/shared/runs/hybrid", "--config.mesh.fsdp=-1"],
    env={"NODES": "2", "GPUS_PER_NODE": "8", "NODELIST": "gpu[001-002]", "SLURM_JOB_ID": "4242"},
  )
  lines = out.splitlines()
  assert "+ scontrol show hostnames gpu[001-002] | head -n 1" in lines
  assert (
    "+ srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 python -m mla_jax.train "
    "--config=configs/hybrid.py --workdir=/shared/runs/hybrid '--coordinator_address=$FIRST_HOST:16242' "
    "--num_processes=16 --config.mesh.fsdp=-1"
  ) in lines


def test_shell_scripts_parse():
  for path in ("launch/tpu_pod.sh", "launch/gpu_slurm.sbatch", "benchmarks/gpu.sh"):
    out = subprocess.run(["bash", "-n", path], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, (path, out.stderr)
