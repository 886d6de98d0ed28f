r"""Device mesh from the config, logical-axis rules, shardings for params, optimizer state, batch and caches,
and each process's rows of a batch. The train state's layout built from these is `mla_jax.train_state.plan`.

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
import math
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mla_jax import cache as cache_lib
from mla_jax import pytree
from mla_jax.config import mla_enabled, model_layer_kinds
from mla_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")


# ------------------------------------------------------------------------------------------- mesh


def axis_rules(config) -> tuple:
  """config.logical_axis_rules as a tuple of (name, mesh axes) pairs (lists from JSON become tuples)."""
  return tuple(
    (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in config.logical_axis_rules
  )


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """{axis: size} with the -1 axis resolved; ConfigError unless the product is `num_devices`."""
  sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
  free = [axis for axis in MESH_AXES if sizes[axis] == -1]
  if len(free) > 1:
    raise ConfigError(
      f"mesh.{free[1]}", f"only one mesh axis may be -1, but {', '.join('mesh.' + a for a in free)} are"
    )
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      others = " x ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES if a != free[0])
      raise ConfigError(
        f"mesh.{free[0]}",
        f"is -1 (the devices left), but {num_devices} devices are not divisible by {others} = {fixed}",
      )
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    product = " x ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES)
    raise ConfigError(
      "mesh",
      f"{product} = {math.prod(sizes.values())} must equal the device count "
      f"{num_devices} (set one axis to -1 to take the rest)",
    )
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
    raise ConfigError(
      "trainer.batch_size",
      f"{t.batch_size} is not divisible by the data-parallel size {dp_text} (the mesh axes of the 'batch' rule)",
    )
  if micro % dp:
    raise ConfigError(
      "trainer.gradient_accumulation",
      f"each micro-batch of trainer.batch_size / gradient_accumulation = {t.batch_size} / "
      f"{t.gradient_accumulation} = {micro} rows must divide over the data-parallel size {dp_text}",
    )

  kinds = model_layer_kinds(m)
  attention, mamba = "attention" in kinds, "mamba" in kinds
  heads, heads_text = _split(sizes, _mesh_axes_of(rules, "heads"))
  if attention and m.num_heads % heads:
    raise ConfigError("model.num_heads", f"{m.num_heads} heads are not divisible by {heads_text}")
  kv_heads, kv_text = _split(sizes, _mesh_axes_of(rules, "kv_heads"))
  if attention and not mla_enabled(m) and (m.kv_heads or m.num_heads) % kv_heads:
    raise ConfigError(
      "model.kv_heads", f"{m.kv_heads or m.num_heads} GQA key/value heads are not divisible by {kv_text}"
    )
  ssm_heads, ssm_text = _split(sizes, _mesh_axes_of(rules, "ssm_heads"))
  if mamba and m.mamba2_num_heads % ssm_heads:
    raise ConfigError("model.mamba2_num_heads", f"{m.mamba2_num_heads} Mamba2 heads are not divisible by {ssm_text}")
  experts, experts_text = _split(sizes, _mesh_axes_of(rules, "expert"))
  if m.num_experts and m.num_experts % experts:
    raise ConfigError("model.num_experts", f"{m.num_experts} experts are not divisible by {experts_text}")
  return sizes


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
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


def check_param_shapes(abstract_params, specs, sizes: dict[str, int], rules: tuple) -> None:
  """ConfigError naming the parameter, dimension and mesh key when a mesh split does not divide a dim."""
  flat_specs = pytree.flatten(specs, is_leaf=lambda x: isinstance(x, P))
  for name, leaf in pytree.flatten(abstract_params).items():
    logical = tuple(flat_specs[name])
    mesh_spec = nn.logical_to_mesh_axes(logical, rules)
    for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(mesh_spec) + (None,) * leaf.ndim)):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      n, text = _split(sizes, axes)
      if size % n:
        raise ConfigError(
          f"mesh.{axes[-1]}",
          f"parameter {name} {tuple(leaf.shape)}: dimension {dim} "
          f"('{logical[dim]}', size {size}) is not divisible by {text}",
        )


def param_shardings(specs, mesh: Mesh, rules: tuple):
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, params_sharding, mesh: Mesh):
  """Each optimizer-state leaf that mirrors a parameter gets that parameter's sharding; the rest are replicated."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    abstract_state,
    params_sharding,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )


def batch_sharding(mesh: Mesh, rules: tuple) -> NamedSharding:
  """Rows over the `batch` rule's mesh axes, the rest replicated (applies to every [B, ...] leaf)."""
  return NamedSharding(mesh, P(_mesh_axes_of(rules, "batch") or None))


def cache_shardings(caches, mesh: Mesh, rules: tuple):
  """Shardings for a list of decode caches (mla_jax.cache) by each cache's logical axes (`AXES`): batch
  over the `cache_batch` axes, GQA and Mamba2 heads over `cache_heads`. A dimension that its axes do not
  divide (batch-1 decoding on many devices) stays replicated."""
  sizes = dict(mesh.shape)

  def one(leaf, names):
    spec = nn.logical_to_mesh_axes(names, rules)
    fitted = []
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim):
      split = 1 if axes is None else _split(sizes, (axes,) if isinstance(axes, str) else axes)[0]
      fitted.append(axes if size % split == 0 else None)
    return NamedSharding(mesh, P(*fitted))

  return jax.tree.map(one, caches, cache_lib.logical_axes(caches))


# ------------------------------------------------------------------------------------------ batches


def data_shard(config, mesh: Mesh) -> tuple[int, int]:
  """(process_index, process_count) for BatchIterator: which block of every batch's rows this process loads."""
  return process_rows(batch_sharding(mesh, axis_rules(config)), config.trainer.batch_size)


def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """(index, count): this process holds rows [index * n, (index + 1) * n) of the global batch, n =
  global_batch / count. Processes that share rows (a replicated axis across hosts) get the same index."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  start, stop = min(rows), max(rows) + 1
  n = stop - start
  if len(rows) != n or global_batch % n or start % n:
    raise ValueError(
      f"process {jax.process_index()} holds batch rows {sorted(rows)}, not one aligned block; "
      "order the mesh so each process's devices are contiguous along the batch axes"
    )
  return start // n, global_batch // n


def global_batch(batch: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
  """This process's rows (from BatchIterator(process_index=index, process_count=count)) -> global arrays."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_batch_size,) + np.shape(v)[1:])
    for k, v in batch.items()
  }
