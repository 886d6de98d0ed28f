"""The train state: what one training step reads and writes, how it is laid out over a mesh, and how it starts.

`TrainState` holds params, optimizer state, step, RNG, non-trainable model variables and the count of
skipped updates. `plan` derives the sharding of every state leaf and of the batch from the config's mesh
and logical-axis rules (mla_jax.sharding); `init_state` builds the state under jit with those shardings,
so each device initialises only its own shards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mla_jax import sharding as sharding_lib
from mla_jax.config import ModelConfig
from mla_jax.model import abstract_variables


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-trainable model variables (e.g. the MoE aux-free bias); {} when none
  rng: jax.Array
  skipped: jax.Array  # consecutive non-finite updates skipped so far

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array, model_state=None) -> TrainState:
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      model_state=model_state or {},
      rng=rng,
      skipped=jnp.zeros((), jnp.int32),
    )


def initial_model_state(cfg: ModelConfig, seq_len: int = 8) -> dict:
  """Non-trainable model variables (collections other than params, e.g. the MoE aux-free bias), zeroed."""
  _, _, rest = abstract_variables(cfg, seq_len)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), rest)


@dataclasses.dataclass
class Plan:
  """Everything the training loop needs to run sharded."""

  mesh: Mesh
  rules: tuple
  sizes: dict[str, int]
  state: Any  # a TrainState whose leaves are NamedShardings
  batch: NamedSharding
  batch_size: int  # global rows per step

  @property
  def data_shard(self) -> tuple[int, int]:
    """(index, count) of this process's block of batch rows; asked only when data is laid out, so a plan
    over an abstract multi-host TPU topology (compiled ahead of time) needs no row split."""
    return sharding_lib.process_rows(self.batch, self.batch_size)

  def put(self, local_batch: dict) -> dict:
    """This process's rows of a batch -> global arrays laid out by `self.batch`."""
    return sharding_lib.global_batch(local_batch, self.batch, self.batch_size)

  def put_full(self, batch: dict) -> dict:
    """A whole batch, identical on every process (e.g. evaluation) -> global arrays."""
    index, count = self.data_shard
    rows = self.batch_size // count
    return self.put({k: np.asarray(v)[index * rows : (index + 1) * rows] for k, v in batch.items()})

  def describe(self) -> str:
    shape = ", ".join(f"{a} {self.sizes[a]}" for a in sharding_lib.MESH_AXES)
    return (
      f"Mesh: {shape} over {self.mesh.size} {self.mesh.devices.flat[0].platform} device(s) in "
      f"{jax.process_count()} process(es); batch rows split {self.batch.spec}"
    )


def plan(config, model: nn.Module, tx: optax.GradientTransformation, seq_len: int, mesh: Mesh | None = None) -> Plan:
  """Checks the config against the mesh (default: `sharding.make_mesh(config)`) and derives every sharding
  of the train state and batch."""
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(config)
  rules = sharding_lib.axis_rules(config)
  sizes = dict(mesh.shape)
  abstract_params, specs, abstract_rest = abstract_variables(model.cfg, seq_len)
  sharding_lib.check_param_shapes(abstract_params, specs, sizes, rules)
  params = sharding_lib.param_shardings(specs, mesh, rules)
  replicated = NamedSharding(mesh, P())
  state = TrainState(
    step=replicated,
    params=params,
    opt_state=sharding_lib.opt_state_shardings(tx, abstract_params, params, mesh),
    model_state=jax.tree_util.tree_map(lambda _: replicated, abstract_rest),
    rng=replicated,
    skipped=replicated,
  )
  batch = sharding_lib.batch_sharding(mesh, rules)
  return Plan(mesh, rules, sizes, state, batch, config.trainer.batch_size)


def init_state(
  model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, seq_len: int, state_sharding=None
) -> TrainState:
  """TrainState.create under jit with `state_sharding` as out_shardings: every device initialises only its
  own shards, so a model larger than one device never exists in one piece. Same values as
  `model.init_params` + `TrainState.create` with (init_rng, state_rng) = split(rng)."""
  tokens = jnp.zeros((1, min(seq_len, model.cfg.max_seq_len)), jnp.int32)

  def create(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, tokens)
    params = nn.meta.unbox(variables["params"])
    rest = {k: jax.tree_util.tree_map(jnp.zeros_like, v) for k, v in variables.items() if k != "params"}
    return TrainState.create(params, tx, state_rng, rest)

  return jax.jit(create, out_shardings=state_sharding)(rng)
