"""Cross-entropy of the LM head: plain (from logits) and chunked over the sequence (from hidden states).

Every function returns (sum of weighted token losses, sum of weights, sum of weighted logsumexp^2) in
float32; the last feeds the logit z-loss. The head matmul is the model's: hidden states (already in the
compute dtype) times the float32 head weight [D, V] cast to that dtype, logits cast to float32.

`chunked_cross_entropy` processes `chunk_tokens` tokens at a time: the batch [B, T] is cut along the
sequence into chunks of [B, chunk_tokens // B] (the batch axis, and so its sharding, stays whole), and
each chunk is rematerialised, so backward recomputes that chunk's logits instead of keeping a
[B, T, V] float32 tensor. `cross_entropy_reference` is its plain twin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

LOGITS_AXES = ("batch", "activation_length", "activation_vocab")


def head_logits(hidden_BTD: jax.Array, head_DV: jax.Array) -> jax.Array:
  """hidden @ head in the hidden states' dtype (the LM head's math), float32 result."""
  B, T, D = hidden_BTD.shape
  logits_BTV = jnp.dot(hidden_BTD.reshape(B * T, D), head_DV.astype(hidden_BTD.dtype)).reshape(B, T, -1)
  return nn.with_logical_constraint(logits_BTV, LOGITS_AXES).astype(jnp.float32)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array | None = None):
  """(sum of token losses, sum of weights, sum of logsumexp^2) from logits, in float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  if weights_BT is None:
    weights_BT = jnp.ones_like(lse_BT)
  weights_BT = weights_BT.astype(jnp.float32)
  nll = jnp.sum((lse_BT - target_logit_BT) * weights_BT)
  return nll, jnp.sum(weights_BT), jnp.sum(jnp.square(lse_BT) * weights_BT)


def cross_entropy_reference(hidden_BTD, head_DV, targets_BT, weights_BT=None):
  """The plain loss: all [B, T, V] logits at once (kept for backward when differentiated)."""
  return cross_entropy(head_logits(hidden_BTD, head_DV), targets_BT, weights_BT)


def chunk_length(chunk_tokens: int, batch: int, seq_len: int) -> int:
  """Sequence positions per chunk: chunk_tokens spread over the batch rows, at least 1, at most seq_len."""
  return max(1, min(seq_len, chunk_tokens // batch))


def chunked_cross_entropy(hidden_BTD, head_DV, targets_BT, weights_BT=None, *, chunk_tokens: int):
  """The same sums as `cross_entropy_reference`, [B, Tc, V] logits at a time, Tc = chunk_tokens // B.

  A sequence not divisible by Tc is padded with weight-0 positions. Under differentiation each chunk is
  recomputed in backward (jax.checkpoint), so only the hidden states are kept.
  """
  B, T, D = hidden_BTD.shape
  Tc = chunk_length(chunk_tokens, B, T)
  n = -(-T // Tc)
  count_weights = weights_BT is not None
  weights_BT = jnp.ones((B, T), jnp.float32) if weights_BT is None else weights_BT.astype(jnp.float32)
  pad = n * Tc - T
  if pad:
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    weights_BT = jnp.pad(weights_BT, ((0, 0), (0, pad)))
  # [B, n * Tc, ...] -> [n, B, Tc, ...]: the scan runs over chunks, each keeps the whole batch axis.
  chunks = lambda x: x.reshape((B, n, Tc) + x.shape[2:]).swapaxes(0, 1)
  xs = (chunks(hidden_BTD), chunks(targets_BT), chunks(weights_BT))

  @functools.partial(jax.checkpoint, prevent_cse=False)  # the scan already keeps the recomputation apart
  def chunk_sums(head_DV, hidden_BCD, targets_BC, weights_BC):
    nll, _, z = cross_entropy(head_logits(hidden_BCD, head_DV), targets_BC, weights_BC)
    return nll, z

  def body(carry, x):
    nll, z = chunk_sums(head_DV, *x)
    return (carry[0] + nll, carry[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  (nll, z), _ = jax.lax.scan(body, (zero, zero), xs)
  count = jnp.sum(weights_BT) if count_weights else jnp.asarray(B * T, jnp.float32)
  return nll, count, z


def lm_cross_entropy(hidden_BTD, head_DV, targets_BT, weights_BT=None, chunk_tokens: int = 0):
  """Chunked when `chunk_tokens` > 0 and the batch holds more than one chunk, else plain."""
  B, T, _ = hidden_BTD.shape
  if chunk_tokens > 0 and chunk_length(chunk_tokens, B, T) < T:
    return chunked_cross_entropy(hidden_BTD, head_DV, targets_BT, weights_BT, chunk_tokens=chunk_tokens)
  return cross_entropy_reference(hidden_BTD, head_DV, targets_BT, weights_BT)
