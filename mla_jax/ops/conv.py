"""Causal depthwise convolution over time (Mamba2's short conv), carrying a window of past inputs.

With K taps w_KE, bias b_E and the K-1 inputs before the sequence in window_BWE (W = K-1; zeros at the
start of a sequence):
  out[t] = b + sum_k w[k] x[t - (K-1) + k]        (x at negative t read from the window)
which is PyTorch Conv1d(groups=E, padding=K-1) cropped to the T outputs. The new window is the last K-1
inputs (window, then x). `causal_conv` computes all T outputs at once, `causal_conv_step` one token, and
`causal_conv_reference` scans the step over the sequence (its slow twin).

Packed rows pass `seq_idx_BT` [B, T], a document id per token (as for `ops.ssd`): tap k of token t reads
its input only when that input is in t's document, so every document starts from a zero window. The
window before the sequence belongs to the row's first document, and the new window keeps only the last
document's inputs (zeros before its start). Without seq_idx nothing changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax.ops.ssd import document_index


def _documents(seq_idx_BT: jax.Array, x_BTE: jax.Array) -> jax.Array:
  if seq_idx_BT.shape != x_BTE.shape[:2]:
    raise ValueError(f"seq_idx {seq_idx_BT.shape} must be [batch, time] = {x_BTE.shape[:2]}")
  return document_index(seq_idx_BT)


def causal_conv(
  x_BTE: jax.Array, w_KE: jax.Array, b_E: jax.Array, window_BWE: jax.Array, seq_idx_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Returns the float32 outputs [B, T, E] and the new window [B, K-1, E] in the window's dtype."""
  xpad_BSE = jnp.concatenate([window_BWE.astype(x_BTE.dtype), x_BTE], axis=1)
  k = w_KE.shape[0]
  b, t = x_BTE.shape[:2]
  x32, w32 = xpad_BSE.astype(jnp.float32), w_KE.astype(jnp.float32)
  if seq_idx_BT is None:
    out_BTE = b_E.astype(jnp.float32) + x32[:, 0:t] * w32[0]
    for i in range(1, k):
      out_BTE = out_BTE + x32[:, i : i + t] * w32[i]
    return out_BTE, xpad_BSE[:, xpad_BSE.shape[1] - (k - 1) :].astype(window_BWE.dtype)
  doc_BT = _documents(seq_idx_BT, x_BTE)
  doc_BS = jnp.concatenate([jnp.zeros((b, k - 1), jnp.int32), doc_BT], axis=1)  # the window: first document
  out_BTE = b_E.astype(jnp.float32)
  for i in range(k):  # tap i reads slot s = t + i of the padded inputs, kept when it is in t's document
    same_BT1 = (doc_BS[:, i : i + t] == doc_BT)[..., None]
    out_BTE = out_BTE + jnp.where(same_BT1, x32[:, i : i + t], 0.0) * w32[i]
  last_BW1 = (doc_BS[:, doc_BS.shape[1] - (k - 1) :] == doc_BT[:, -1:])[..., None]
  window_BWE = jnp.where(last_BW1, xpad_BSE[:, xpad_BSE.shape[1] - (k - 1) :], 0).astype(window_BWE.dtype)
  return out_BTE, window_BWE


def causal_conv_step(
  x_BE: jax.Array, w_KE: jax.Array, b_E: jax.Array, window_BWE: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One token: out = b + sum_k w[k] [window | x][k] (float32 [B, E]) and the window shifted by x."""
  xpad_BKE = jnp.concatenate([window_BWE.astype(x_BE.dtype), x_BE[:, None]], axis=1)
  out_BE = b_E.astype(jnp.float32) + jnp.sum(xpad_BKE.astype(jnp.float32) * w_KE.astype(jnp.float32), axis=1)
  return out_BE, xpad_BKE[:, 1:].astype(window_BWE.dtype)


def causal_conv_reference(
  x_BTE: jax.Array, w_KE: jax.Array, b_E: jax.Array, window_BWE: jax.Array, seq_idx_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """`causal_conv_step` applied token by token (a scan over time); with seq_idx the window is set to
  zero before the first token of every document after the row's first."""
  b = x_BTE.shape[0]
  if seq_idx_BT is None:
    reset_BT = jnp.zeros(x_BTE.shape[:2], bool)
  else:
    doc_BT = _documents(seq_idx_BT, x_BTE)
    reset_BT = jnp.concatenate([jnp.zeros((b, 1), bool), doc_BT[:, 1:] != doc_BT[:, :-1]], axis=1)

  def step(window_BWE, inputs):
    x_BE, reset_B = inputs
    window_BWE = jnp.where(reset_B[:, None, None], jnp.zeros_like(window_BWE), window_BWE)
    out_BE, window_BWE = causal_conv_step(x_BE, w_KE, b_E, window_BWE)
    return window_BWE, out_BE

  window_BWE, out_TBE = jax.lax.scan(step, window_BWE, (x_BTE.swapaxes(0, 1), reset_BT.swapaxes(0, 1)))
  return out_TBE.swapaxes(0, 1), window_BWE
