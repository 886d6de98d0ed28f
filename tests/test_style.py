"""The tree stays formatted and lint-clean under the ruff configuration in pyproject.toml."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(command):
  ruff = shutil.which("ruff")
  assert ruff, 'ruff is part of the test extra: pip install -e ".[test]"'
  out = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, f"ruff {' '.join(command)} .\n{out.stdout[-3000:]}{out.stderr[-1000:]}"
