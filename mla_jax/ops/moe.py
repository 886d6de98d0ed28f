"""Mixture-of-Experts routing, auxiliary losses and the dispatch implementations of one SwiGLU MoE.

Every dispatch computes y_t = sum_k w_tk * Expert_{e_tk}(x_t), Expert_e(x) = (silu(x W^g_e) * x W^u_e) W^d_e,
with the experts' weights stacked on a leading expert axis:

  moe_ragged      the dropless entry point (moe_dispatch='ragged'): moe_blocked on CPU, moe_ragged_dot on
                  GPU and TPU (chosen by jax.default_backend() at trace time).
  moe_blocked     dropless: the (token, slot) assignments sorted by expert, each expert's group padded to
                  whole blocks of M rows, one SwiGLU per occupied block with that block's expert's weights.
  moe_ragged_dot  dropless: the sorted assignments through lax.ragged_dot grouped matmuls. XLA:CPU has no
                  grouped matmul, so there it runs every expert over every assignment (E x the work).
  moe_capacity    GShard (Lepikhin et al. 2020): fixed [E, C, D] expert buffers; assignments over the
                  capacity C are dropped. Static shapes, shardable over an `expert` mesh axis.
  moe_dense       every expert on every token, weighted by a dense [T, E] matrix: the slow reference.

Shapes: T tokens, D model width, E experts, K experts per token, F expert hidden width, C capacity,
S = T * K assignments, N blocks of M rows, R = N * M block rows. Matmuls run in the input dtype; routing
probabilities, combine weights, the weighted sum and moe_blocked's weight gradients run in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def route(
  logits_TE: jax.Array,
  k: int,
  norm_topk_prob: bool,
  bias_E: jax.Array | None = None,
  router: str = "softmax",
  n_group: int = 1,
  topk_group: int = 1,
  scaling: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k router. Returns (weights_TK float32, experts_TK int32, probs_TE float32).

  Scores s_t in float32: softmax(logits_t) (DeepSeek-V2) or sigmoid(logits_t) (DeepSeek-V3). The k experts
  are the top-k of s_t + bias (DeepSeek-V3 §2.1.2, auxiliary-loss-free balancing: the bias steers the
  selection only and never enters the weights). With n_group > 1 the selection is group-limited
  (DeepSeek-V3's noaux_tc): the E experts form n_group groups of E / n_group, a group's score is the sum of
  its two best biased scores, and only the experts of the topk_group best groups can be chosen. The weights
  are the chosen unbiased scores s_{t,e_tk}, times `scaling` (routed_scaling_factor).

  `norm_topk_prob` renormalises the chosen weights to sum to one before the scaling. Softmax: with k = 1 the
  renormalised weight would be p / p = 1 for every token, the output would not depend on the router logits
  and the router would get no gradient from the task loss, so for k = 1 the weight stays the routing
  probability p_{t,e_t1} (Switch Transformer, Fedus et al. 2021, §2.1) whatever `norm_topk_prob` says.
  Sigmoid follows DeepSeek-V3 exactly: w / (sum w + 1e-20) for every k.

  probs_TE, which the load-balance loss reads, is the softmax for softmax scores and the sigmoid scores
  normalised per token, s_t / sum_e s_te, for sigmoid ones (DeepSeek-V3's sequence-wise balance loss, eq. 17-20).
  """
  logits_TE = logits_TE.astype(jnp.float32)
  if router == "sigmoid":
    scores_TE = jax.nn.sigmoid(logits_TE)
    probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
  elif router == "softmax":
    scores_TE = probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  else:
    raise ValueError(f"unknown router {router!r}")
  choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.astype(jnp.float32)
  if n_group > 1:
    choice_TE = jnp.where(group_mask(choice_TE, n_group, topk_group), choice_TE, -jnp.inf)
  _, experts_TK = jax.lax.top_k(choice_TE, k)
  weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
  if router == "sigmoid" and norm_topk_prob:
    weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
  elif norm_topk_prob and k > 1:
    # The floor only matters if every chosen probability underflowed (possible only with a bias).
    denom_T1 = jnp.maximum(jnp.sum(weights_TK, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    weights_TK = weights_TK / denom_T1
  if scaling != 1.0:
    weights_TK = weights_TK * scaling
  return weights_TK, experts_TK.astype(jnp.int32), probs_TE


def group_mask(choice_TE: jax.Array, n_group: int, topk_group: int) -> jax.Array:
  """bool [T, E]: True for the experts of each token's topk_group best groups, a group's score being the
  sum of its two highest choice scores (its only one for groups of one expert)."""
  T, E = choice_TE.shape
  choice_TGS = choice_TE.reshape(T, n_group, E // n_group)
  group_TG = jnp.sum(jax.lax.top_k(choice_TGS, min(2, E // n_group))[0], axis=-1)
  _, groups_TK = jax.lax.top_k(group_TG, topk_group)
  keep_TG = jnp.sum(jax.nn.one_hot(groups_TK, n_group, dtype=jnp.int32), axis=1) > 0
  return jnp.repeat(keep_TG, E // n_group, axis=1)


def route_reference(
  logits_TE,
  k: int,
  norm_topk_prob: bool,
  bias_E=None,
  router: str = "softmax",
  n_group: int = 1,
  topk_group: int = 1,
  scaling: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`route` one token at a time in float64 numpy: the slow twin the tests compare it with. The chosen
  experts come back in descending order of their (biased) choice score, as top_k returns them."""
  logits_TE = np.asarray(logits_TE, np.float64)
  T, E = logits_TE.shape
  bias_E = np.zeros(E) if bias_E is None else np.asarray(bias_E, np.float64)
  size = E // n_group
  weights, experts, probs = [], [], []
  for logits_E in logits_TE:
    if router == "sigmoid":
      scores_E = 1.0 / (1.0 + np.exp(-logits_E))
      probs.append(scores_E / scores_E.sum())
    else:
      scores_E = np.exp(logits_E - logits_E.max())
      scores_E = scores_E / scores_E.sum()
      probs.append(scores_E)
    choice_E = scores_E + bias_E
    if n_group > 1:
      group_score = [sum(sorted(choice_E[g * size : (g + 1) * size])[::-1][:2]) for g in range(n_group)]
      kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
      choice_E = np.array([c if e // size in kept else -np.inf for e, c in enumerate(choice_E)])
    chosen = sorted(range(E), key=lambda e: -choice_E[e])[:k]
    w = np.array([scores_E[e] for e in chosen])
    if router == "sigmoid" and norm_topk_prob:
      w = w / (w.sum() + 1e-20)
    elif norm_topk_prob and k > 1:
      w = w / w.sum()
    weights.append(w * scaling)
    experts.append(chosen)
  return np.array(weights), np.array(experts, np.int32), np.array(probs)


def expert_counts(experts_TK: jax.Array, num_experts: int) -> jax.Array:
  """Number of (token, slot) assignments routed to each expert, int32 [E]."""
  return jnp.bincount(experts_TK.reshape(-1), length=num_experts).astype(jnp.int32)


def expert_load(experts_TK: jax.Array, num_experts: int) -> jax.Array:
  """f_E: the fraction of the T * K assignments that go to each expert (sums to one), float32 [E]."""
  return expert_counts(experts_TK, num_experts).astype(jnp.float32) / experts_TK.size


def load_balance_loss(probs_TE: jax.Array, experts_TK: jax.Array, num_experts: int) -> jax.Array:
  """E * sum_i f_i * P_i (Switch Transformer eq. 4-6; GShard's l_aux with the top-k assignments).

  f_i = (assignments to expert i) / (T * K), a count with no gradient; P_i = mean_t p_{t,i}, through
  which the loss trains the router. The minimum, 1, is reached by a uniform load with uniform P.
  """
  f_E = expert_load(experts_TK, num_experts)
  p_E = jnp.mean(probs_TE.astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(f_E * p_E)


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
  """mean_t logsumexp(logits_t)^2 (ST-MoE, Zoph et al. 2022, eq. 5): keeps the router logits small."""
  z_T = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(z_T))


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * up


def moe_ragged(
  x_TD: jax.Array,
  weights_TK: jax.Array,
  experts_TK: jax.Array,
  w_gate_EDF: jax.Array,
  w_up_EDF: jax.Array,
  w_down_EFD: jax.Array,
) -> jax.Array:
  """Dropless MoE (moe_dispatch='ragged'): every assignment is computed, none is dropped.

  On CPU this is `moe_blocked` with its default block size; on GPU and TPU it is `moe_ragged_dot`. The
  choice is made by jax.default_backend() when the function is traced. Both equal `moe_dense`.
  """
  if jax.default_backend() == "cpu":
    return moe_blocked(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
  return moe_ragged_dot(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)


# Rows per block of moe_blocked: of 32/64/128/256, the fastest fwd+bwd at 2048 tokens, top-2, D 384,
# F 768 with 8 and 16 experts on a 2-core CPU (256 ties it with 4 experts and pads more at 16).
DEFAULT_BLOCK_SIZE = 128


def default_block_size(num_assignments: int, num_experts: int) -> int:
  """min(DEFAULT_BLOCK_SIZE, the mean group size S / E rounded up to a power of two).

  A short input (decoding) would otherwise pad every used expert's few assignments to a full block.
  """
  mean_group = max(1, -(-num_assignments // num_experts))
  return min(DEFAULT_BLOCK_SIZE, 1 << (mean_group - 1).bit_length())


class BlockLayout(NamedTuple):
  """Where moe_blocked puts each assignment.

  row_S: the block row of assignment s (s = t * K + k). token_R: the token each block row reads, T for a
  padding row. expert_N: each block's expert (E - 1 for the unused blocks at the end). num_blocks: the
  occupied blocks, sum_e ceil(count_e / M), int32 scalar; the rest of the N blocks are never computed.
  """

  row_S: jax.Array
  token_R: jax.Array
  expert_N: jax.Array
  num_blocks: jax.Array


def block_layout(experts_TK: jax.Array, num_experts: int, block_size: int) -> BlockLayout:
  """Sort the S assignments by expert (stable) and pad each expert's group to a multiple of M rows.

  Expert e's group occupies blocks [sum_{e' < e} ceil(c_e' / M), sum_{e' <= e} ceil(c_e' / M)); an expert
  with no assignment occupies none. N = (S + E * (M - 1)) // M blocks bound sum_e ceil(c_e / M) statically.
  """
  T, K = experts_TK.shape
  S, E, M = T * K, num_experts, block_size
  N = (S + E * (M - 1)) // M
  flat_S = experts_TK.reshape(S)
  order_S = jnp.argsort(flat_S, stable=True)  # sorted position -> assignment
  counts_E = expert_counts(experts_TK, E)
  blocks_E = (counts_E + M - 1) // M
  block_end_E = jnp.cumsum(blocks_E)
  group_start_E = jnp.cumsum(counts_E) - counts_E  # first sorted position of each expert
  row_start_E = (block_end_E - blocks_E) * M  # first block row of each expert
  sorted_experts_S = flat_S[order_S]
  sorted_rows_S = row_start_E[sorted_experts_S] + jnp.arange(S, dtype=jnp.int32) - group_start_E[sorted_experts_S]
  row_S = jnp.zeros(S, jnp.int32).at[order_S].set(sorted_rows_S)
  token_R = jnp.full(N * M, T, jnp.int32).at[row_S].set(jnp.arange(S, dtype=jnp.int32) // K)
  expert_N = jnp.searchsorted(block_end_E, jnp.arange(N, dtype=jnp.int32), side="right")
  expert_N = jnp.minimum(expert_N, E - 1).astype(jnp.int32)
  return BlockLayout(row_S, token_R, expert_N, block_end_E[-1])


def _expert(w_E: jax.Array, e: jax.Array, dtype) -> jax.Array:
  """Expert e's [D, F] or [F, D] matrix of a stacked weight, in the compute dtype."""
  return jax.lax.dynamic_index_in_dim(w_E, e, keepdims=False).astype(dtype)


def _blocked_swiglu_loop(x_NMD, expert_N, num_blocks, w_gate_EDF, w_up_EDF, w_down_EFD, save: bool):
  """The forward loop over the occupied blocks; with `save` it also keeps the gate and up activations."""
  N, M, _ = x_NMD.shape
  F = w_gate_EDF.shape[-1]
  dtype = x_NMD.dtype

  def body(n, carry):
    e, x_MD = expert_N[n], x_NMD[n]
    gate_MF = x_MD @ _expert(w_gate_EDF, e, dtype)
    up_MF = x_MD @ _expert(w_up_EDF, e, dtype)
    out_MD = _swiglu(gate_MF, up_MF) @ _expert(w_down_EFD, e, dtype)
    if not save:
      return carry.at[n].set(out_MD)
    out_NMD, gate_NMF, up_NMF = carry
    return out_NMD.at[n].set(out_MD), gate_NMF.at[n].set(gate_MF), up_NMF.at[n].set(up_MF)

  init = jnp.zeros_like(x_NMD)
  if save:
    init = (init, jnp.zeros((N, M, F), dtype), jnp.zeros((N, M, F), dtype))
  return jax.lax.fori_loop(0, num_blocks, body, init)


@jax.custom_vjp
def _blocked_swiglu(x_NMD, expert_N, num_blocks, w_gate_EDF, w_up_EDF, w_down_EFD):
  """out[n] = SwiGLU_{expert_N[n]}(x[n]) for the first num_blocks blocks, zeros after them.

  A while loop with a traced trip count visits the occupied blocks only, so the padding blocks cost
  nothing. The reverse pass is a loop over the same blocks that reuses the saved gate and up activations
  and adds each block's weight gradient into its expert's float32 slice in place; on CPU this is faster
  than autodiff of a scan over all N blocks or a batched einsum over per-block gathered weights.
  Forward mode (jvp) is not defined.
  """
  return _blocked_swiglu_loop(x_NMD, expert_N, num_blocks, w_gate_EDF, w_up_EDF, w_down_EFD, save=False)


def _blocked_swiglu_fwd(x_NMD, expert_N, num_blocks, w_gate_EDF, w_up_EDF, w_down_EFD):
  out_NMD, gate_NMF, up_NMF = _blocked_swiglu_loop(
    x_NMD, expert_N, num_blocks, w_gate_EDF, w_up_EDF, w_down_EFD, save=True
  )
  return out_NMD, (x_NMD, expert_N, num_blocks, w_gate_EDF, w_up_EDF, w_down_EFD, gate_NMF, up_NMF)


def _blocked_swiglu_bwd(residuals, dout_NMD):
  x_NMD, expert_N, num_blocks, w_gate_EDF, w_up_EDF, w_down_EFD, gate_NMF, up_NMF = residuals
  dtype = x_NMD.dtype
  f32 = jnp.float32

  def body(n, carry):
    dx_NMD, dw_gate_EDF, dw_up_EDF, dw_down_EFD = carry
    e, x_MD, dout_MD = expert_N[n], x_NMD[n], dout_NMD[n]
    gate_MF, up_MF = gate_NMF[n], up_NMF[n]
    dhidden_MF = jnp.dot(dout_MD, _expert(w_down_EFD, e, dtype).T, preferred_element_type=f32)
    gate32_MF, up32_MF = gate_MF.astype(f32), up_MF.astype(f32)
    sig_MF = jax.nn.sigmoid(gate32_MF)
    dup_MF = (dhidden_MF * gate32_MF * sig_MF).astype(dtype)
    # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
    dgate_MF = (dhidden_MF * up32_MF * sig_MF * (1.0 + gate32_MF * (1.0 - sig_MF))).astype(dtype)
    dw_down_EFD = dw_down_EFD.at[e].add(jnp.dot(_swiglu(gate_MF, up_MF).T, dout_MD, preferred_element_type=f32))
    dw_gate_EDF = dw_gate_EDF.at[e].add(jnp.dot(x_MD.T, dgate_MF, preferred_element_type=f32))
    dw_up_EDF = dw_up_EDF.at[e].add(jnp.dot(x_MD.T, dup_MF, preferred_element_type=f32))
    dx_MD = jnp.dot(dgate_MF, _expert(w_gate_EDF, e, dtype).T, preferred_element_type=f32) + jnp.dot(
      dup_MF, _expert(w_up_EDF, e, dtype).T, preferred_element_type=f32
    )
    return dx_NMD.at[n].set(dx_MD.astype(dtype)), dw_gate_EDF, dw_up_EDF, dw_down_EFD

  init = (
    jnp.zeros_like(x_NMD),
    jnp.zeros(w_gate_EDF.shape, f32),
    jnp.zeros(w_up_EDF.shape, f32),
    jnp.zeros(w_down_EFD.shape, f32),
  )
  dx_NMD, dw_gate_EDF, dw_up_EDF, dw_down_EFD = jax.lax.fori_loop(0, num_blocks, body, init)
  # No cotangent for the integer block experts and block count.
  return (
    dx_NMD,
    None,
    None,
    dw_gate_EDF.astype(w_gate_EDF.dtype),
    dw_up_EDF.astype(w_up_EDF.dtype),
    dw_down_EFD.astype(w_down_EFD.dtype),
  )


_blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def moe_blocked(
  x_TD: jax.Array,
  weights_TK: jax.Array,
  experts_TK: jax.Array,
  w_gate_EDF: jax.Array,
  w_up_EDF: jax.Array,
  w_down_EFD: jax.Array,
  block_size: int | None = None,
) -> jax.Array:
  """Dropless MoE by block-grouped matmuls: exact, no assignment dropped, for backends without ragged_dot.

  The assignments are sorted by expert and each expert's group is padded with zero rows to whole blocks
  of M = block_size rows (`block_layout`); each occupied block runs its expert's SwiGLU, and the outputs
  are gathered back, weighted in float32 and summed over K. The work is sum_e ceil(c_e / M) * M rows,
  at most S + E * (M - 1), against E * T for moe_dense. block_size=None: `default_block_size`.
  """
  T, D = x_TD.shape
  K = experts_TK.shape[1]
  E = w_gate_EDF.shape[0]
  M = default_block_size(T * K, E) if block_size is None else block_size
  layout = block_layout(experts_TK, E, M)
  N = layout.expert_N.shape[0]
  x_NMD = jnp.take(x_TD, layout.token_R, axis=0, mode="fill", fill_value=0).reshape(N, M, D)
  out_NMD = _blocked_swiglu(x_NMD, layout.expert_N, layout.num_blocks, w_gate_EDF, w_up_EDF, w_down_EFD)
  out_TKD = jnp.take(out_NMD.reshape(N * M, D), layout.row_S, axis=0).reshape(T, K, D)
  y_TD = jnp.einsum("tk,tkd->td", weights_TK.astype(jnp.float32), out_TKD.astype(jnp.float32))
  return y_TD.astype(x_TD.dtype)


def moe_ragged_dot(
  x_TD: jax.Array,
  weights_TK: jax.Array,
  experts_TK: jax.Array,
  w_gate_EDF: jax.Array,
  w_up_EDF: jax.Array,
  w_down_EFD: jax.Array,
) -> jax.Array:
  """Dropless MoE through lax.ragged_dot: assignments sorted by expert, one grouped matmul per
  projection, un-sorted, summed.

  The group sizes are the per-expert counts; an expert with no assignment is an empty group. On CPU JAX
  lowers ragged_dot by expanding the lhs to [E, S, D] with a group mask and contracting over E, so the
  cost there is E times the dropless FLOPs (hence moe_blocked). On TPU, and on GPU unless
  jax_ragged_dot_use_gpu_pallas_triton_lowering selects a Pallas kernel, it lowers to XLA's ragged dot.
  """
  T, D = x_TD.shape
  K = experts_TK.shape[1]
  E = w_gate_EDF.shape[0]
  dtype = x_TD.dtype
  flat_experts_S = experts_TK.reshape(T * K)
  order_S = jnp.argsort(flat_experts_S, stable=True)  # slot s of the sorted list holds assignment order_S[s]
  inverse_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(T * K, dtype=order_S.dtype))
  xs_SD = jnp.take(x_TD, order_S // K, axis=0)
  group_sizes_E = expert_counts(experts_TK, E)
  gate_SF = jax.lax.ragged_dot(xs_SD, w_gate_EDF.astype(dtype), group_sizes_E)
  up_SF = jax.lax.ragged_dot(xs_SD, w_up_EDF.astype(dtype), group_sizes_E)
  out_SD = jax.lax.ragged_dot(_swiglu(gate_SF, up_SF), w_down_EFD.astype(dtype), group_sizes_E)
  out_TKD = jnp.take(out_SD, inverse_S, axis=0).reshape(T, K, D)
  y_TD = jnp.einsum("tk,tkd->td", weights_TK.astype(jnp.float32), out_TKD.astype(jnp.float32))
  return y_TD.astype(dtype)


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """C = ceil(T * K / E * capacity_factor), capped at T (no expert can receive more than T assignments)."""
  return max(1, min(num_tokens, math.ceil(num_tokens * k / num_experts * capacity_factor)))


def moe_capacity(
  x_TD: jax.Array,
  weights_TK: jax.Array,
  experts_TK: jax.Array,
  w_gate_EDF: jax.Array,
  w_up_EDF: jax.Array,
  w_down_EFD: jax.Array,
  capacity_factor: float,
) -> tuple[jax.Array, jax.Array]:
  """GShard-style capacity MoE. Returns (y_TD, dropped_fraction float32 scalar).

  Each expert has a buffer of C slots. The slots are given out in the order: every token's first
  choice (tokens in order), then every token's second choice, and so on, i.e. all top-1 assignments
  before any top-2 one (GShard §2.2, Algorithm 1). An assignment whose position in its expert's queue
  (a cumulative sum of one-hot expert masks) is >= C is dropped: that slot contributes zero for its
  token. dropped_fraction = dropped assignments / (T * K).

  The dispatch tensor [T, E, C] is one-hot (exact in any dtype); the routing weights are applied in
  float32 to the [E, C, D] expert outputs before the combine einsum. The [E, C, D] buffers carry the
  logical axes ('expert', None, 'activation_embed'), so with active axis rules the expert axis is
  sharded over the `expert` mesh axis; without a mesh the constraint does nothing. The dispatch and
  combine einsums cost O(T * E * C * D) = O(T^2 * K * capacity_factor * D).
  """
  T, D = x_TD.shape
  K = experts_TK.shape[1]
  E = w_gate_EDF.shape[0]
  C = capacity(T, K, E, capacity_factor)
  dtype = x_TD.dtype
  mask_KTE = jax.nn.one_hot(experts_TK.T, E, dtype=jnp.int32)
  # Position of each assignment in its expert's queue, counting slot-major (k, then t).
  position_KTE = jnp.cumsum(mask_KTE.reshape(K * T, E), axis=0).reshape(K, T, E) - 1
  position_KT = jnp.sum(position_KTE * mask_KTE, axis=-1)
  kept_KT = position_KT < C
  # one_hot of a position >= C is all zeros, so dropped assignments vanish from both tensors.
  slot_KTC = jax.nn.one_hot(position_KT, C, dtype=jnp.float32)
  dispatch_TEC = jnp.einsum("kte,ktc->tec", mask_KTE.astype(jnp.float32), slot_KTC)
  # Each (e, c) slot holds at most one assignment, so its weight is a sum with at most one term.
  weight_EC = jnp.einsum("kt,kte,ktc->ec", weights_TK.T.astype(jnp.float32), mask_KTE.astype(jnp.float32), slot_KTC)
  dispatch_TEC = dispatch_TEC.astype(dtype)

  x_ECD = jnp.einsum("tec,td->ecd", dispatch_TEC, x_TD)
  x_ECD = nn.with_logical_constraint(x_ECD, ("expert", None, "activation_embed"))
  gate_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w_gate_EDF.astype(dtype))
  up_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w_up_EDF.astype(dtype))
  out_ECD = jnp.einsum("ecf,efd->ecd", _swiglu(gate_ECF, up_ECF), w_down_EFD.astype(dtype))
  out_ECD = (out_ECD.astype(jnp.float32) * weight_EC[:, :, None]).astype(dtype)
  out_ECD = nn.with_logical_constraint(out_ECD, ("expert", None, "activation_embed"))
  y_TD = jnp.einsum("tec,ecd->td", dispatch_TEC, out_ECD, preferred_element_type=jnp.float32)
  dropped_fraction = jnp.sum(~kept_KT).astype(jnp.float32) / (T * K)
  return y_TD.astype(dtype), dropped_fraction


def moe_dense(
  x_TD: jax.Array,
  weights_TK: jax.Array,
  experts_TK: jax.Array,
  w_gate_EDF: jax.Array,
  w_up_EDF: jax.Array,
  w_down_EFD: jax.Array,
) -> jax.Array:
  """Reference: all E experts on all T tokens, combined by the dense weights c_te = sum_k w_tk [e_tk = e]."""
  E = w_gate_EDF.shape[0]
  dtype = x_TD.dtype
  combine_TE = jnp.einsum(
    "tk,tke->te", weights_TK.astype(jnp.float32), jax.nn.one_hot(experts_TK, E, dtype=jnp.float32)
  )
  gate_TEF = jnp.einsum("td,edf->tef", x_TD, w_gate_EDF.astype(dtype))
  up_TEF = jnp.einsum("td,edf->tef", x_TD, w_up_EDF.astype(dtype))
  out_TED = jnp.einsum("tef,efd->ted", _swiglu(gate_TEF, up_TEF), w_down_EFD.astype(dtype))
  y_TD = jnp.einsum("te,ted->td", combine_TE, out_TED.astype(jnp.float32))
  return y_TD.astype(dtype)
