"""The sharded train step of a config, built once for every caller: training, the fit check and AOT compiles.

`build(config, devices, vocab_size, total_steps)` makes the model, optimizer and schedule, the sharding
plan over a mesh of `devices` (real devices, or an abstract TPU topology's) and the jitted step;
`compile(program)` lowers it on abstract arguments (shapes, dtypes and shardings, no data) and compiles it.
`mla_jax.trainer` and `mla_jax.compile` both go through here, so they compile the same program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mla_jax import config as config_lib
from mla_jax import memory
from mla_jax import sharding as sharding_lib
from mla_jax import train_state as train_state_lib
from mla_jax.data.packing import batch_dtypes
from mla_jax.data.tokenizer import padded_vocab_size
from mla_jax.errors import ConfigError
from mla_jax.model import LanguageModel
from mla_jax.optim import make_optimizer, make_schedule
from mla_jax.train_step import make_train_step


def resolve_model_config(config: ml_collections.ConfigDict, tokenizer) -> config_lib.ModelConfig:
  """The ModelConfig for `tokenizer`: model.vocab_size, or the tokenizer's vocabulary padded to divide."""
  if config.model.vocab_size and config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(
      "model.vocab_size",
      f"{config.model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})",
    )
  return config_lib.ModelConfig.from_config(config, padded_vocab_size(tokenizer.vocab_size))


@dataclasses.dataclass
class Program:
  """The pieces of one sharded train step. `step` is jit(step)(state, batch) -> (state, metrics)."""

  config: ml_collections.ConfigDict
  model: LanguageModel
  cfg: config_lib.ModelConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  plan: train_state_lib.Plan
  step: Any
  seq_len: int

  def init_state(self, rng: jax.Array):
    """The initial TrainState, each device building only its own shards."""
    return train_state_lib.init_state(self.model, self.tx, rng, self.seq_len, self.plan.state)

  def abstract_args(self) -> tuple:
    """(state, batch) as ShapeDtypeStructs carrying the plan's shardings: what `step` is compiled for."""
    shapes = jax.eval_shape(
      lambda rng: train_state_lib.init_state(self.model, self.tx, rng, self.seq_len),
      jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    state = jax.tree_util.tree_map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding, weak_type=s.weak_type),
      shapes,
      self.plan.state,
    )
    shape = (self.plan.batch_size, self.seq_len)
    dtypes = batch_dtypes(self.config.data.get("packing", "stream"))
    return state, {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.plan.batch) for k, dtype in dtypes.items()}


def build(
  config: ml_collections.ConfigDict,
  devices: Sequence[jax.Device] | None,
  vocab_size: int,
  total_steps: int,
  mesh: Mesh | None = None,
  remat: str | None = None,
) -> Program:
  """The train step of `config` sharded over `devices` (default: all; or over `mesh` when given).

  `vocab_size` is used when model.vocab_size is 0 (see `resolve_model_config`); `total_steps` sets the
  learning-rate schedule; `remat` overrides model.remat (one of config.REMAT_POLICIES).
  """
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(config, devices)
  cfg = config_lib.ModelConfig.from_config(config, vocab_size)
  if remat is not None:
    cfg = dataclasses.replace(cfg, remat=remat)
  seq_len = config_lib.seq_len(config)
  model = LanguageModel(cfg)
  schedule = make_schedule(config.trainer, total_steps)
  tx = make_optimizer(config.trainer, total_steps)
  plan = train_state_lib.plan(config, model, tx, seq_len, mesh)
  step = make_train_step(config, model, tx, schedule, plan.state, plan.batch)
  return Program(config, model, cfg, tx, schedule, plan, step, seq_len)


def compile(program: Program) -> jax.stages.Compiled:
  """The step lowered on `program.abstract_args()` and compiled for the plan's devices."""
  return program.step.lower(*program.abstract_args()).compile()


def compile_to_fit(
  config: ml_collections.ConfigDict,
  devices: Sequence[jax.Device] | None,
  vocab_size: int,
  total_steps: int,
  capacity_bytes: int,
  mesh: Mesh | None = None,
  where: str = "the device",
):
  """Builds and compiles the step under model.remat, checked against `capacity_bytes` per device.

  With model.remat=auto the policies are compiled in REMAT_POLICIES order until one fits
  (`memory.select_remat`). Returns (program, compiled, policy, table) (table: one row per compiled policy,
  see `memory.select_remat`); raises memory.DoesNotFitError (a one-line UserError) when nothing fits.
  """
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(config, devices)
  programs = {}

  def compile_for(policy: str):
    programs[policy] = build(config, None, vocab_size, total_steps, mesh=mesh, remat=policy)
    return compile(programs[policy])

  requested = config.model.get("remat", "auto")
  policies = config_lib.REMAT_POLICIES if requested == "auto" else (requested,)
  policy, compiled, table = memory.select_remat(compile_for, capacity_bytes, where, policies)
  return programs[policy], compiled, policy, table
