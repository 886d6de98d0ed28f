"""State-space duality (SSD) of Mamba2 (Dao & Gu 2024, arXiv 2405.21060): chunked scan, its twins.

The selective SSM with scalar-times-identity A, per head h with state H_t of shape [P, N]:

  H_t = exp(dt_t A) H_{t-1} + (dt_t x_t) B_t^T,      y_t = H_t C_t

which is the paper's eq. (1a, 1b) with the mamba_ssm discretisation A_t = exp(dt_t A) (zero-order hold)
and B_t <- dt_t B_t (Euler).

`ssd_chunked` is the four-step block decomposition of the paper's Listing 1 (`ssd_minimal_discrete`),
`ssd_sequential` the token-by-token recurrence it must agree with, `ssd_step` one decode step and
`ssd_decode_step` its twin for a donated state (updated in place). Inputs x are NOT pre-multiplied by
dt; every function forms dt*x and dt*A itself. B and C come in G groups shared by H/G heads each: head h
reads group h // (H/G). The skip term D*x is not part of these ops: the Mamba2 layer adds it. All decay,
cumsum and exp math (and the state) is float32; y comes back in x's dtype.

Packed rows (several documents per row) pass `seq_idx_BT` [B, T], a document id per token (mamba_ssm's
`seq_idx`; non-decreasing along the row). The state resets to zero wherever the id changes from one
token to the next, so no decay or input crosses a document boundary; the initial state (if any) feeds
the row's first document, and the final state is the last document's. (mamba_ssm ties the initial state
to id 0; the two agree for rows whose ids start at 0.) Without seq_idx nothing changes.

Shape letters: B batch, T time, H heads, P head dim, N state size, G groups, R heads per group (H/G),
C chunks, Q chunk length (the L of the paper), S source position inside a chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def segsum(x: jax.Array) -> jax.Array:
  """out[..., i, j] = sum_{k=j+1..i} x[..., k] for i >= j, -inf above the diagonal.

  The stable segment sum of mamba_ssm `ssd_minimal.py`: each entry sums its own segment (the masked
  cumsum), never a difference of two prefix sums, so exp(out) is the decay prod_{j<k<=i} exp(x_k)
  without cancellation. The masked cumsum is written as one contraction with the constant 0/1 tensor
  M[i, j, k] = [j < k <= i]: the same sums, and on CPU about 3x faster than XLA's cumsum at T = 64.
  """
  t = x.shape[-1]
  i = jnp.arange(t)
  M_TTT = (i[None, :, None] < i[None, None, :]) & (i[None, None, :] <= i[:, None, None])
  x_TT = jnp.einsum("...k,ijk->...ij", x, M_TTT.astype(x.dtype), precision=jax.lax.Precision.HIGHEST)
  return jnp.where(i[:, None] >= i[None, :], x_TT, -jnp.inf)


def _check_shapes(
  x_BTHP: jax.Array, dt_BTH: jax.Array, A_H: jax.Array, B_BTGN: jax.Array, C_BTGN: jax.Array
) -> tuple[int, int]:
  b, t, h, _ = x_BTHP.shape
  g, n = B_BTGN.shape[-2:]
  if dt_BTH.shape != (b, t, h) or A_H.shape != (h,):
    raise ValueError(f"dt {dt_BTH.shape} / A {A_H.shape} do not match x {x_BTHP.shape}")
  if B_BTGN.shape != (b, t, g, n) or C_BTGN.shape != B_BTGN.shape:
    raise ValueError(f"B {B_BTGN.shape} and C {C_BTGN.shape} must both be {(b, t, g, n)}")
  if h % g:
    raise ValueError(f"{h} heads are not divisible by {g} groups")
  return g, n


def document_index(seq_idx_BT: jax.Array) -> jax.Array:
  """int32 [B, T]: 0 on the row's first document, +1 at every token whose id differs from the previous
  token's. Non-decreasing whatever the ids, so "same document" is equality and no run is rejoined."""
  new_BT = (seq_idx_BT[:, 1:] != seq_idx_BT[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((new_BT.shape[0], 1), jnp.int32), jnp.cumsum(new_BT, axis=1)], axis=1)


def _documents(seq_idx_BT: jax.Array, x_BTHP: jax.Array) -> jax.Array:
  if seq_idx_BT.shape != x_BTHP.shape[:2]:
    raise ValueError(f"seq_idx {seq_idx_BT.shape} must be [batch, time] = {x_BTHP.shape[:2]}")
  return document_index(seq_idx_BT)


def ssd_chunked(
  x_BTHP: jax.Array,
  dt_BTH: jax.Array,
  A_H: jax.Array,
  B_BTGN: jax.Array,
  C_BTGN: jax.Array,
  chunk_size: int,
  initial_state_BHPN: jax.Array | None = None,
  seq_idx_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Chunked SSD (paper Listing 1) -> (y_BTHP in x's dtype, final_state_BHPN float32). No D term.

  T need not divide by chunk_size: the tail is padded with dt = 0 (decay 1, no input), which leaves the
  final state unchanged, and y is cropped. The recurrence across chunks is a lax.scan over chunks.
  With seq_idx, as in mamba_ssm's kernels, every decay between two tokens of different documents is
  zero: in the diagonal blocks, in each chunk's own end state, in the carry into the next chunk, and
  in the entering state's contribution.
  """
  g, n = _check_shapes(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN)
  doc_BT = None if seq_idx_BT is None else _documents(seq_idx_BT, x_BTHP)
  b, t, h, p = x_BTHP.shape
  r = h // g
  out_dtype = x_BTHP.dtype
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  q = min(chunk_size, t)
  pad = (-t) % q
  c = (t + pad) // q

  dt_BTH = dt_BTH.astype(_F32)
  xdt_BTHP = x_BTHP.astype(_F32) * dt_BTH[..., None]
  dA_BTH = dt_BTH * A_H.astype(_F32)
  B_BTGN, C_BTGN = B_BTGN.astype(_F32), C_BTGN.astype(_F32)
  if pad:  # dt = 0 on the tail: dA = 0 (decay 1) and dt*x = 0, so the final state is unchanged
    xdt_BTHP, dA_BTH, B_BTGN, C_BTGN = (
      jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) for a in (xdt_BTHP, dA_BTH, B_BTGN, C_BTGN)
    )
    if doc_BT is not None:  # the tail stays in the last document
      doc_BT = jnp.pad(doc_BT, ((0, 0), (0, pad)), mode="edge")

  x_BCQGRP = xdt_BTHP.reshape(b, c, q, g, r, p)  # already dt * x
  B_BCQGN = B_BTGN.reshape(b, c, q, g, n)
  C_BCQGN = C_BTGN.reshape(b, c, q, g, n)
  dA_BCGRQ = dA_BTH.reshape(b, c, q, g, r).transpose(0, 1, 3, 4, 2)
  dAcs_BCGRQ = jnp.cumsum(dA_BCGRQ, axis=-1)

  # 1. Diagonal blocks: y_l = sum_{s<=l} (C_l . B_s) exp(sum_{s<k<=l} dA_k) dt_s x_s  (Listing 1, Y_diag).
  L_BCGRQS = jnp.exp(segsum(dA_BCGRQ))
  if doc_BT is not None:
    doc_BCQ = doc_BT.reshape(b, c, q)
    same_BC11QS = (doc_BCQ[:, :, :, None] == doc_BCQ[:, :, None, :])[:, :, None, None]
    L_BCGRQS = jnp.where(same_BC11QS, L_BCGRQS, 0.0)
  CB_BCGQS = jnp.einsum("bclgn,bcsgn->bcgls", C_BCQGN, B_BCQGN)
  y_BCGRQP = jnp.einsum("bcgrls,bcsgrp->bcgrlp", CB_BCGQS[:, :, :, None] * L_BCGRQS, x_BCQGRP)

  # 2. State at the end of each chunk from its own inputs (Listing 1, `states`).
  decay_BCGRQ = jnp.exp(dAcs_BCGRQ[..., -1:] - dAcs_BCGRQ)
  if doc_BT is not None:  # only the document at the chunk's end reaches its end state
    last_BC = doc_BCQ[:, :, -1]
    prev_last_BC = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), last_BC[:, :-1]], axis=1)
    decay_BCGRQ = jnp.where((doc_BCQ == last_BC[..., None])[:, :, None, None], decay_BCGRQ, 0.0)
  xd_BCQGRP = x_BCQGRP * decay_BCGRQ.transpose(0, 1, 4, 2, 3)[..., None]
  states_BCGRPN = jnp.einsum("bclgn,bclgrp->bcgrpn", B_BCQGN, xd_BCQGRP)

  # 3. Inter-chunk recurrence H_c = exp(sum of chunk c's dA) H_{c-1} + states_c from the initial state.
  # Listing 1 writes it as a segsum matmul over the C+1 chunk boundaries (O(C^2) per head); this scan
  # does the same C steps in O(C) and measured faster on CPU at T = 4096 (forward and backward).
  if initial_state_BHPN is None:
    h0_BGRPN = jnp.zeros((b, g, r, p, n), _F32)
  else:
    h0_BGRPN = initial_state_BHPN.astype(_F32).reshape(b, g, r, p, n)
  chunk_decay_BCGR = jnp.exp(dAcs_BCGRQ[..., -1])
  if doc_BT is not None:  # the carry survives a chunk only if the chunk ends in the carry's document
    chunk_decay_BCGR = jnp.where((last_BC == prev_last_BC)[..., None, None], chunk_decay_BCGR, 0.0)
  chunk_decay_CBGR = chunk_decay_BCGR.transpose(1, 0, 2, 3)

  def step(h_BGRPN, inputs):
    decay_BGR, s_BGRPN = inputs
    return decay_BGR[..., None, None] * h_BGRPN + s_BGRPN, h_BGRPN

  states_CBGRPN = states_BCGRPN.transpose(1, 0, 2, 3, 4, 5)
  final_BGRPN, prev_CBGRPN = jax.lax.scan(step, h0_BGRPN, (chunk_decay_CBGR, states_CBGRPN))

  # 4. Contribution of the state entering each chunk: y_l += exp(dAcs_l) H_{c-1} C_l (Listing 1, Y_off).
  y_off_BCGRQP = jnp.einsum("bclgn,cbgrpn->bcgrlp", C_BCQGN, prev_CBGRPN)
  in_decay_BCGRQ = jnp.exp(dAcs_BCGRQ)
  if doc_BT is not None:  # the entering state reaches only the tokens of its own document
    in_decay_BCGRQ = jnp.where((doc_BCQ == prev_last_BC[..., None])[:, :, None, None], in_decay_BCGRQ, 0.0)
  y_BCGRQP = y_BCGRQP + y_off_BCGRQP * in_decay_BCGRQ[..., None]

  y_BTHP = y_BCGRQP.transpose(0, 1, 4, 2, 3, 5).reshape(b, c * q, h, p)[:, :t]
  return y_BTHP.astype(out_dtype), final_BGRPN.reshape(b, h, p, n)


def ssd_step(
  x_BHP: jax.Array, dt_BH: jax.Array, A_H: jax.Array, B_BGN: jax.Array, C_BGN: jax.Array, state_BHPN: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One token of the recurrence -> (y_BHP in x's dtype, new_state_BHPN float32). No D term.

  H' = exp(dt A) H + (dt x) B^T,  y = H' C  (paper eq. 1a, 1b with A_t = exp(dt_t A), B_t <- dt_t B_t).
  """
  b, h, p = x_BHP.shape
  g, n = B_BGN.shape[-2:]
  r = h // g
  dt_BH = dt_BH.astype(_F32)
  decay_BGR = jnp.exp(dt_BH * A_H.astype(_F32)).reshape(b, g, r)
  x_BGRP = (x_BHP.astype(_F32) * dt_BH[..., None]).reshape(b, g, r, p)
  B_BGN, C_BGN = B_BGN.astype(_F32), C_BGN.astype(_F32)
  state_BGRPN = state_BHPN.astype(_F32).reshape(b, g, r, p, n)
  state_BGRPN = decay_BGR[..., None, None] * state_BGRPN + jnp.einsum("bgrp,bgn->bgrpn", x_BGRP, B_BGN)
  y_BGRP = jnp.einsum("bgrpn,bgn->bgrp", state_BGRPN, C_BGN)
  return y_BGRP.reshape(b, h, p).astype(x_BHP.dtype), state_BGRPN.reshape(b, h, p, n)


def ssd_decode_step(
  x_BHP: jax.Array, dt_BH: jax.Array, A_H: jax.Array, B_BGN: jax.Array, C_BGN: jax.Array, state_BHPN: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """`ssd_step` for a decode step whose state buffer is donated: y from the state before the update,

    y = H' C = exp(dt A) (H C) + (dt x) (B . C),

  then the update H', elementwise in the state's own shape and made to depend on y, so that XLA reads
  the old state first and updates it in place (`ssd_step`'s y, a matmul over the new state, makes
  XLA:CPU copy the state at every step).
  """
  h, dtype = x_BHP.shape[1], x_BHP.dtype
  r = h // B_BGN.shape[1]
  dt_BH = dt_BH.astype(_F32)
  decay_BH = jnp.exp(dt_BH * A_H.astype(_F32))
  x_BHP = x_BHP.astype(_F32) * dt_BH[..., None]
  B_BHN, C_BHN = jnp.repeat(B_BGN.astype(_F32), r, axis=1), jnp.repeat(C_BGN.astype(_F32), r, axis=1)
  state_BHPN = state_BHPN.astype(_F32)
  y_BHP = decay_BH[..., None] * jnp.einsum("bhpn,bhn->bhp", state_BHPN, C_BHN)
  y_BHP = y_BHP + x_BHP * jnp.sum(B_BHN * C_BHN, -1)[..., None]
  # x != x is false for every number but XLA does not fold it; exp(dt A) >= 0 > -1 - flag, so the max
  # keeps the decay and makes the update depend on y.
  nan_B1 = y_BHP[:, :1, 0]
  decay_BH = jnp.maximum(decay_BH, -1.0 - (nan_B1 != nan_B1).astype(_F32))
  state_BHPN = decay_BH[..., None, None] * state_BHPN + x_BHP[..., None] * B_BHN[:, :, None, :]
  return y_BHP.astype(dtype), state_BHPN


def ssd_sequential(
  x_BTHP: jax.Array,
  dt_BTH: jax.Array,
  A_H: jax.Array,
  B_BTGN: jax.Array,
  C_BTGN: jax.Array,
  chunk_size: int = 0,
  initial_state_BHPN: jax.Array | None = None,
  seq_idx_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Reference twin of `ssd_chunked`: `ssd_step` scanned over time (O(T) steps). No D term.

  `chunk_size` is accepted so the two are interchangeable, and unused. With seq_idx the state is set to
  zero before the first token of every document after the row's first.
  """
  del chunk_size
  _check_shapes(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN)
  b, _, h, p = x_BTHP.shape
  n = B_BTGN.shape[-1]
  if initial_state_BHPN is None:
    initial_state_BHPN = jnp.zeros((b, h, p, n), _F32)

  def step(state_BHPN, inputs):
    x_BHP, dt_BH, B_BGN, C_BGN, *reset = inputs
    if reset:
      state_BHPN = jnp.where(reset[0][:, None, None, None], 0.0, state_BHPN)
    y_BHP, state_BHPN = ssd_step(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN)
    return state_BHPN, y_BHP

  per_token = (x_BTHP, dt_BTH, B_BTGN, C_BTGN)
  if seq_idx_BT is not None:
    doc_BT = _documents(seq_idx_BT, x_BTHP)
    reset_BT = jnp.concatenate([jnp.zeros((b, 1), bool), doc_BT[:, 1:] != doc_BT[:, :-1]], axis=1)
    per_token += (reset_BT,)
  time_major = tuple(jnp.moveaxis(a, 1, 0) for a in per_token)
  final_BHPN, y_TBHP = jax.lax.scan(step, initial_state_BHPN.astype(_F32), time_major)
  return jnp.moveaxis(y_TBHP, 0, 1), final_BHPN
