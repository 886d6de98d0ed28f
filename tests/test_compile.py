"""Ahead-of-time TPU compilation from the CPU (mla_jax.aot, `python -m mla_jax.compile`) and the check that
stops a training run whose compiled step does not fit the device."""

import importlib.util
import io
import os
import subprocess
import sys

import jax
import pytest
from conftest import tiny_config

from mla_jax import aot, cli, memory, trainer
from mla_jax.config import REMAT_POLICIES
from mla_jax.data import load_tokenizer
from mla_jax.errors import ConfigError, UserError
from mla_jax.model import abstract_variables, flops_per_token
from mla_jax.train_program import resolve_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = [
  "--config.model.hidden_size=64",
  "--config.model.num_layers=1",
  "--config.model.num_heads=4",
  "--config.model.intermediate_size=128",
  "--config.model.kv_latent_dim=32",
  "--config.model.q_latent_dim=32",
  "--config.model.d_rope=8",
  "--config.model.max_seq_len=64",
  "--config.trainer.batch_size=8",
  "--config.trainer.seq_len=32",
  "--config.mesh.fsdp=-1",
  "--config.mesh.data=1",
]


def fsdp_tiny(**model_overrides):
  config = tiny_config("mla", num_layers=1, **model_overrides)
  config.mesh.fsdp, config.mesh.data = -1, 1
  return config


def test_tiny_config_compiles_for_v5e():
  """The train and decode steps compile for v5e:2x2 through the code path of `python -m mla_jax.compile`."""
  out = io.StringIO()
  report = aot.run(fsdp_tiny(), "v5e:2x2", decode_batch=4, decode_length=64, stream=out)
  hbm = aot.TPU_CHIPS["v5e"].hbm_bytes
  assert report.num_chips == 4 and report.mesh == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
  for key in ("arguments", "outputs", "temporaries", "total"):
    assert 0 < report.train[key] < hbm, (key, report.train)
    assert 0 < report.decode["memory"][key] < hbm, (key, report.decode)
  assert report.fits and report.decode["fits"]
  assert report.remat == REMAT_POLICIES[0] and len(report.remat_table) == 1  # auto stops at the first fit
  # XLA's count is per chip: a quarter of the batch's training FLOPs (6 x matmul params + attention).
  cfg = resolve_model_config(fsdp_tiny(), load_tokenizer("byte"))
  expected = flops_per_token(cfg, abstract_variables(cfg, 32)[0], 32)["total"] * 4 * 32 / 4
  assert 0.7 < report.train_flops / expected < 1.5, (report.train_flops, expected)
  assert report.model_flops == pytest.approx(expected)  # the architecture's count, from the same formula
  assert report.step_time_lower_bound_s == max(report.train_flops, report.model_flops) / aot.TPU_CHIPS["v5e"].bf16_flops
  text = out.getvalue()
  assert "Mesh: data 1, fsdp 4, tensor 1, expert 1" in text and "): FITS" in text and "lower bound" in text
  assert "Decode step (batch 4, context 64" in text


@pytest.mark.parametrize(
  "topology, message",
  [
    ("v5e", "not a TPU topology name"),
    ("v9z:2x2", "unknown TPU generation 'v9z'"),
    ("v5e:2x2x2", "v5e topologies have 2 positive dimensions"),
    ("v5p:4x4", "v5p topologies have 3 positive dimensions"),
  ],
)
def test_bad_topology_is_one_line(topology, message):
  with pytest.raises(UserError, match=message) as e:
    aot.analyze(fsdp_tiny(), topology)
  assert "\n" not in str(e.value) and f"--topology={topology}" in str(e.value)


def test_topology_the_mesh_cannot_divide_names_the_mesh_key():
  config = fsdp_tiny()
  config.mesh.fsdp, config.mesh.tensor = -1, 3
  with pytest.raises(ConfigError) as e:
    aot.analyze(config, "v5e:2x2")
  assert e.value.key == "mesh.fsdp" and "4 devices are not divisible by" in str(e.value)


def test_missing_tpu_compiler_says_how_to_install_it(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
  with pytest.raises(UserError) as e:
    aot.analyze(fsdp_tiny(), "v5e:2x2")
  assert f'pip install "jax[tpu]=={jax.__version__}"' in str(e.value) and "\n" not in str(e.value)


def test_compile_command_line_prints_fits():
  out = subprocess.run(
    [sys.executable, "-m", "mla_jax.compile", "--config=configs/mla.py", "--topology=v6e:2x2", "--decode_batch=0"]
    + TINY_FLAGS,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Topology v6e:2x2: 4 v6e chips" in out.stdout and "): FITS" in out.stdout, out.stdout
  assert "FLOPs per chip per step" in out.stdout and "Decode step" not in out.stdout
  assert "Traceback" not in out.stderr and "TPU_WORKER_HOSTNAMES" not in out.stderr, out.stderr[-3000:]


def test_training_stops_before_the_first_step_when_the_step_does_not_fit(tmp_path, monkeypatch):
  """Every remat policy is tried under model.remat=auto; then one line names the sizes and the keys."""
  monkeypatch.setattr(memory, "device_capacity_bytes", lambda device: 2**20)
  config = tiny_config("mla", num_layers=1)
  config.data.max_bytes = 200_000
  with pytest.raises(memory.DoesNotFitError) as e:
    trainer.train_and_evaluate(config, str(tmp_path), stream=io.StringIO())
  line = cli.one_line(e.value)
  assert line == str(e.value) and "does not fit in memory: it needs" in line, line
  assert "and has 1.0 MiB (available host memory" in line, line
  for key in ("trainer.batch_size", "trainer.seq_len", "trainer.gradient_accumulation", "model.remat"):
    assert key in line, line
  assert [row["policy"] for row in e.value.table] == list(REMAT_POLICIES)
  assert not any(row["fits"] for row in e.value.table) and e.value.needed > 2**20
  checkpoints = tmp_path / "checkpoints"
  assert not checkpoints.is_dir() or not os.listdir(checkpoints)
