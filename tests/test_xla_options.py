"""Per-executable XLA:CPU options (mla_jax.xla_options): which executable gets which, that a user's XLA_FLAGS
wins, and that the compiled programs equal the ones XLA compiles by default."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config

from mla_jax import cache as cache_lib
from mla_jax import xla_options
from mla_jax.config import ModelConfig
from mla_jax.decode import Decoder
from mla_jax.model import LanguageModel, init_params
from mla_jax.optim import make_optimizer, make_schedule
from mla_jax.train_state import TrainState, initial_model_state
from mla_jax.train_step import make_train_step

pytestmark = pytest.mark.skipif(not xla_options._supported(), reason="this jaxlib has no YNNPACK option")


@pytest.mark.parametrize(
  "kind, sequence, decode",
  [
    ("mla", None, xla_options.NO_YNN),
    ("gqa", None, None),
    ("moe", xla_options.DOTS_ONLY, xla_options.NO_YNN),
    ("hybrid", xla_options.DOTS_ONLY, xla_options.NO_YNN),
    ("mamba2", xla_options.DOTS_ONLY, None),
  ],
)
def test_options_by_model_and_purpose(kind, sequence, decode):
  cfg = tiny_model_config(kind)
  assert xla_options.compiler_options(cfg, "sequence") == sequence
  assert xla_options.compiler_options(cfg, "decode") == decode
  assert xla_options.compiler_options(cfg, "sequence", platform="tpu") is None
  assert xla_options.compiler_options(cfg, "decode", platform="gpu") is None


def test_user_xla_flags_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
  cfg = tiny_model_config("hybrid")
  assert xla_options.compiler_options(cfg, "sequence") is None
  assert xla_options.compiler_options(cfg, "decode") is None


def test_unknown_purpose_is_refused():
  with pytest.raises(ValueError, match="purpose must be one of"):
    xla_options.compiler_options(tiny_model_config("mla"), "prefill")


def test_mla_decode_compiles_without_ynnpack():
  cfg = tiny_model_config("moe")
  variables = {"params": init_params(cfg, jax.random.PRNGKey(0))[0]}
  prefill, step = Decoder(cfg).compile(variables, 1, 5, 16, jax.random.PRNGKey(0), tokens_per_call=3)
  assert "__ynn_fusion" not in step.as_text()
  assert "__ynn_fusion" in prefill.as_text()  # whole-sequence work keeps YNNPACK's dots


@pytest.mark.parametrize("kind", ["moe", "mamba2"])
def test_train_step_equals_the_default_compile(kind):
  """The slow twin: the same step jitted without options (XLA's default YNNPACK fusions)."""
  config = tiny_config(kind)
  cfg = ModelConfig.from_config(config, vocab_size=64)
  tx = make_optimizer(config.trainer, 10)
  params, _ = init_params(cfg, jax.random.PRNGKey(0), config.trainer.seq_len)
  tokens = np.random.default_rng(0).integers(0, 64, (4, config.trainer.seq_len + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  step = make_train_step(config, LanguageModel(cfg), tx, make_schedule(config.trainer, 10), donate=False)
  default = jax.jit(step.__wrapped__)
  state = TrainState.create(params, tx, jax.random.PRNGKey(1), initial_model_state(cfg, config.trainer.seq_len))
  (new, metrics), (new_ref, metrics_ref) = step(state, batch), default(state, batch)
  np.testing.assert_allclose(metrics["loss"], metrics_ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], metrics_ref["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(new_ref.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mla_decode_equals_the_default_compile():
  cfg = tiny_model_config("mla")
  variables = {"params": init_params(cfg, jax.random.PRNGKey(0))[0]}
  rng, prompt = jax.random.PRNGKey(0), jnp.arange(1, 6, dtype=jnp.int32)[None]
  decoder = Decoder(cfg)
  tokens, caches = decoder.prefill(variables, prompt, cache_lib.init_caches(cfg, 1, 16), rng)
  default_step = jax.jit(decoder.step.__wrapped__)
  runs = []
  for step in (decoder.step, default_step):
    token, c, generated = tokens, jax.tree_util.tree_map(jnp.copy, caches), []
    for position in range(5, 9):
      token, c = step(variables, token, jnp.int32(position), c, rng)
      generated.append(token)
    runs.append((np.stack(generated), c))
  (tokens_fast, caches_fast), (tokens_default, caches_default) = runs
  np.testing.assert_array_equal(tokens_fast, tokens_default)
  for a, b in zip(jax.tree_util.tree_leaves(caches_fast), jax.tree_util.tree_leaves(caches_default), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
