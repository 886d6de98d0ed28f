"""MoE routing, losses, the dispatch implementations and the DeepSeek-MoE layer."""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mla_jax.config import DEFAULT_LOGICAL_AXIS_RULES, ModelConfig, default_config, validate
from mla_jax.layers.common import residual_scale
from mla_jax.layers.moe import MoE, moe_active_params, moe_total_params, update_aux_free_bias
from mla_jax.ops import moe

TOL = dict(atol=1e-5, rtol=1e-5)
# Compile-time saver for the larger test graphs: skips LLVM's optimisation passes (no fast-math either way).
QUICK_COMPILE = {"xla_backend_optimization_level": 0}

# Jitted once per shape: a few whole-function compiles are much cheaper than compiling every eager op.
_route = jax.jit(moe.route, static_argnums=(1, 2))
_dense = jax.jit(moe.moe_dense)
_capacity = jax.jit(moe.moe_capacity, static_argnames="capacity_factor")
_balance = jax.jit(moe.load_balance_loss, static_argnums=2)
_load = jax.jit(moe.expert_load, static_argnums=1)


@functools.cache
def _apply(cfg: ModelConfig):
  return jax.jit(MoE(cfg).apply, compiler_options=QUICK_COMPILE)


def _cfg(**overrides) -> ModelConfig:
  c = default_config()
  c.model.hidden_size = 16
  c.model.num_heads = 2
  c.model.num_experts = 4
  c.model.experts_per_tok = 2
  c.model.moe_intermediate_size = 8
  c.model.capacity_factor = 4.0  # capacity mode drops nothing at this factor
  validate(c)
  return dataclasses.replace(ModelConfig.from_config(c, vocab_size=64), **overrides)


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> jax.Array:
  """Test data from numpy: jax.random would compile a sampler for every new shape."""
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _experts(rng: np.random.Generator, E: int, D: int, F: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  return (
    _normal(rng, E, D, F, scale=D**-0.5),
    _normal(rng, E, D, F, scale=D**-0.5),
    _normal(rng, E, F, D, scale=F**-0.5),
  )


def _x(seed: int) -> jax.Array:
  """The layer tests' input: one shape throughout, so the cached `_apply` compiles are shared."""
  return _normal(np.random.default_rng(seed), 2, 8, 16)


def _np_swiglu(x, w_gate, w_up, w_down) -> np.ndarray:
  gate, up = np.asarray(x) @ np.asarray(w_gate), np.asarray(x) @ np.asarray(w_up)
  return (gate / (1.0 + np.exp(-gate)) * up) @ np.asarray(w_down)


def _cv(load_E: jax.Array) -> float:
  load_E = np.asarray(load_E)
  return float(np.std(load_E) / np.mean(load_E))


def _task_and_grads(impls, k: int, offset_E: jax.Array, cot_TD: jax.Array):
  """One jit giving, per impl, value_and_grad of sum(y * cot) w.r.t. (x, router kernel, expert weights)
  with aux (y, experts)."""

  def loss(impl, x_TD, w_router_DE, w_gate, w_up, w_down):
    logits_TE = x_TD @ w_router_DE + offset_E
    weights_TK, experts_TK, _ = moe.route(logits_TE, k, True)
    y_TD = impl(x_TD, weights_TK, experts_TK, w_gate, w_up, w_down)
    return jnp.sum(y_TD * cot_TD), (y_TD, experts_TK)

  grad_fns = [
    jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3, 4), has_aux=True) for impl in impls
  ]
  return jax.jit(lambda *args: [fn(*args) for fn in grad_fns], compiler_options=QUICK_COMPILE)


# ---------------------------------------------------------------- routing


def test_route_topk_weights_and_k1_keeps_probability():
  logits_TE = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
  weights_TK, experts_TK, probs_TE = _route(logits_TE, 2, True)
  chex.assert_trees_all_close(probs_TE, jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]), **TOL)
  np.testing.assert_array_equal(experts_TK, [[0, 1], [1, 2]])
  chex.assert_trees_all_close(weights_TK, jnp.array([[0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.9, 0.3 / 0.9]]), **TOL)
  weights_TK, _, _ = _route(logits_TE, 2, False)
  chex.assert_trees_all_close(weights_TK, jnp.array([[0.5, 0.3], [0.6, 0.3]]), **TOL)
  # k = 1: no renormalisation even when asked, so the weight is the routing probability, not 1.
  weights_TK, experts_TK, _ = _route(logits_TE, 1, True)
  np.testing.assert_array_equal(experts_TK, [[0], [1]])
  chex.assert_trees_all_close(weights_TK, jnp.array([[0.5], [0.6]]), **TOL)


def test_aux_free_bias_changes_selection_not_weight_formula():
  logits_TE = _normal(np.random.default_rng(0), 32, 4)
  _, experts_TK, probs_TE = _route(logits_TE, 2, True)
  bias_E = jnp.array([0.0, 0.0, 0.0, 2.0])  # larger than any probability gap: expert 3 always chosen
  weights_b_TK, experts_b_TK, probs_b_TE = _route(logits_TE, 2, True, bias_E)
  assert np.all(np.any(np.asarray(experts_b_TK) == 3, axis=-1))
  assert not np.array_equal(np.asarray(experts_TK), np.asarray(experts_b_TK))
  chex.assert_trees_all_close(probs_b_TE, probs_TE, **TOL)
  chosen_TK = jnp.take_along_axis(probs_TE, experts_b_TK, axis=-1)
  chex.assert_trees_all_close(weights_b_TK, chosen_TK / chosen_TK.sum(-1, keepdims=True), **TOL)
  # A zero bias selects exactly what no bias selects.
  _, experts_0_TK, _ = _route(logits_TE, 2, True, jnp.zeros(4))
  np.testing.assert_array_equal(experts_0_TK, experts_TK)


def test_update_aux_free_bias_moves_towards_underloaded_experts():
  bias_E = jnp.array([0.1, 0.0, -0.1, 0.0])
  load_E = jnp.array([0.5, 0.3, 0.2, 0.0])  # mean 0.25
  new_E = update_aux_free_bias(bias_E, load_E, 0.01)
  chex.assert_trees_all_close(new_E, bias_E + jnp.array([-0.01, -0.01, 0.01, 0.01]), **TOL)
  # Iterating selection and update on skewed logits balances the load with no gradient at all.
  logits_TE = _normal(np.random.default_rng(1), 256, 4) + jnp.array([2.0, 1.0, 0.0, 0.0])

  def step(b_E, _):
    _, experts_TK, _ = moe.route(logits_TE, 2, True, b_E)
    load_E = moe.expert_load(experts_TK, 4)
    return update_aux_free_bias(b_E, load_E, 1e-2), load_E

  b_E, loads_SE = jax.lax.scan(step, jnp.zeros(4), None, length=300)
  assert _cv(loads_SE[0]) > 0.5
  assert _cv(loads_SE[-20:].mean(0)) < 0.1
  assert float(b_E[0]) < 0.0 < float(b_E[3])  # the favoured expert is pushed down, the starved one up


# ---------------------------------------------------------------- losses


def test_load_balance_loss_hand_values():
  probs_TE = jnp.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
  # k = 1: f = [2, 1, 1] / 4, P = [1.6, 1.5, 0.9] / 4, loss = 3 * (0.2 + 0.09375 + 0.05625) = 1.05.
  experts_TK = jnp.array([[0], [0], [1], [2]])
  chex.assert_trees_all_close(_balance(probs_TE, experts_TK, 3), jnp.float32(1.05), **TOL)
  chex.assert_trees_all_close(_load(experts_TK, 3), jnp.array([0.5, 0.25, 0.25]), **TOL)
  # k = 2: counts [4, 3, 1] / 8, loss = 3 * (0.5 * 0.4 + 0.375 * 0.375 + 0.125 * 0.225) = 1.10625.
  experts_TK = jnp.array([[0, 1], [0, 1], [1, 0], [2, 0]])
  chex.assert_trees_all_close(_balance(probs_TE, experts_TK, 3), jnp.float32(1.10625), **TOL)
  # Uniform load and uniform probabilities: the minimum, 1.
  uniform_TE = jnp.full((3, 3), 1.0 / 3.0)
  chex.assert_trees_all_close(_balance(uniform_TE, jnp.array([[0], [1], [2]]), 3), jnp.float32(1.0), **TOL)
  # An expert with no assignment has load 0.
  chex.assert_trees_all_close(_load(jnp.array([[0, 1], [0, 2]]), 4), jnp.array([0.5, 0.25, 0.25, 0.0]), **TOL)


def test_load_balance_loss_gradient_reaches_router_logits():
  T, E, k = 8, 4, 2
  logits_TE = _normal(np.random.default_rng(2), T, E)
  _, experts_TK, _ = _route(logits_TE, k, True)

  def loss(logits_TE):
    _, _, probs_TE = moe.route(logits_TE, k, True)
    return moe.load_balance_loss(probs_TE, experts_TK, E)

  grad_TE = jax.jit(jax.grad(loss))(logits_TE)
  assert float(jnp.max(jnp.abs(grad_TE))) > 1e-3
  # Closed form: dL/dz_tj = (E / T) * p_tj * (f_j - sum_i f_i p_ti).
  z_TE = np.asarray(logits_TE, np.float64)
  p_TE = np.exp(z_TE) / np.exp(z_TE).sum(-1, keepdims=True)
  f_E = np.bincount(np.asarray(experts_TK).ravel(), minlength=E) / (T * k)
  expected_TE = (E / T) * p_TE * (f_E[None, :] - (p_TE @ f_E)[:, None])
  np.testing.assert_allclose(grad_TE, expected_TE, **TOL)


def test_router_z_loss_hand_value():
  logits_TE = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
  chex.assert_trees_all_close(moe.router_z_loss(logits_TE), jnp.float32(2.5 * math.log(2.0) ** 2), **TOL)


# ---------------------------------------------------------------- dispatch


def test_block_layout_hand_values():
  # E = 4, M = 2, assignments (t, k) in order: e = 0, 2, 2, 0, 2, 2 -> counts [2, 0, 4, 0].
  # Expert 0 fills block 0 (rows 0-1), expert 2 blocks 1-2 (rows 2-5); N = (6 + 4 * 1) // 2 = 5.
  layout = jax.jit(moe.block_layout, static_argnums=(1, 2))(jnp.array([[0, 2], [2, 0], [2, 2]]), 4, 2)
  np.testing.assert_array_equal(layout.row_S, [0, 2, 3, 1, 4, 5])
  np.testing.assert_array_equal(layout.token_R, [0, 1, 0, 1, 2, 2, 3, 3, 3, 3])  # 3 = T: padding rows
  np.testing.assert_array_equal(layout.expert_N[:3], [0, 2, 2])
  assert int(layout.num_blocks) == 3
  # M = 3: expert 0 pads one row, expert 2 two rows; N = (6 + 4 * 2) // 3 = 4.
  layout = jax.jit(moe.block_layout, static_argnums=(1, 2))(jnp.array([[0, 2], [2, 0], [2, 2]]), 4, 3)
  np.testing.assert_array_equal(layout.row_S, [0, 3, 4, 1, 5, 6])
  np.testing.assert_array_equal(layout.token_R, [0, 1, 3, 0, 1, 2, 2, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(layout.expert_N[:3], [0, 2, 2])
  assert int(layout.num_blocks) == 3


def test_default_block_size():
  assert moe.default_block_size(4096, 16) == moe.DEFAULT_BLOCK_SIZE == 128
  assert moe.default_block_size(48, 8) == 8  # mean group 6, rounded up to a power of two
  assert moe.default_block_size(2, 16) == 1  # decoding one token: no padding at all
  assert moe.default_block_size(100, 1) == 128


def test_ragged_uses_blocked_on_cpu():
  T, D, F, E = 8, 4, 6, 4
  experts = _experts(np.random.default_rng(15), E, D, F)
  args = (jnp.ones((T, D)), jnp.ones((T, 2)), jnp.zeros((T, 2), jnp.int32), *experts)
  assert jax.default_backend() == "cpu"
  text = str(jax.make_jaxpr(moe.moe_ragged)(*args))
  assert "while" in text and "ragged_dot" not in text
  assert "ragged_dot" in str(jax.make_jaxpr(moe.moe_ragged_dot)(*args))


@pytest.mark.parametrize("num_experts", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 2])
def test_dropless_matches_dense_values_and_gradients(k, num_experts):
  """moe_ragged_dot, moe_ragged (moe_blocked with its default block size here) and moe_blocked with
  blocks of 5 rows for k = 2 (several blocks per used group) or 64 rows for k = 1 (larger than any group)
  against moe_dense."""
  T, D, F, E = 24, 8, 6, num_experts
  rng = np.random.default_rng(10 * k + E)
  x_TD, w_router_DE, cot_TD = _normal(rng, T, D), _normal(rng, D, E, scale=D**-0.5), _normal(rng, T, D)
  experts = _experts(rng, E, D, F)
  # Uneven preferences, and experts that can never be chosen whenever k < E.
  offset_E = np.linspace(0.0, 1.5, E)
  empty = [0] if E - k >= 1 else []
  empty += [E - 1] if E - k >= 2 else []
  offset_E[empty] = -8.0
  offset_E = jnp.asarray(offset_E, jnp.float32)

  block_size = 5 if k == 2 else 64
  impls = (moe.moe_ragged_dot, moe.moe_ragged, functools.partial(moe.moe_blocked, block_size=block_size), moe.moe_dense)
  *dropless, ((val_d, (y_d, experts_TK)), grads_d) = _task_and_grads(impls, k, offset_E, cot_TD)(
    x_TD, w_router_DE, *experts
  )

  counts_E = np.asarray(moe.expert_counts(experts_TK, E))
  assert counts_E.sum() == T * k
  np.testing.assert_array_equal(counts_E[empty], 0)
  if E - len(empty) > k:
    assert len(set(counts_E[counts_E > 0].tolist())) > 1  # uneven load over the used experts
  if k == 2:  # a used group spans several blocks, and one is not a whole number of blocks
    assert counts_E.max() > block_size and np.any(counts_E % block_size != 0)
  else:
    assert counts_E.max() < block_size
  for (val_r, (y_r, _)), grads_r in dropless:
    chex.assert_trees_all_close(y_r, y_d, **TOL)
    chex.assert_trees_all_close(val_r, val_d, **TOL)
    chex.assert_trees_all_close(grads_r, grads_d, **TOL)
    assert float(jnp.max(jnp.abs(grads_r[1]))) > 1e-4  # the router is trained through the task loss
    for e in empty:  # experts that received nothing get exactly zero gradient
      for g in grads_r[2:]:
        np.testing.assert_array_equal(g[e], 0.0)


def test_capacity_with_large_factor_matches_dense():
  T, D, F, E, k = 24, 8, 6, 4, 2
  rng = np.random.default_rng(3)
  x_TD, w_router_DE, cot_TD = _normal(rng, T, D), _normal(rng, D, E), _normal(rng, T, D)
  experts = _experts(rng, E, D, F)
  offset_E = jnp.array([-30.0, 0.0, 0.5, 1.0])
  capacity_fn = lambda *a: moe.moe_capacity(*a, capacity_factor=float(E))[0]
  ((_, (y_c, _)), grads_c), ((_, (y_d, _)), grads_d) = _task_and_grads(
    (capacity_fn, moe.moe_dense), k, offset_E, cot_TD
  )(x_TD, w_router_DE, *experts)
  chex.assert_trees_all_close(y_c, y_d, **TOL)
  chex.assert_trees_all_close(grads_c, grads_d, **TOL)
  weights_TK, experts_TK, _ = _route(x_TD @ w_router_DE + offset_E, k, True)
  _, dropped = _capacity(x_TD, weights_TK, experts_TK, *experts, capacity_factor=float(E))
  assert float(dropped) == 0.0


def test_capacity_drops_exactly_the_assignments_over_capacity():
  D, F = 8, 6
  rng = np.random.default_rng(4)
  # k = 2, E = 3, T = 4: C = ceil(4 * 2 / 3 * 0.7) = 2. Slots go to all first choices, then all second:
  #   first:  t0->e0 (0), t1->e1 (0), t2->e0 (1), t3->e0 (2: dropped)
  #   second: t0->e1 (1), t1->e0 (3: dropped), t2->e2 (0), t3->e1 (2: dropped)
  assert moe.capacity(4, 2, 3, 0.7) == 2
  x_TD = _normal(rng, 4, D)
  experts = _experts(rng, 3, D, F)
  experts_TK = jnp.array([[0, 1], [1, 0], [0, 2], [0, 1]])
  weights_TK = jnp.asarray(rng.uniform(0.2, 1.0, (4, 2)), jnp.float32)
  kept_TK = jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
  y_TD, dropped = _capacity(x_TD, weights_TK, experts_TK, *experts, capacity_factor=0.7)
  chex.assert_trees_all_close(dropped, jnp.float32(3 / 8), **TOL)
  chex.assert_trees_all_close(y_TD, _dense(x_TD, weights_TK * kept_TK, experts_TK, *experts), **TOL)
  np.testing.assert_array_equal(y_TD[3], 0.0)  # both of token 3's assignments were dropped

  # k = 1, E = 2, T = 6: C = ceil(6 / 2 * 0.5) = 2; expert 0 gets tokens 0, 1, 2, 4 and keeps 0, 1.
  assert moe.capacity(6, 1, 2, 0.5) == 2
  x_TD = _normal(rng, 6, D)
  experts = _experts(rng, 2, D, F)
  experts_TK = jnp.array([[0], [0], [0], [1], [0], [1]])
  weights_TK = jnp.full((6, 1), 0.75)
  kept_TK = jnp.array([[1.0], [1.0], [0.0], [1.0], [0.0], [1.0]])
  y_TD, dropped = _capacity(x_TD, weights_TK, experts_TK, *experts, capacity_factor=0.5)
  chex.assert_trees_all_close(dropped, jnp.float32(2 / 6), **TOL)
  chex.assert_trees_all_close(y_TD, _dense(x_TD, weights_TK * kept_TK, experts_TK, *experts), **TOL)


def test_capacity_buffers_carry_the_expert_sharding_annotation():
  T, D, F, E = 8, 4, 6, 2
  x_TD = jnp.ones((T, D))
  experts = _experts(np.random.default_rng(5), E, D, F)
  weights_TK, experts_TK = jnp.ones((T, 1)), jnp.zeros((T, 1), jnp.int32)
  fn = lambda x: moe.moe_capacity(x, weights_TK, experts_TK, *experts, capacity_factor=2.0)[0]
  assert "expert" not in jax.jit(fn).lower(x_TD).as_text()
  devices = np.array(jax.devices()[:1]).reshape(1, 1, 1, 1)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor", "expert"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
    text = jax.jit(lambda x: fn(x) + 0.0).lower(x_TD).as_text()  # a new function: traced afresh
  constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
  assert len(constraints) == 2 and all('[{"expert"}, {}, {}]' in line for line in constraints)


# ---------------------------------------------------------------- layer


def _init(cfg: ModelConfig, x_BTD: jax.Array, seed: int = 0) -> dict:
  """The layer's variables with the shapes `init` gives (traced only, nothing compiled), filled from numpy:
  parameters normal with std 1/sqrt(fan_in) (fan_in is the second-to-last axis of every kernel here),
  the aux-free bias zeros. `test_layer_init_axes_and_scale` checks the real `init`."""
  shapes = nn.unbox(jax.eval_shape(MoE(cfg).init, jax.random.key(0), x_BTD))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: _normal(rng, *s.shape, scale=s.shape[-2] ** -0.5), shapes["params"])
  rest = {
    name: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree) for name, tree in shapes.items() if name != "params"
  }
  return {"params": params, **rest}


def test_layer_init_axes_and_scale():
  cfg = _cfg(aux_free_bias=True)
  x_BTD = jnp.zeros((1, 4, cfg.hidden_size))
  boxed = jax.eval_shape(MoE(cfg).init, jax.random.key(0), x_BTD)
  axes = jax.tree.map(lambda b: b.names, boxed["params"], is_leaf=lambda b: isinstance(b, nn.Partitioned))
  assert axes == {
    "router": {"kernel": ("embed", "expert")},
    "w_gate": ("expert", "embed", "expert_mlp"),
    "w_up": ("expert", "embed", "expert_mlp"),
    "w_down": ("expert", "expert_mlp", "embed"),
    "shared_gate": {"kernel": ("embed", "mlp")},
    "shared_up": {"kernel": ("embed", "mlp")},
    "shared_down": {"kernel": ("mlp", "embed")},
  }
  # The 'rbg' key only makes this compile faster than threefry would; the init code is the same.
  init = jax.jit(MoE(cfg).init, compiler_options=QUICK_COMPILE)
  variables = nn.unbox(init(jax.random.key(1, impl="rbg"), x_BTD))
  params = variables["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  np.testing.assert_array_equal(variables["moe_bias"]["bias"], np.zeros(cfg.num_experts, np.float32))
  # Truncated normal at +-2 std with std scale/sqrt(fan_in) before truncation: 0.88 scale/sqrt(fan_in) after;
  # the down-projection writes into the residual stream, so its scale is residual_scale (1 for the others).
  for w, fan_in, scale in (
    (params["w_gate"], cfg.hidden_size, 1.0),
    (params["w_down"], cfg.moe_intermediate_size, residual_scale(cfg)),
  ):
    ratio = float(jnp.std(w)) * math.sqrt(fan_in) / scale
    assert 0.8 < ratio < 0.96 and float(jnp.max(jnp.abs(w))) * math.sqrt(fan_in) / scale <= 2.0 + 1e-6


def test_layer_dispatch_modes_agree():
  cfg = _cfg()
  x_BTD = _x(6)
  variables = _init(cfg, x_BTD)
  outs = {
    mode: _apply(dataclasses.replace(cfg, moe_dispatch=mode))(variables, x_BTD)
    for mode in ("dense", "ragged", "capacity")
  }
  y_d, aux_d = outs["dense"]
  for mode in ("ragged", "capacity"):
    y, aux = outs[mode]
    chex.assert_trees_all_close(y, y_d, **TOL)
    chex.assert_trees_all_close(aux, aux_d, **TOL)
  assert y_d.shape == x_BTD.shape and y_d.dtype == jnp.float32
  assert aux_d["load"].shape == (cfg.num_experts,) and float(aux_d["dropped_fraction"]) == 0.0
  assert all(v.dtype == jnp.float32 for v in aux_d.values())
  _, aux_small = _apply(dataclasses.replace(cfg, moe_dispatch="capacity", capacity_factor=0.25))(variables, x_BTD)
  assert 0.0 < float(aux_small["dropped_fraction"]) < 1.0


def test_layer_bfloat16_compute():
  cfg = _cfg()
  x_BTD = _x(7)
  variables = _init(cfg, x_BTD)
  y32, _ = _apply(cfg)(variables, x_BTD)
  for mode in ("ragged", "capacity"):
    y16, aux = _apply(dataclasses.replace(cfg, dtype="bfloat16", moe_dispatch=mode))(variables, x_BTD)
    assert y16.dtype == jnp.bfloat16 and aux["load_balance"].dtype == jnp.float32
    chex.assert_trees_all_close(y16.astype(jnp.float32), y32, atol=5e-2, rtol=5e-2)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables["params"]))


def test_layer_k1_router_gets_gradient_from_task_loss():
  cfg = _cfg(experts_per_tok=1, norm_topk_prob=True)
  x_BTD, cot_BTD = _x(8), _x(9)
  params = _init(cfg, x_BTD)["params"]
  grads = jax.jit(
    jax.grad(lambda p: jnp.sum(MoE(cfg).apply({"params": p}, x_BTD)[0] * cot_BTD)), compiler_options=QUICK_COMPILE
  )(params)
  assert float(jnp.max(jnp.abs(grads["router"]["kernel"]))) > 1e-4


def test_shared_expert_disabled_removes_params_and_output():
  cfg_on = _cfg()
  cfg_off = dataclasses.replace(cfg_on, shared_expert_enabled=False)
  x_BTD = _x(11)
  params_on = _init(cfg_on, x_BTD)["params"]
  params_off = _init(cfg_off, x_BTD)["params"]
  assert set(params_on) == {"router", "w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down"}
  assert set(params_off) == {"router", "w_gate", "w_up", "w_down"}
  assert params_on["shared_gate"]["kernel"].shape == (16, cfg_on.num_shared_experts * 8)
  routed = {k: v for k, v in params_on.items() if not k.startswith("shared")}
  y_on, _ = _apply(cfg_on)({"params": params_on}, x_BTD)
  y_off, _ = _apply(cfg_off)({"params": routed}, x_BTD)
  shared_BTD = _np_swiglu(x_BTD, *(params_on[f"shared_{n}"]["kernel"] for n in ("gate", "up", "down")))
  assert np.max(np.abs(shared_BTD)) > 1e-2
  np.testing.assert_allclose(y_on - y_off, shared_BTD, **TOL)


def test_layer_aux_free_bias_collection_steers_selection():
  cfg = _cfg(aux_free_bias=True)
  x_BTD = _x(12)
  variables = _init(cfg, x_BTD)
  assert set(variables) == {"params", "moe_bias"}
  assert not any(
    "bias" in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
  )
  np.testing.assert_array_equal(variables["moe_bias"]["bias"], np.zeros(cfg.num_experts))
  _, aux = _apply(cfg)(variables, x_BTD)
  biased = {**variables, "moe_bias": {"bias": jnp.array([0.0, 0.0, 0.0, 2.0])}}
  _, aux_b = _apply(cfg)(biased, x_BTD)
  assert float(aux_b["load"][3]) == 0.5  # expert 3 is in every token's top-2
  assert float(aux["load"][3]) < 0.5
  _, aux_plain = _apply(dataclasses.replace(cfg, aux_free_bias=False))({"params": variables["params"]}, x_BTD)
  chex.assert_trees_all_close(aux_plain, aux, **TOL)


def test_active_and_total_param_counts():
  x_BTD = _normal(np.random.default_rng(13), 1, 1, 16)
  for cfg in (_cfg(), _cfg(shared_expert_enabled=False), _cfg(experts_per_tok=1, num_shared_experts=2)):
    shapes = jax.eval_shape(MoE(cfg).init, jax.random.key(0), x_BTD)["params"]
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(nn.unbox(shapes))) == moe_total_params(cfg)
  for cfg in (_cfg(), _cfg(experts_per_tok=1, num_shared_experts=2)):
    params = _init(cfg, x_BTD)["params"]
    # One token touches the router (every logit, through the balance loss), its k experts and the shared one.

    def loss(p, cfg=cfg, x_BTD=x_BTD):
      y_BTD, aux = MoE(cfg).apply({"params": p}, x_BTD)
      return jnp.sum(y_BTD) + aux["load_balance"]

    grads = jax.jit(jax.grad(loss), compiler_options=QUICK_COMPILE)(params)
    assert sum(int(jnp.count_nonzero(g)) for g in jax.tree.leaves(grads)) == moe_active_params(cfg)


def test_load_balance_training_reduces_load_imbalance():
  cfg = _cfg(hidden_size=16, moe_intermediate_size=16)
  rng = np.random.default_rng(14)
  x_BTD = _normal(rng, 4, 32, 16).at[..., 0].set(1.0)  # a constant feature ...
  target_BTD = jnp.tanh(x_BTD @ _normal(rng, 16, 16) / 4.0)
  params = _init(cfg, x_BTD)["params"]
  params["router"]["kernel"] = params["router"]["kernel"].at[0, 0].set(3.0)  # ... that favours expert 0
  layer, opt = MoE(cfg), optax.adam(3e-2)

  def loss_fn(p, alpha):
    y_BTD, aux = layer.apply({"params": p}, x_BTD)
    return jnp.mean(jnp.square(y_BTD - target_BTD)) + alpha * aux["load_balance"], aux["load"]

  @functools.partial(jax.jit, compiler_options=QUICK_COMPILE)
  def step(p, state, alpha):
    (_, load_E), g = jax.value_and_grad(loss_fn, has_aux=True)(p, alpha)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state, load_E

  def train(alpha: float, steps: int = 200) -> tuple[float, float]:
    p, state = params, opt.init(params)
    loads = []
    for _ in range(steps):
      p, state, load_E = step(p, state, jnp.float32(alpha))
      loads.append(load_E)
    return _cv(loads[0]), _cv(np.mean(np.stack(loads[-10:]), axis=0))

  cv0, cv_balanced = train(0.1)
  _, cv_free = train(0.0)
  assert cv0 > 0.4  # expert 0 takes half of all assignments at the start
  assert cv_balanced < 0.25 * cv0
  assert cv_free > 0.8 * cv0
