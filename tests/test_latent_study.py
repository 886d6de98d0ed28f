"""benchmarks/latent_study.py: the interval math, the validation windows, and a smoke run through main()."""

import json
import math

import numpy as np
import pytest

from benchmarks import latent_study as ls


def test_t_quantile_table_and_expansion():
  assert ls.t_quantile_975(1) == 12.706
  assert ls.t_quantile_975(2) == 4.303
  assert ls.t_quantile_975(30) == 2.042
  # Exact values (scipy.stats.t.ppf(0.975, dof)) beyond the table.
  for dof, exact in ((31, 2.039513), (40, 2.021075), (100, 1.983972), (1000, 1.962339)):
    assert ls.t_quantile_975(dof) == pytest.approx(exact, abs=2e-4)
  assert math.isnan(ls.t_quantile_975(0))


def test_interval_and_paired_by_hand():
  s = ls.interval([1.0, 2.0, 3.0])  # mean 2, sd 1
  assert (s["n"], s["mean"], s["sd"]) == (3, 2.0, 1.0)
  assert s["half"] == pytest.approx(4.303 / math.sqrt(3))
  one = ls.interval([5.0])
  assert one["mean"] == 5.0 and math.isnan(one["half"])

  base = {0: 2.0, 1: 3.0, 2: 2.5}
  wide = ls.paired({0: 2.5, 1: 4.0, 2: 4.0}, base)  # differences 0.5, 1.0, 1.5: sd 0.5
  assert wide["mean"] == pytest.approx(1.0)
  assert wide["half"] == pytest.approx(4.303 * 0.5 / math.sqrt(3))
  assert wide["significant"] is False  # [-0.24, 2.24] holds 0
  tight = ls.paired({0: 3.0, 1: 4.1, 2: 3.4, 7: 0.0}, base)  # 1.0, 1.1, 0.9; seed 7 has no pair
  assert tight["seeds"] == [0, 1, 2]
  assert tight["half"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
  assert tight["significant"] is True
  assert ls.paired({0: 1.0}, base)["significant"] is None


def row(key: str, seed: int, val_loss: float) -> dict:
  v = next(v for v in ls.VARIANTS if v["key"] == key)
  return {
    "key": key,
    "name": v["name"],
    "family": v["family"],
    "seed": seed,
    "params": 1000,
    "attention_params": 100,
    "cache_bytes_per_token": 1024 if key.startswith("mla") else 4096,
    "val_loss": val_loss,
    "train_loss": val_loss + 0.1,
    "tokens_per_s": 1.0,
    "train_seconds": 1.0,
  }


def test_summary_and_verdicts_read_the_paired_intervals():
  losses = {"mha": (2.0, 2.2, 2.1), "mha_rope16": (2.05, 2.24, 2.16), "mla192": (2.3, 2.52, 2.38)}
  rows = [row(k, s, x) for k, xs in losses.items() for s, x in enumerate(xs)]
  variants = [v for v in ls.VARIANTS if v["key"] in losses]
  summary = ls.summarize(rows, variants)
  assert [s["key"] for s in summary] == ["mha", "mha_rope16", "mla192"]
  assert summary[0]["vs_mha"] is None
  mla = summary[2]["vs_mha"]  # differences 0.30, 0.32, 0.28
  assert mla["mean"] == pytest.approx(0.30) and mla["significant"] is True
  text = "\n".join(ls.verdicts(rows, summary))
  assert f"MLA d_c 192: +0.3000 ± {4.303 * 0.02 / math.sqrt(3):.4f} nats" in text
  assert "4.0x less cache" in text
  # The control: MLA d_c 192 - MHA with RoPE on 16 dims = 0.25, 0.28, 0.22 (sd 0.03).
  assert f"MLA d_c 192 − MHA, RoPE on 16 of 64 dims: +0.2500 ± {4.303 * 0.03 / math.sqrt(3):.4f}" in text


def test_validation_windows_spread_over_the_split():
  tokens = np.arange(10_000, dtype=np.uint16)
  w = ls.validation_windows(tokens, 32, 32 * 10)
  assert w.shape == (10, 33) and w.dtype == np.int32
  assert w[0, 0] == 0 and w[-1, -1] == len(tokens) - 1  # from the first token to the last
  assert np.all(np.diff(w[:, 0]) >= 32)  # neighbours share at most one token
  np.testing.assert_array_equal(w[3], np.arange(w[3, 0], w[3, 0] + 33))
  every = ls.validation_windows(tokens[:100], 32, 32 * 10)  # fewer than asked: each window once
  np.testing.assert_array_equal(every[:, 0], [0, 32, 64])


@pytest.mark.slow
def test_smoke_run_writes_rows_and_finite_intervals(tmp_path):
  flags = "--variants mha,mla64 --seeds 2 --steps 2 --layers 1 --hidden 96 --intermediate 128 --q_latent 32 "
  flags += "--seq_len 32 --batch 4 --val_tokens 256 --eval_batch 4 --learning_rate 3e-3"
  result = ls.main([*flags.split(), "--results_dir", str(tmp_path)])
  rows = result["rows"]
  assert [(r["key"], r["seed"]) for r in rows] == [("mha", 0), ("mla64", 0), ("mha", 1), ("mla64", 1)]
  assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["train_loss"]) for r in rows)
  assert all(r["val_tokens"] == 256 for r in rows)
  assert rows[0]["val_loss"] != rows[2]["val_loss"]  # the seed changes the run
  mha, mla = result["summary"]
  assert mla["cache_bytes_per_token"] == (64 + 16) * 2 and mha["cache_bytes_per_token"] == 2 * 8 * 64 * 2
  for s in (mha["val_loss"], mla["val_loss"], mla["vs_mha"]):
    assert s["n"] == 2 and math.isfinite(s["half"]) and s["half"] > 0
  assert isinstance(mla["vs_mha"]["significant"], bool)
  assert result["validation"]["target_tokens"] == 256 and len(result["validation"]["sha256"]) == 64
  saved = json.loads((tmp_path / "latent_study.json").read_text())
  assert len(saved["rows"]) == 4
  md = (tmp_path / "latent_study.md").read_text()
  assert "MLA d_c 64: " in md and "paired by seed" in md and "--seeds 2" in md
  assert (tmp_path / "latent_study.png").stat().st_size > 0
