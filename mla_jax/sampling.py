"""Token sampling (greedy, temperature, top-k, top-p) and a cache-free sampler for short samples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(
  logits_BV: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
  """Draws one token per row. temperature 0 (or top_k 1) is greedy argmax."""
  if temperature <= 0.0 or top_k == 1:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    cutoff_idx_B = jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < top_p, axis=-1) - 1
    cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx_B[:, None], axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def sample_without_cache(
  model, variables, prompt_ids, max_new_tokens: int, rng: jax.Array, temperature: float, top_k: int, max_len: int
) -> list[int]:
  """Re-runs the full forward pass on a fixed-size buffer per token: one compilation, no cache.

  Used for the short sample at the end of training; `mla_jax.decode` decodes with caches.
  """
  prompt = list(int(t) for t in prompt_ids)[-max_len + 1 :] or [0]
  length = min(max_len, len(prompt) + max_new_tokens)
  buf = np.zeros((1, length), np.int32)
  buf[0, : len(prompt)] = prompt

  # The variables are an argument, not a closure: sharded over several processes they cannot be constants.
  @jax.jit
  def next_token(variables, tokens, pos, key):
    logits, _, _ = model.apply(variables, tokens)
    return sample_logits(logits[:, pos], key, temperature, top_k)

  out = []
  for pos in range(len(prompt) - 1, length - 1):
    rng, key = jax.random.split(rng)
    token = int(next_token(variables, buf, pos, key)[0])
    buf[0, pos + 1] = token
    out.append(token)
  return out
