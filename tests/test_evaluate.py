"""`python -m mla_jax.evaluate`: the training loop's validation loss, bits per byte, clear errors."""

import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

from mla_jax.data import ByteTokenizer
from mla_jax.errors import CheckpointError
from mla_jax.evaluation import bits_per_byte, evaluate_workdir, target_bytes
from mla_jax.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config("mla")
  config.data.max_bytes = 300_000
  config.sample.max_new_tokens = 0
  final = train_and_evaluate(config, str(workdir), stream=io.StringIO())
  return str(workdir), final


def test_evaluate_matches_the_training_loops_validation_loss(trained):
  workdir, final = trained
  out = io.StringIO()
  record = evaluate_workdir(workdir, stream=out)
  np.testing.assert_allclose(record["loss"], final["val_loss"], rtol=1e-5)
  assert record["step"] == 4 and record["batches"] == 2 and record["tokens"] == 2 * 4 * 32
  assert json.load(open(os.path.join(workdir, "eval.json")))["loss"] == record["loss"]
  assert "bits per byte" in out.getvalue()
  np.testing.assert_allclose(record["bits_per_byte"], record["nll_nats"] / math.log(2) / record["bytes"])


def test_evaluate_packs_documents_as_the_run_did(tmp_path):
  """A data.packing=documents run: evaluation packs the held-out documents the same way (positions and
  segment ids), so it reproduces the training loop's validation loss; padding counts no bytes."""
  config = tiny_config("gqa")
  config.data.max_bytes, config.data.packing = 300_000, "documents"
  config.sample.max_new_tokens = 0
  final = train_and_evaluate(config, str(tmp_path), stream=io.StringIO())
  record = evaluate_workdir(str(tmp_path), stream=io.StringIO())
  np.testing.assert_allclose(record["loss"], final["val_loss"], rtol=1e-5)
  assert 0 < record["bytes"] <= record["tokens"]


def test_reading_a_workdir_leaves_a_save_in_progress_alone(trained):
  """generate / evaluate may run while training saves into the same workdir: the temporary directory of
  that save must survive them (a writing checkpointer would clean it up)."""
  workdir, _ = trained
  in_progress = os.path.join(workdir, "checkpoints", "8.orbax-checkpoint-tmp-1234567890")
  os.makedirs(os.path.join(in_progress, "state"))
  try:
    evaluate_workdir(workdir, batches=1, json_path=os.devnull, stream=io.StringIO())
    assert os.path.isdir(in_progress)
  finally:
    shutil.rmtree(in_progress)


def test_evaluate_on_a_given_file(trained, tmp_path):
  workdir, _ = trained
  text = "def f(x):\n  return x + 1\n" * 20  # 500 bytes + EOS: 15 windows of 32, 3 batches of 4
  path = tmp_path / "eval.txt"
  path.write_text(text)
  record = evaluate_workdir(
    workdir, data=str(path), batches=0, json_path=str(tmp_path / "out.json"), stream=io.StringIO()
  )
  assert record["batches"] == 3 and record["tokens"] == 3 * 4 * 32
  assert record["bytes"] == record["tokens"]  # the EOS (token 501) is past the last window
  assert json.load(open(tmp_path / "out.json"))["bits_per_byte"] == record["bits_per_byte"]


def test_bits_per_byte_counts_utf8_bytes_of_targets():
  tok = ByteTokenizer()
  targets = np.asarray([[104, 105, 256, 195], [169, 256, 256, 33]])
  assert target_bytes(tok, targets) == 5
  assert bits_per_byte(10 * math.log(2), 5) == pytest.approx(2.0)
  assert math.isnan(bits_per_byte(1.0, 0))


def test_bad_workdir_is_one_line_error(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    evaluate_workdir(str(tmp_path / "missing"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-m", "mla_jax.evaluate", f"--workdir={tmp_path}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 2
  assert out.stderr.strip().startswith("error:") and "no checkpoints" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
