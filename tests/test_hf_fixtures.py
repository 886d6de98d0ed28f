"""Stored transformers outputs (tests/data/hf_fixtures/, written by tests/make_hf_fixtures.py) against the
imported models: `from_hf` then `forward` gives transformers' logits, and greedy decoding with the cached
`Decoder` gives transformers' greedy continuation. Needs neither torch nor transformers."""

import os

import jax
import numpy as np
import pytest

from mla_jax import convert
from mla_jax.config import ModelConfig
from mla_jax.decode import Decoder
from mla_jax.model import forward

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf_fixtures")
FIXTURES = sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)))

# Float32 on both sides: the stored logits are transformers' float32 run of the saved weights, also for the
# bfloat16 checkpoints (which from_hf upcasts exactly), so only float32 summation order differs.
ATOL = RTOL = 1e-4


def test_every_family_has_float32_and_bfloat16_fixtures():
  assert len(FIXTURES) >= 12
  for family in ("deepseek_v2", "deepseek_v3", "mamba2", "granitemoehybrid", "llama"):
    assert any(f.startswith(family) and not f.endswith("bf16") for f in FIXTURES), family
    assert any(f.startswith(family) and f.endswith("bf16") for f in FIXTURES), family


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_and_greedy_tokens_match_transformers(name):
  path = os.path.join(ROOT, name)
  expected = np.load(os.path.join(path, "expected.npz"))
  config, params = convert.from_hf(path)
  cfg = ModelConfig.from_config(config)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}
  logits = np.asarray(jax.jit(lambda p, ids: forward(cfg, p, ids))(params, expected["input_ids"]))
  np.testing.assert_allclose(logits, expected["logits"], atol=ATOL, rtol=RTOL)
  # Greedy choices are at least `margin` (>= 1e-3, checked when written) ahead of the runner-up, far above ATOL.
  assert expected["margin"] >= 10 * ATOL
  # Both MLA decode forms: the expanded cache for the fixtures without a query latent (Mamba2 ignores it).
  mla_decode = "expanded" if "no_q_latent" in name else "absorbed"
  decoder = Decoder(cfg, temperature=0.0, mla_decode=mla_decode)
  generated, _ = decoder.generate({"params": params}, expected["prompt"], len(expected["generated"]), jax.random.key(0))
  np.testing.assert_array_equal(generated[0], expected["generated"])
