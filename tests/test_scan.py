"""Scanning over a repeating super-block computes the same model; the program does not grow with depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config
from flax import linen as nn

from mla_jax.config import REMAT_POLICIES
from mla_jax.model import LanguageModel, init_params, remat_policy


def _stack_params(unscanned: dict, period: int, layers: int) -> dict:
  """layer_{r*period+j} params -> layers/layer_{j} stacked over r."""
  out = {k: v for k, v in unscanned.items() if not k.startswith("layer_")}
  out["layers"] = {
    f"layer_{j}": jax.tree_util.tree_map(
      lambda *xs: jnp.stack(xs), *[unscanned[f"layer_{r * period + j}"] for r in range(layers // period)]
    )
    for j in range(period)
  }
  return out


@pytest.mark.parametrize(
  "kind,overrides,period",
  [
    ("hybrid", {"num_layers": 4, "mamba_layers": (0, 2)}, 2),
    ("moe", {"num_layers": 2, "first_dense_layers": 0}, 1),
  ],
)
def test_scanned_equals_unscanned(kind, overrides, period):
  plain = tiny_model_config(kind, **overrides)
  scanned = tiny_model_config(kind, scan_layers=True, **overrides)
  assert scanned.scan_period == period
  params, _ = init_params(plain, jax.random.PRNGKey(0))
  stacked = _stack_params(params, period, plain.num_layers)
  scanned_params, specs = init_params(scanned, jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(scanned_params) == jax.tree_util.tree_structure(stacked)
  assert specs["layers"]["layer_0"]["mixer_norm"]["scale"][0] == "layers"
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, plain.vocab_size)
  logits_a, aux_a, _ = jax.jit(LanguageModel(plain).apply)({"params": params}, tokens)
  logits_b, aux_b, _ = jax.jit(LanguageModel(scanned).apply)({"params": stacked}, tokens)
  np.testing.assert_allclose(logits_a, logits_b, atol=1e-5, rtol=1e-5)
  if aux_a:
    np.testing.assert_allclose(aux_a["load"], aux_b["load"], atol=1e-6)
    np.testing.assert_allclose(aux_a["load_balance"], aux_b["load_balance"], rtol=1e-5)


def test_program_size_does_not_grow_with_depth():
  def equations(layers, scan):
    cfg = tiny_model_config("hybrid", num_layers=layers, mamba_layers=tuple(range(0, layers, 2)), scan_layers=scan)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))[0])
    return len(str(jax.make_jaxpr(LanguageModel(cfg).apply)({"params": params}, tokens)))

  assert equations(8, True) == equations(4, True)
  assert equations(8, False) > 1.7 * equations(4, False)


def _remat_policies(jaxpr) -> set:
  """The policies of every jax.checkpoint in a jaxpr, nested ones (inside scan) included."""
  found = set()
  for eqn in jaxpr.eqns:
    if "policy" in eqn.params and "prevent_cse" in eqn.params:
      found.add(eqn.params["policy"])
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        found |= _remat_policies(inner)
  return found


@pytest.mark.parametrize("kind,scan", [("mla", False), ("hybrid", True)])
def test_remat_policies_match_none(kind, scan):
  """Every rematerialisation policy gives the loss and gradients of no remat (float32), with the same
  parameter tree, and really wraps the blocks (or the scanned super-block) in jax.checkpoint."""
  overrides = {"num_layers": 2, "mamba_layers": (0,)} if kind == "hybrid" else {}
  base = tiny_model_config(kind, scan_layers=scan, remat="none", **overrides)
  params, specs = init_params(base, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, base.vocab_size)

  def loss_fn(cfg):
    def loss(p):
      logits, _, _ = LanguageModel(cfg).apply({"params": p}, tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return loss

  want_loss, want_grads = jax.jit(jax.value_and_grad(loss_fn(base)))(params)
  for policy in ("none", "auto"):  # auto without a selection (tests, eval, decode) is none
    assert not _remat_policies(jax.make_jaxpr(loss_fn(dataclasses.replace(base, remat=policy)))(params).jaxpr)
  for policy in REMAT_POLICIES[1:]:
    cfg = dataclasses.replace(base, remat=policy)
    shapes = jax.eval_shape(LanguageModel(cfg).init, jax.random.PRNGKey(0), tokens)
    assert nn.get_partition_spec(shapes)["params"] == specs
    assert _remat_policies(jax.make_jaxpr(loss_fn(cfg))(params).jaxpr) == {remat_policy(policy)}
    loss, grads = jax.jit(jax.value_and_grad(loss_fn(cfg)))(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, want_grads)
