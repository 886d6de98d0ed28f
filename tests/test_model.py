"""The whole language model: shapes, causality through gradients, parameter and FLOP counts, learning."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model_config

from mla_jax.model import LanguageModel, count_params, flops_per_token, forward, init_params
from mla_jax.train_step import cross_entropy

KINDS = ["gqa", "mla", "mla_noq", "moe", "mamba2", "hybrid"]


class ModelShapeTest(chex.TestCase):
  @chex.variants(with_jit=True)
  def test_logits_shape_and_dtype(self):
    cfg = tiny_model_config("mla")
    params, specs = init_params(cfg, jax.random.PRNGKey(0))
    logits, aux, caches = self.variant(lambda p, t: LanguageModel(cfg).apply({"params": p}, t))(
      params, jnp.zeros((3, 11), jnp.int32)
    )
    chex.assert_shape(logits, (3, 11, cfg.vocab_size))
    assert logits.dtype == jnp.float32 and aux == {} and caches is None
    chex.assert_tree_all_finite(logits)
    # every parameter carries logical axis names, one per dimension
    for leaf, spec in zip(
      jax.tree_util.tree_leaves(params),
      jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
    ):
      assert len(spec) == leaf.ndim and all(isinstance(n, str) for n in spec)


@pytest.mark.parametrize(
  "kind,overrides", [("mla", {}), ("gqa", {"tie_embeddings": True, "logits_scaling": 4.0}), ("mamba2", {})]
)
def test_last_logits_only_is_the_last_row_of_the_full_logits(kind, overrides):
  """The prefill's head on the last position alone gives that position's logits of the full forward."""
  cfg = tiny_model_config(kind, **overrides)
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
  model = LanguageModel(cfg)
  full = model.apply({"params": params}, tokens)[0]
  last = jax.jit(lambda p, t: model.apply({"params": p}, t, last_logits_only=True)[0])(params, tokens)
  chex.assert_shape(last, (2, 1, cfg.vocab_size))
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=0)
  assert float(jnp.std(full[:, -1])) > 1e-2 and not np.allclose(full[:, -1], full[:, -2], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_causality_through_gradients(kind):
  """d logits[t] / d embedding(token at s) is zero for s > t and non-zero for s <= t."""
  cfg = tiny_model_config(kind)
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  T, t = 10, 5
  tokens = jnp.arange(T, dtype=jnp.int32)[None] + 3  # distinct tokens: one embedding row per position
  model = LanguageModel(cfg)

  @jax.jit
  def grad_per_position(p):
    g = jax.grad(lambda p: model.apply({"params": p}, tokens)[0][0, t].sum())(p)
    return jnp.abs(g["embedding"][tokens[0]]).sum(-1)

  g = np.asarray(grad_per_position(params))
  assert np.all(g[t + 1 :] == 0.0), g
  assert np.all(g[: t + 1] > 0.0), g


def test_param_counts_by_kind():
  cfg = tiny_model_config("mla", tie_embeddings=True)
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  counts = count_params(cfg, params)
  assert counts["total"] == sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert "lm_head" not in counts and counts["embedding"] == cfg.vocab_size * 64
  D, C, Q, H, Dn, Dr = 64, 32, 48, 4, 16, 8
  per_layer_mla = D * Q + Q + Q * H * (Dn + Dr) + D * (C + Dr) + C + C * H * Dn * 2 + H * Dn * D
  assert counts["mla"] == 2 * per_layer_mla
  assert counts["mlp"] == 2 * 3 * D * cfg.intermediate_size
  flops = flops_per_token(cfg, params, 32)
  matmul_params = counts["total"] - counts["vectors"]  # tied head: embedding used once as a matmul
  assert flops["matmul"] == 6 * matmul_params
  assert flops["attention"] == 2 * 3 * 2 * H * (Dn + Dr + Dn) * 32 / 2


def test_every_residual_writing_projection_has_the_residual_init_scale():
  """std = scale x c / sqrt(fan_in) (c: std of a normal truncated at +-2): scale = 1/sqrt(residual branches)
  for the projections that write into the residual stream, 1 for the others."""
  c = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))
  # hybrid: Mamba2 without FFN, MLA + SwiGLU, MLA + MoE (routed + shared): 1 + 2 + 2 = 5 residual branches
  hybrid = tiny_model_config(
    "hybrid",
    mamba_layers=(0,),
    first_dense_layers=2,
    num_experts=4,
    experts_per_tok=2,
    moe_intermediate_size=64,
    num_shared_experts=1,
  )
  fan_in = {
    "w_o": lambda s: np.prod(s[:-1]),
    "down": lambda s: s[0],
    "shared_down": lambda s: s[0],
    "w_down": lambda s: s[1],
    "out_proj": lambda s: s[0],
    "up": lambda s: s[0],
    "w_up": lambda s: s[1],
    "in_proj": lambda s: s[0],
  }
  seen = set()
  for cfg, branches in ((tiny_model_config("gqa"), 4), (hybrid, 5)):
    params, _ = init_params(cfg, jax.random.PRNGKey(0))
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
      names = [str(getattr(k, "key", k)) for k in path]
      name = names[-2] if names[-1] == "kernel" else names[-1]
      if name not in fan_in:
        continue
      residual = name not in ("up", "w_up", "in_proj")
      expected = (branches**-0.5 if residual else 1.0) * c / math.sqrt(fan_in[name](w.shape))
      assert abs(float(np.std(w)) / expected - 1) < 0.04, ("/".join(names), float(np.std(w)), expected)
      seen.add(f"{names[-3] if name == 'w_o' else ''}/{name}")
  assert seen == {"gqa/w_o", "mla/w_o", "/down", "/shared_down", "/w_down", "/out_proj", "/up", "/w_up", "/in_proj"}


def test_forward_function_matches_apply():
  cfg = tiny_model_config("gqa")
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  tokens = np.array([[1, 2, 3, 4]])
  np.testing.assert_allclose(forward(cfg, params, tokens), LanguageModel(cfg).apply({"params": params}, tokens)[0])


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_loss_falls_on_a_fixed_batch(kind):
  cfg = tiny_model_config(kind)
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, cfg.vocab_size)
  model = LanguageModel(cfg)
  tx = optax.adam(3e-3)

  def loss_fn(p):
    nll, count, _ = cross_entropy(model.apply({"params": p}, tokens[:, :-1])[0], tokens[:, 1:])
    return nll / count

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  losses = []
  for _ in range(40):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[0] > np.log(cfg.vocab_size) - 0.5
  assert losses[-1] < 0.5 * losses[0], losses
