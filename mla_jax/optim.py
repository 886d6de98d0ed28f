"""The optax chain from config: clip by global norm -> AdamW with warmup + cosine to a floor."""

from __future__ import annotations

import jax
import optax

from mla_jax.layers.common import param_role


def make_schedule(tcfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
  warmup = min(tcfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=tcfg.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=tcfg.learning_rate * tcfg.min_lr_ratio,
  )


def decay_mask(tcfg, params):
  """True where weight decay applies, by the parameter's role (`layers.common.param_role`), not its rank:
  matrices always (conv kernels too, as in mamba_ssm); norm scales only with decay_norms, the embedding only
  with decay_embeddings; biases and Mamba2's A_log, D and dt_bias never."""
  decays = {"matrix": True, "norm": tcfg.decay_norms, "embedding": tcfg.decay_embeddings, "vector": False}
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(decays[param_role(path)]), params)


def make_optimizer(tcfg, total_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(tcfg, total_steps)
  parts = []
  if tcfg.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(tcfg.max_grad_norm))
  parts.append(
    optax.adamw(
      schedule,
      b1=tcfg.beta1,
      b2=tcfg.beta2,
      eps=tcfg.eps,
      weight_decay=tcfg.weight_decay,
      mask=lambda p: decay_mask(tcfg, p),
    )
  )
  return optax.chain(*parts)
