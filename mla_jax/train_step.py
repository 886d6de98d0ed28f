"""The train-step factory: make_train_step(config, model, tx) -> jitted step(state, batch) -> (state, metrics).

The loss is mean cross-entropy over real tokens (optional logit z-loss) plus the MoE load-balance and
router z-losses. With `trainer.loss_chunk_size` > 0 the cross-entropy is computed from the final hidden
states in sequence chunks, recomputed in backward (mla_jax.ops.cross_entropy), so no [B, T, V] float32
logits are kept. Gradient accumulation is real: micro-batch gradients are summed inside one step and one
optimizer update is applied. A non-finite loss or gradient skips the update and is counted.
`make_eval_step` and `evaluation_totals` give the summed validation loss of the same model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mla_jax.layers.moe import update_aux_free_bias
from mla_jax.model import lm_head_weight
from mla_jax.ops import cross_entropy as ce_ops
from mla_jax.sharding import activation_rules, axis_rules
from mla_jax.train_state import TrainState
from mla_jax.xla_options import compiler_options, mesh_platform


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array | None = None):
  """(sum of token losses, sum of weights, sum of logsumexp^2) in float32."""
  return ce_ops.cross_entropy(logits_BTV, targets_BT, weights_BT)


def model_cross_entropy(model, params, model_state, batch, chunk_tokens: int):
  """Runs the model on batch["inputs"] (with its "positions" and "segment_ids" when documents are packed):
  ((nll sum, weight sum, lse^2 sum), MoE aux). With chunk_tokens > 0 the LM head is applied chunk by chunk
  to the final hidden states (mla_jax.ops.cross_entropy)."""
  variables = {"params": params, **model_state}
  packed = dict(positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"))
  if chunk_tokens <= 0:
    logits, aux, _ = model.apply(variables, batch["inputs"], **packed)
    return cross_entropy(logits, batch["targets"], batch.get("weights")), aux
  hidden, aux, _ = model.apply(variables, batch["inputs"], return_hidden=True, **packed)
  sums = ce_ops.lm_cross_entropy(
    hidden, lm_head_weight(model.cfg, params), batch["targets"], batch.get("weights"), chunk_tokens
  )
  return sums, aux


def make_loss_fn(config, model):
  t = config.trainer

  def loss_fn(params, model_state, batch):
    (nll, count, z), aux = model_cross_entropy(model, params, model_state, batch, t.loss_chunk_size)
    ce = nll / jnp.maximum(count, 1.0)
    loss = ce + t.z_loss_alpha * z / jnp.maximum(count, 1.0)
    metrics = {"ce": ce}
    if aux:
      loss = loss + t.load_balance_alpha * aux["load_balance"] + t.router_z_loss_alpha * aux["router_z"]
      metrics.update(aux)
    return loss, metrics

  return loss_fn


def _accumulated_grads(loss_fn, params, model_state, batch, steps: int):
  """Mean loss and gradients over `steps` equal micro-batches (summed, then divided once)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    (loss, metrics), grads = grad_fn(params, model_state, batch)
    return loss, metrics, grads
  # Micro-batch i takes rows i, i + steps, ...: each device's block of a row-sharded batch holds an equal
  # part of every micro-batch, so no micro-batch has to move between devices.
  micro = jax.tree_util.tree_map(lambda x: x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1), batch)

  def body(carry, mb):
    loss_sum, grad_sum = carry
    (loss, metrics), grads = grad_fn(params, model_state, mb)
    return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), metrics

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  (loss_sum, grad_sum), metrics = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
  metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)
  return loss_sum / steps, metrics, jax.tree_util.tree_map(lambda g: g / steps, grad_sum)


def make_train_step(
  config,
  model,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  state_sharding=None,
  batch_sharding=None,
  donate: bool = True,
):
  """Returns jit(step)(state, batch) -> (state, metrics) with the state donated.

  A non-finite step keeps params, model state and the AdamW moments (and their bias-correction count)
  but still advances the learning-rate schedule's count with `state.step`: the skipped step consumed its
  batch, so the schedule stays a function of the step (the data position) and a resumed run, whose data
  position is the step, continues both in agreement. `learning_rate` in the metrics is the rate this step
  applied, read from the schedule's count in the optimizer state.

  With shardings (mla_jax.train_state.plan) the step is traced under the batch sharding's mesh and
  `config.logical_axis_rules`, so the model's activation constraints take effect.
  """
  loss_fn = make_loss_fn(config, model)
  accum = config.trainer.gradient_accumulation

  def step(state: TrainState, batch):
    if batch_sharding is None:
      return _step(state, batch)
    with activation_rules(batch_sharding.mesh, axis_rules(config)):
      return _step(state, batch)

  def _step(state: TrainState, batch):
    loss, metrics, grads = _accumulated_grads(loss_fn, state.params, state.model_state, batch, accum)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_model_state = update_model_state(config, state.model_state, metrics)
    new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=with_schedule_count(keep(new_opt_state, state.opt_state), new_opt_state),
      model_state=keep(new_model_state, state.model_state),
      skipped=jnp.where(finite, 0, state.skipped + 1),
    )
    metrics = dict(
      metrics,
      loss=loss,
      grad_norm=grad_norm,
      learning_rate=schedule(schedule_count(state.opt_state, state.step)),
      skipped=(~finite).astype(jnp.int32),
    )
    return new_state, metrics

  shardings = {}
  if state_sharding is not None:
    # Metrics come back replicated, so every process can read them.
    metrics_sharding = None if batch_sharding is None else _replicated(batch_sharding)
    shardings = dict(in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, metrics_sharding))
  options = compiler_options(model.cfg, "sequence", _platform(batch_sharding))
  return jax.jit(step, donate_argnums=(0,) if donate else (), compiler_options=options, **shardings)


def _platform(sharding) -> str | None:
  """The platform a sharding places on; None without one (JAX's default backend)."""
  return None if sharding is None else mesh_platform(sharding.mesh)


def _is_schedule_count(path, _) -> bool:
  return bool(path) and getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"


def schedule_count(opt_state, default):
  """The learning-rate schedule's step count in an optax state (`default` when it has none)."""
  found = optax.tree_utils.tree_get_all_with_path(opt_state, "count", _is_schedule_count)
  return found[0][1] if found else default


def with_schedule_count(opt_state, source):
  """`opt_state` with the learning-rate schedule's count taken from `source` (the same structure)."""
  found = optax.tree_utils.tree_get_all_with_path(source, "count", _is_schedule_count)
  return optax.tree_utils.tree_set(opt_state, _is_schedule_count, count=found[0][1]) if found else opt_state


def update_model_state(config, model_state, metrics):
  """Updates non-trainable model variables outside the optimizer (the MoE aux-free bias)."""
  if not model_state or "moe_bias" not in model_state:
    return model_state
  rate = config.model.aux_free_bias_rate
  names = sorted(model_state["moe_bias"], key=lambda n: int(n.split("_")[-1]))
  loads = metrics["load"]  # [moe_layers, E], in layer order
  new = {
    name: {"moe": {"bias": update_aux_free_bias(model_state["moe_bias"][name]["moe"]["bias"], loads[i], rate)}}
    for i, name in enumerate(names)
  }
  return dict(model_state, moe_bias=new)


def make_eval_step(model, state_sharding=None, batch_sharding=None, rules=None, loss_chunk_size: int = 0):
  """jit(eval)(params, model_state, batch) -> (sum of token losses, token count).

  With shardings the inputs are laid out as in training and, given `rules`, activations constrained.
  `loss_chunk_size` is trainer.loss_chunk_size (the loss in chunks, equal to the plain one)."""

  def eval_step(params, model_state, batch):
    (nll, count, _), _ = model_cross_entropy(model, params, model_state, batch, loss_chunk_size)
    return nll, count

  options = compiler_options(model.cfg, "sequence", _platform(batch_sharding))
  if state_sharding is None:
    return jax.jit(eval_step, compiler_options=options)

  def sharded_eval_step(params, model_state, batch):
    if rules is None:
      return eval_step(params, model_state, batch)
    with activation_rules(batch_sharding.mesh, rules):
      return eval_step(params, model_state, batch)

  return jax.jit(
    sharded_eval_step,
    in_shardings=(state_sharding.params, state_sharding.model_state, batch_sharding),
    out_shardings=_replicated(batch_sharding),
    compiler_options=options,
  )


def evaluation_totals(eval_step, params, model_state, batches) -> tuple[float, float]:
  """(sum of token losses in nats, number of target tokens) of `make_eval_step`'s step over `batches`."""
  nll, count = 0.0, 0.0
  for batch in batches:
    b_nll, b_count = eval_step(params, model_state, batch)
    nll += float(b_nll)
    count += float(b_count)
  return nll, count


def _replicated(sharding):
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
