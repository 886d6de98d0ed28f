"""Shared fixtures: tiny model configs that compile in seconds."""

import os

# The tests run on the CPU. With the TPU compiler installed (the [test] extra), JAX would otherwise look for
# TPU chips at start-up; subprocesses inherit the setting. Topology compiles (test_compile.py) need no chips.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from mla_jax.config import ModelConfig, default_config, validate  # noqa: E402

# Identical programs (the same tiny model compiled by several tests) compile once per machine.
jax.config.update(
  "jax_compilation_cache_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def tiny_config(kind: str = "mla", **model_overrides):
  """A 2-layer, 64-wide config of the given kind: 'gqa', 'mla', 'mla_noq', 'moe', 'mamba2', 'hybrid'."""
  c = default_config()
  m = c.model
  m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size, m.max_seq_len = 64, 2, 4, 128, 64
  if kind == "gqa":
    m.kv_heads = 2
  if kind in ("mla", "mla_noq", "moe", "hybrid"):
    m.kv_latent_dim, m.d_rope = 32, 8
    m.q_latent_dim = 0 if kind == "mla_noq" else 48
  if kind == "moe":
    m.num_experts, m.experts_per_tok, m.moe_intermediate_size = 4, 2, 64
  if kind == "mamba2":
    m.mamba_layers = (0, 1)
  if kind == "hybrid":
    m.num_layers = 3
    m.mamba_layers = (0, 2)
  if kind in ("mamba2", "hybrid"):
    m.mamba2_num_heads, m.mamba2_state_size, m.mamba2_chunk_size = 8, 16, 8
  for key, value in model_overrides.items():
    m[key] = value
  t = c.trainer
  t.batch_size, t.seq_len, t.max_steps, t.warmup_steps = 4, 32, 4, 1
  t.log_interval, t.eval_interval, t.eval_steps, t.save_interval = 2, 4, 2, 4
  c.sample.max_new_tokens = 8
  validate(c)
  return c


def tiny_model_config(kind: str = "mla", vocab_size: int = 64, **model_overrides) -> ModelConfig:
  return ModelConfig.from_config(tiny_config(kind, **model_overrides), vocab_size=vocab_size)


@pytest.fixture
def tiny():
  return tiny_config
