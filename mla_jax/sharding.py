r"""Device mesh from the config, logical-axis rules, and shardings for params, state, batch and caches.

The mesh has four axes, in this order: data, fsdp, tensor, expert. Their sizes are `mesh.*` in the
config; one of them may be -1, meaning the devices left over. Every parameter and activation carries
logical axis names (`embed`, `heads`, `batch`, ...); `config.logical_axis_rules` maps them to mesh axes
(see `mla_jax.config.DEFAULT_LOGICAL_AXIS_RULES`). Presets, all from the command line:

  pure data parallel      --config.mesh.data=-1                 (the default) params replicated,
                                                                 batch split, gradients all-reduced
  FSDP (ZeRO-3)           --config.mesh.fsdp=-1 --config.mesh.data=1
                                                                 params and optimizer state split on
                                                                 `embed`, batch split, weights gathered
                                                                 per layer
  FSDP + tensor           --config.mesh.fsdp=-1 --config.mesh.data=1 --config.mesh.tensor=2
                                                                 heads / mlp / vocab / ssm heads split
                                                                 over `tensor` (Megatron style)
  expert parallel (MoE)   --config.mesh.expert=4 (data -1)      experts split over `expert`; with
                                                                 --config.model.moe_dispatch=capacity
                                                                 the [E, C, D] buffers are too

The batch is split over the mesh axes that the `batch` rule names (data, fsdp and expert by default:
outside the MoE layers the expert axis is one more data-parallel axis, as in MaxText). The optimizer
state is split like the parameters it belongs to; scalars (step counts) are replicated.

`check_config` rejects, before anything is compiled, a mesh that does not match the device count and
a batch, head count or expert count that the mesh cannot split, each as a `ConfigError` naming the keys.
`check_param_shapes` names any parameter whose dimension its mesh axes do not divide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mla_jax.config import layer_kinds
from mla_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical names of each decode-cache leaf (mla_jax.cache), by the leaf's field name.
CACHE_AXES = {
    "c_kv": ("cache_batch", "cache_sequence", "cache_kv"),  # MLA latent [B, S, C]
    "k_rope": ("cache_batch", "cache_sequence", "cache_kv"),  # MLA shared RoPE key [B, S, R]
    "k": ("cache_batch", "cache_sequence", "cache_heads", "cache_kv"),  # GQA [B, S, K, D]
    "v": ("cache_batch", "cache_sequence", "cache_heads", "cache_kv"),
    "conv": ("cache_batch", None, None),  # Mamba2 conv window [B, K-1, E]
    "ssm": ("cache_batch", "cache_heads", None, None),  # Mamba2 state [B, H, P, N]
}


# ------------------------------------------------------------------------------------------- mesh


def axis_rules(config) -> tuple:
  """config.logical_axis_rules as a tuple of (name, mesh axes) pairs (lists from JSON become tuples)."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.logical_axis_rules)


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """{axis: size} with the -1 axis resolved; ConfigError unless the product is `num_devices`."""
  sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
  free = [axis for axis in MESH_AXES if sizes[axis] == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh.{free[1]}", f"only one mesh axis may be -1, but {', '.join('mesh.' + a for a in free)} are")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      others = " x ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES if a != free[0])
      raise ConfigError(f"mesh.{free[0]}", f"is -1 (the devices left), but {num_devices} devices are not "
                        f"divisible by {others} = {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    product = " x ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES)
    raise ConfigError("mesh", f"{product} = {math.prod(sizes.values())} must equal the device count "
                      f"{num_devices} (set one axis to -1 to take the rest)")
  return sizes


def _mesh_axes_of(rules: tuple, logical: str) -> tuple[str, ...]:
  """The mesh axes the first rule for `logical` names (empty when replicated or unnamed)."""
  for name, axes in rules:
    if name == logical:
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


def _split(sizes: dict, axes: Sequence[str]) -> tuple[int, str]:
  """(product of the axes' sizes, 'mesh.a x mesh.b = n' for messages)."""
  n = math.prod(sizes.get(a, 1) for a in axes)
  return n, " x ".join(f"mesh.{a}={sizes.get(a, 1)}" for a in axes) + (f" = {n}" if len(axes) > 1 else "")


def check_config(config, num_devices: int) -> dict[str, int]:
  """Checks the mesh against `num_devices` and the shapes it must split; returns the mesh sizes.

  Rules: the mesh product is the device count; each gradient-accumulation micro-batch
  (trainer.batch_size / trainer.gradient_accumulation) divides over the batch axes; num_heads (and
  kv_heads for GQA, mamba2_num_heads for Mamba2 layers) divide over the `heads` axes; num_experts
  divides over the `expert` axes.
  """
  sizes = mesh_shape(config, num_devices)
  rules = axis_rules(config)
  m, t = config.model, config.trainer

  dp, dp_text = _split(sizes, _mesh_axes_of(rules, "batch"))
  micro = t.batch_size // max(t.gradient_accumulation, 1)
  if t.batch_size % dp:
    raise ConfigError("trainer.batch_size", f"{t.batch_size} is not divisible by the data-parallel size "
                      f"{dp_text} (the mesh axes of the 'batch' rule)")
  if micro % dp:
    raise ConfigError("trainer.gradient_accumulation",
                      f"each micro-batch of trainer.batch_size / gradient_accumulation = {t.batch_size} / "
                      f"{t.gradient_accumulation} = {micro} rows must divide over the data-parallel size {dp_text}")

  kinds = layer_kinds(m.num_layers, tuple(m.mamba_layers or ()), m.layer_pattern)
  attention, mamba = "attention" in kinds, "mamba" in kinds
  heads, heads_text = _split(sizes, _mesh_axes_of(rules, "heads"))
  if attention and m.num_heads % heads:
    raise ConfigError("model.num_heads", f"{m.num_heads} heads are not divisible by {heads_text}")
  kv_heads, kv_text = _split(sizes, _mesh_axes_of(rules, "kv_heads"))
  if attention and not m.kv_latent_dim and (m.kv_heads or m.num_heads) % kv_heads:
    raise ConfigError("model.kv_heads", f"{m.kv_heads or m.num_heads} GQA key/value heads are not divisible "
                      f"by {kv_text}")
  ssm_heads, ssm_text = _split(sizes, _mesh_axes_of(rules, "ssm_heads"))
  if mamba and m.mamba2_num_heads % ssm_heads:
    raise ConfigError("model.mamba2_num_heads", f"{m.mamba2_num_heads} Mamba2 heads are not divisible by "
                      f"{ssm_text}")
  experts, experts_text = _split(sizes, _mesh_axes_of(rules, "expert"))
  if m.num_experts and m.num_experts % experts:
    raise ConfigError("model.num_experts", f"{m.num_experts} experts are not divisible by {experts_text}")
  return sizes


def make_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The (data, fsdp, tensor, expert) mesh over `devices` (default: all), after `check_config`."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = check_config(config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: tuple):
  """Inside a traced function: makes `nn.with_logical_constraint` constrain activations on `mesh`."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


# -------------------------------------------------------------------------------------- shardings


def _named(mesh: Mesh, rules: tuple, names: Optional[Sequence]) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(tuple(names), rules) if names else P()
  return NamedSharding(mesh, spec)


def abstract_variables(model: nn.Module, seq_len: int):
  """(abstract params, their logical PartitionSpecs, abstract non-param collections); nothing is computed."""
  tokens = jax.ShapeDtypeStruct((1, min(seq_len, model.cfg.max_seq_len)), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  specs = nn.get_partition_spec(boxed)["params"]
  variables = nn.meta.unbox(boxed)
  return variables["params"], specs, {k: v for k, v in variables.items() if k != "params"}


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def check_param_shapes(abstract_params, specs, sizes: dict[str, int], rules: tuple) -> None:
  """ConfigError naming the parameter, dimension and mesh key when a mesh split does not divide a dim."""
  is_spec = lambda x: isinstance(x, P)
  flat_specs = dict((_path(p), s) for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    name = _path(path)
    logical = tuple(flat_specs[name])
    mesh_spec = nn.logical_to_mesh_axes(logical, rules)
    for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(mesh_spec) + (None,) * leaf.ndim)):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      n, text = _split(sizes, axes)
      if size % n:
        raise ConfigError(f"mesh.{axes[-1]}", f"parameter {name} {tuple(leaf.shape)}: dimension {dim} "
                          f"('{logical[dim]}', size {size}) is not divisible by {text}")


def param_shardings(specs, mesh: Mesh, rules: tuple):
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, params_sharding, mesh: Mesh):
  """Each optimizer-state leaf that mirrors a parameter gets that parameter's sharding; the rest are replicated."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state, params_sharding,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, rules: tuple) -> NamedSharding:
  """Rows over the `batch` rule's mesh axes, the rest replicated (applies to every [B, ...] leaf)."""
  return NamedSharding(mesh, P(_mesh_axes_of(rules, "batch") or None))


def cache_shardings(caches, mesh: Mesh, rules: tuple):
  """Shardings for a list of decode caches (mla_jax.cache): batch over the `cache_batch` axes, GQA and
  Mamba2 heads over `cache_heads`. A dimension that its axes do not divide (batch-1 decoding on many
  devices) stays replicated."""
  sizes = dict(mesh.shape)

  def one(path, leaf):
    names = CACHE_AXES[str(getattr(path[-1], "name", getattr(path[-1], "key", path[-1])))]
    spec = nn.logical_to_mesh_axes(names, rules)
    fitted = []
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim):
      split = 1 if axes is None else _split(sizes, (axes,) if isinstance(axes, str) else axes)[0]
      fitted.append(axes if size % split == 0 else None)
    return NamedSharding(mesh, P(*fitted))

  return jax.tree_util.tree_map_with_path(one, caches)


# ---------------------------------------------------------------------------------- train state


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
    return process_rows(self.batch, self.batch_size)

  def put(self, local_batch: dict) -> dict:
    """This process's rows of a batch -> global arrays laid out by `self.batch`."""
    return global_batch(local_batch, self.batch, self.batch_size)

  def put_full(self, batch: dict) -> dict:
    """A whole batch, identical on every process (e.g. evaluation) -> global arrays."""
    index, count = self.data_shard
    rows = self.batch_size // count
    return self.put({k: np.asarray(v)[index * rows:(index + 1) * rows] for k, v in batch.items()})

  def describe(self) -> str:
    shape = ", ".join(f"{a} {self.sizes[a]}" for a in MESH_AXES)
    return (f"Mesh: {shape} over {self.mesh.size} {self.mesh.devices.flat[0].platform} device(s) in "
            f"{jax.process_count()} process(es); batch rows split {self.batch.spec}")


def data_shard(config, mesh: Mesh) -> tuple[int, int]:
  """(process_index, process_count) for BatchIterator: which block of every batch's rows this process loads."""
  return process_rows(batch_sharding(mesh, axis_rules(config)), config.trainer.batch_size)


def plan(config, model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
         mesh: Optional[Mesh] = None) -> Plan:
  """Checks the config against the mesh (default: `make_mesh(config)`) and derives every sharding of the
  train state and batch."""
  from mla_jax.train_step import TrainState  # pylint: disable=g-import-not-at-top
  mesh = mesh if mesh is not None else make_mesh(config)
  rules = axis_rules(config)
  sizes = dict(mesh.shape)
  abstract_params, specs, abstract_rest = abstract_variables(model, seq_len)
  check_param_shapes(abstract_params, specs, sizes, rules)
  params = param_shardings(specs, mesh, rules)
  replicated = NamedSharding(mesh, P())
  state = TrainState(step=replicated, params=params,
                     opt_state=opt_state_shardings(tx, abstract_params, params, mesh),
                     model_state=jax.tree_util.tree_map(lambda _: replicated, abstract_rest),
                     rng=replicated, skipped=replicated)
  batch = batch_sharding(mesh, rules)
  return Plan(mesh, rules, sizes, state, batch, config.trainer.batch_size)


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, seq_len: int,
               state_sharding=None):
  """TrainState.create under jit with `state_sharding` as out_shardings: every device initialises only its
  own shards, so a model larger than one device never exists in one piece. Same values as
  `model.init_params` + `TrainState.create` with (init_rng, state_rng) = split(rng)."""
  from mla_jax.train_step import TrainState  # pylint: disable=g-import-not-at-top
  tokens = jnp.zeros((1, min(seq_len, model.cfg.max_seq_len)), jnp.int32)

  def create(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, tokens)
    params = nn.meta.unbox(variables["params"])
    rest = {k: jax.tree_util.tree_map(jnp.zeros_like, v) for k, v in variables.items() if k != "params"}
    return TrainState.create(params, tx, state_rng, rest)

  return jax.jit(create, out_shardings=state_sharding)(rng)


# ------------------------------------------------------------------------------------------ batches


def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """(index, count): this process holds rows [index * n, (index + 1) * n) of the global batch, n =
  global_batch / count. Processes that share rows (a replicated axis across hosts) get the same index."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  start, stop = min(rows), max(rows) + 1
  n = stop - start
  if len(rows) != n or global_batch % n or start % n:
    raise ValueError(f"process {jax.process_index()} holds batch rows {sorted(rows)}, not one aligned block; "
                     "order the mesh so each process's devices are contiguous along the batch axes")
  return start // n, global_batch // n


def global_batch(batch: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
  """This process's rows (from BatchIterator(process_index=index, process_count=count)) -> global arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (global_batch_size,) + np.shape(v)[1:])
          for k, v in batch.items()}

