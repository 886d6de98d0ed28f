"""Sharded-vs-one-device checks on 8 simulated CPU devices, run by tests/test_sharding.py in a subprocess.

  XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
      python tests/sharding_check.py OUT.json

For each (model kind, mesh preset) case in CASES it trains two steps on one device and on the 8-device mesh from
the same initial state and batches, and records the largest loss and parameter differences; under FSDP it
records each parameter's per-device shard size; for the decode caches it records the largest difference
between sharded and one-device prefill + decode logits. The test asserts on the JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import tiny_config  # noqa: E402

from mla_jax import cache as cache_lib  # noqa: E402
from mla_jax import pytree, sharding, train_state  # noqa: E402
from mla_jax.config import ModelConfig, validate  # noqa: E402
from mla_jax.model import LanguageModel, init_params  # noqa: E402
from mla_jax.optim import make_optimizer, make_schedule  # noqa: E402
from mla_jax.train_state import TrainState, initial_model_state  # noqa: E402
from mla_jax.train_step import make_train_step  # noqa: E402

VOCAB, BATCH, SEQ = 64, 8, 16
PRESETS = {
  "data": dict(data=-1),
  "fsdp": dict(data=1, fsdp=-1),
  "fsdp_tensor": dict(data=1, fsdp=-1, tensor=2),
  "expert": dict(data=-1, expert=4),
}
# Every preset once and every kind under FSDP; tensor parallelism for MoE and for Mamba2 + MLA.
CASES = [
  ("mla", "data"),
  ("mla", "fsdp"),
  ("moe", "fsdp"),
  ("moe", "fsdp_tensor"),
  ("moe", "expert"),
  ("hybrid", "fsdp"),
  ("hybrid", "fsdp_tensor"),
]


def make_config(kind: str, preset: str):
  # One MLA layer (mla, moe) or Mamba2 + MLA (hybrid): every layer type, as little to compile as possible.
  config = tiny_config(kind, num_layers=2, mamba_layers=(0,)) if kind == "hybrid" else tiny_config(kind, num_layers=1)
  if kind == "moe":
    config.model.moe_dispatch = "capacity" if preset == "expert" else "ragged"
  config.model.vocab_size = VOCAB
  config.trainer.batch_size, config.trainer.seq_len, config.trainer.warmup_steps = BATCH, SEQ, 0
  # With the vocabulary split over `tensor`, the loss runs in 4 sequence chunks (the one-device reference
  # of each kind uses the plain loss).
  config.trainer.loss_chunk_size = 32 if preset == "fsdp_tensor" else 0
  if (kind, preset) == ("hybrid", "fsdp_tensor"):  # splash attention (interpreted) per shard of batch x heads
    config.model.attention_impl = "flash"
  for axis, size in PRESETS[preset].items():
    config.mesh[axis] = size
  validate(config)
  return config


def batches(steps: int = 2):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  return out


def one_device_run(config):
  cfg = ModelConfig.from_config(config)
  model = LanguageModel(cfg)
  tx, schedule = make_optimizer(config.trainer, 10), make_schedule(config.trainer, 10)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(0))
  params, _ = init_params(cfg, init_rng, SEQ)
  state = TrainState.create(params, tx, state_rng, initial_model_state(cfg, SEQ))
  step = make_train_step(config, model, tx, schedule, donate=False)
  losses = []
  for batch in batches():
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def sharded_run(config):
  cfg = ModelConfig.from_config(config)
  model = LanguageModel(cfg)
  tx, schedule = make_optimizer(config.trainer, 10), make_schedule(config.trainer, 10)
  plan = train_state.plan(config, model, tx, SEQ)
  state = train_state.init_state(model, tx, jax.random.PRNGKey(0), SEQ, plan.state)
  shards = {}
  for name, leaf in pytree.flatten(state.params).items():
    sizes = sorted({int(np.prod(s.data.shape)) for s in leaf.addressable_shards})
    shards[name] = {"size": int(leaf.size), "ndim": leaf.ndim, "shard_sizes": sizes}
  mu = state.opt_state[1][0].mu
  mu_shards = {
    name: sorted({int(np.prod(s.data.shape)) for s in leaf.addressable_shards})
    for name, leaf in pytree.flatten(mu).items()
  }
  step = make_train_step(config, model, tx, schedule, plan.state, plan.batch)
  losses = []
  for batch in batches():
    state, metrics = step(state, plan.put(batch))
    losses.append(float(metrics["loss"]))
  return state, losses, shards, mu_shards, dict(plan.sizes)


def max_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


def decode_check(kind: str, preset: str) -> float:
  """Largest |logit| difference of prefill (8 tokens) + one decode step, sharded caches vs one device."""
  config = make_config(kind, preset)
  cfg = ModelConfig.from_config(config)
  model = LanguageModel(cfg)
  params, _ = init_params(cfg, jax.random.PRNGKey(3), SEQ)
  tokens = np.random.default_rng(1).integers(0, VOCAB, (BATCH, 9)).astype(np.int32)

  def run(params, caches, tokens):
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (BATCH, 8))
    logits_a, _, caches = model.apply({"params": params}, tokens[:, :8], positions, caches)
    logits_b, _, caches = model.apply({"params": params}, tokens[:, 8:], positions[:, -1:] + 1, caches)
    return jnp.concatenate([logits_a, logits_b], axis=1), caches

  caches = cache_lib.init_caches(cfg, BATCH, SEQ)
  expected, _ = jax.jit(run)(params, caches, tokens)

  plan = train_state.plan(config, model, make_optimizer(config.trainer, 10), SEQ)
  cache_sh = sharding.cache_shardings(caches, plan.mesh, plan.rules)

  def constrained(params, caches, tokens):
    with sharding.activation_rules(plan.mesh, plan.rules):
      return run(params, caches, tokens)

  fn = jax.jit(constrained, in_shardings=(plan.state.params, cache_sh, plan.batch), out_shardings=(None, cache_sh))
  got, new_caches = fn(jax.device_put(params, plan.state.params), jax.device_put(caches, cache_sh), tokens)
  specs = [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(new_caches)]
  one_row = sharding.cache_shardings(cache_lib.init_caches(cfg, 1, SEQ), plan.mesh, plan.rules)
  return max_diff(expected, got), specs, [str(x.spec) for x in jax.tree_util.tree_leaves(one_row)]


def main(out_path: str) -> None:
  assert jax.device_count() == 8, jax.device_count()
  results = {"cases": [], "decode": {}}
  references = {}
  for kind, preset in CASES:
    config = make_config(kind, preset)
    ref_key = (kind, config.model.moe_dispatch)
    if ref_key not in references:
      references[ref_key] = one_device_run(config)
    ref_state, ref_losses = references[ref_key]
    state, losses, shards, mu_shards, sizes = sharded_run(config)
    results["cases"].append(
      {
        "kind": kind,
        "preset": preset,
        "mesh": sizes,
        "losses": losses,
        "ref_losses": ref_losses,
        "param_diff": max_diff(ref_state.params, state.params),
        "opt_diff": max_diff(ref_state.opt_state, state.opt_state),
        "shards": shards,
        "mu_shards": mu_shards,
      }
    )
    print(kind, preset, losses, results["cases"][-1]["param_diff"], flush=True)
  for kind in ("hybrid", "gqa"):
    diff, specs, batch1_specs = decode_check(kind, "fsdp_tensor")
    results["decode"][kind] = {"diff": diff, "specs": specs, "batch1_specs": batch1_specs}
  with open(out_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv[1])
