"""The optax chain from config: clip by global norm -> AdamW with warmup + cosine to a floor."""

from __future__ import annotations

import jax
import optax


def make_schedule(tcfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
  warmup = min(tcfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=tcfg.learning_rate * tcfg.min_lr_ratio)


def decay_mask(tcfg, params):
  """True where weight decay applies: matrices, and norms / embeddings only when the config says so."""

  def decays(path, leaf) -> bool:
    names = [str(getattr(k, "key", k)) for k in path]
    if "embedding" in names:
      return tcfg.decay_embeddings
    if names[-1] == "scale":
      return tcfg.decay_norms
    return leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tcfg, total_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(tcfg, total_steps)
  parts = []
  if tcfg.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(tcfg.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=tcfg.beta1, b2=tcfg.beta2, eps=tcfg.eps,
                           weight_decay=tcfg.weight_decay, mask=lambda p: decay_mask(tcfg, p)))
  return optax.chain(*parts)
