"""Checkpoints: an orbax CheckpointManager holding the train state and a JSON record per step.

Each step directory holds `state` (params, optimizer state, step, RNG, non-trainable model variables)
and `meta` (data-iterator position, the resolved config and, when known, the validation loss). Orbax
writes into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a save killed half-way
never replaces the last good checkpoint; leftover temporary directories are removed on the next start.

Retention keeps the `max_to_keep` newest checkpoints and, with `keep_best`, also the one with the lowest
validation loss. `restore_latest` checks the saved shapes against the target before reading (a mismatch
is a CheckpointError naming the first differing path) and falls back past unreadable checkpoints (missing,
truncated or undecodable files), moving them to `<workdir>/checkpoints.corrupt/`; any other failure (out of
memory, an I/O error) stops with that error and moves nothing. Restores read into abstract arrays that
carry the target's shardings, so a checkpoint written on one device count loads onto another.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from mla_jax import config as config_lib
from mla_jax import pytree
from mla_jax.errors import CheckpointError, WorkdirError

_MiB = 1 << 20


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def corrupt_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints.corrupt")


def _warn(text: str) -> None:
  print(f"warning: {text}", file=sys.stderr, flush=True)


# The status codes tensorstore (and XLA) put first in a message that mean a file is missing, truncated or
# does not decode: what a restore raises after deleting, truncating or overwriting a saved checkpoint's
# files. Other codes (RESOURCE_EXHAUSTED, UNAVAILABLE, PERMISSION_DENIED, UNKNOWN...) are not corruption.
_UNREADABLE_STATUS = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION", "INVALID_ARGUMENT")
_STATUS = re.compile(r"([A-Z_]+): ")


class _Inconsistent(ValueError):
  """A checkpoint lacks a part or its records contradict each other (found by the checks here)."""


def is_unreadable(error: BaseException) -> bool:
  """Whether `error`, raised by a restore, shows that the checkpoint's files are missing, truncated, not
  decodable or inconsistent, so an older checkpoint may be used instead.

  Its cause chain must hold such an error (a missing file, invalid JSON, a tensorstore decode error) and
  nothing that may be about the machine rather than the files: MemoryError, an OSError other than a
  missing file, an out-of-memory or unavailable status. Unknown errors are not corruption either.
  """
  unreadable, seen = False, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(
      error, (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError, _Inconsistent)
    ):
      unreadable = True
    elif isinstance(error, (OSError, MemoryError)):
      return False
    else:
      status = _STATUS.match(str(error))
      if status:
        if status.group(1) not in _UNREADABLE_STATUS:
          return False
        unreadable = True
    error = error.__cause__ or error.__context__
  return unreadable


def _reason(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= 300 else text[:297] + "..."


class Checkpointer:
  """Saves and restores (state, meta) under `<workdir>/checkpoints/<step>`."""

  def __init__(
    self, workdir: str, max_to_keep: int = 3, async_save: bool = True, keep_best: bool = False, read_only: bool = False
  ):
    """`read_only` (generate, evaluate, resume checks): never writes, and leaves alone the temporary
    directories of a save that a training run may be writing into the same workdir right now."""
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    self.keep_best = keep_best
    policy = ocp_policies.LatestN(n=max_to_keep or None)
    best_fn = None
    if keep_best:  # metrics are written with each step (orbax does so when best_fn is set)
      best_fn = lambda metrics: metrics.get("val_loss", math.inf)
      policy = ocp_policies.AnyPreservationPolicy(
        [policy, ocp_policies.BestN(get_metric_fn=best_fn, reverse=True, n=1)]
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=best_fn,
      best_mode="min",
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
      save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=async_save,
    )
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    if read_only:  # orbax warns that the directory is read only: that is what was asked for
      absl_logger.setLevel(logging.ERROR)
    try:
      self.manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
      )
    except OSError as e:
      raise WorkdirError(f"cannot use checkpoint directory {self.directory}: {_reason(e)}") from e
    finally:
      absl_logger.setLevel(level)
    self._pending: int | None = None  # step of a save that may still be writing in the background

  def save(
    self, step: int, state, data_state: dict, config: ml_collections.ConfigDict, val_loss: float | None = None
  ) -> None:
    """Starts saving `step` (asynchronously when enabled); a failed save raises CheckpointError."""
    self.wait()
    meta = {"step": int(step), "data": data_state, "config": config.to_json()}
    if val_loss is not None:
      meta["val_loss"] = float(val_loss)
    metrics = None
    if self.keep_best:  # a save without a validation loss (e.g. on SIGTERM) is never the best
      metrics = {"val_loss": float(val_loss)} if val_loss is not None else {}
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
      )
    except Exception as e:  # orbax and tensorstore raise many types (OSError, ValueError, RuntimeError)
      raise self._save_error(step, e) from e
    self._pending = int(step)

  def wait(self) -> None:
    """Blocks until a background save has finished; raises CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      step, self._pending = self._pending, None
      raise self._save_error(step, e) from e
    self._pending = None

  def _save_error(self, step: int | None, error: BaseException) -> CheckpointError:
    self.manager.reload()
    good = self.latest_step()
    kept = f"the last complete checkpoint is step {good}" if good is not None else "no earlier checkpoint exists"
    hint = " (disk full)" if getattr(error, "errno", None) == errno.ENOSPC else ""
    return CheckpointError(
      f"saving checkpoint step {step} in {self.directory} failed{hint}: {_reason(error)}; {kept}, unchanged"
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> tuple[int, float] | None:
    """(step, validation loss) of the kept checkpoint with the lowest validation loss, if any has one."""
    scored = []
    for step in self.all_steps():
      metrics = self.manager.metrics(step)
      if metrics and "val_loss" in metrics:
        scored.append((float(metrics["val_loss"]), step))
    return (min(scored)[1], min(scored)[0]) if scored else None

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises CheckpointError naming the first path whose saved shape differs from `abstract_state`
    (missing or extra paths too); the parameters are compared first, since the optimizer state mirrors them."""
    saved = self._state_metadata(step)
    where = f"checkpoint {os.path.join(self.directory, str(step))} does not match the config"
    saved_params, params = _params(saved), _params(abstract_state)
    if saved_params is not None and params is not None:
      pytree.check_shapes({"params": saved_params}, {"params": params}, where, CheckpointError)
    pytree.check_shapes(saved, abstract_state, where, CheckpointError)

  def _state_metadata(self, step: int):
    metadata = self.manager.item_metadata(step)["state"]
    if metadata is None:
      raise _Inconsistent("no state metadata")
    return metadata.tree if hasattr(metadata, "tree") else metadata

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` into the structure and shardings of `abstract_state`."""
    for item in ("state", "meta"):
      if not os.path.isdir(os.path.join(self.directory, str(step), item)):
        raise _Inconsistent(f"its {item} folder is missing")
    self.check_compatible(step, abstract_state)
    restored = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    )
    meta = restored["meta"]
    if not isinstance(meta, dict) or "data" not in meta or "config" not in meta:
      raise _Inconsistent("the meta record lacks the data-iterator state or the config")
    return restored["state"], meta

  def restore_latest(self, abstract_state, warn: Callable[[str], None] = _warn):
    """(step, state, meta) of the newest readable checkpoint, or None when there is none.

    Unreadable checkpoints newer than it (`is_unreadable`: missing, truncated or undecodable files) are
    moved to `<workdir>/checkpoints.corrupt/` with a warning. A shape mismatch raises CheckpointError at
    once; any other error (out of memory, an I/O error, an interrupt) propagates and moves nothing. If
    every checkpoint is unreadable nothing is moved and a CheckpointError lists them.
    """
    bad = []
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state)
      except CheckpointError:
        raise
      except Exception as e:  # truncated or corrupt files fail in many ways
        if not is_unreadable(e):
          raise
        bad.append((step, e))
        continue
      for bad_step, error in bad:
        moved = self._move_aside(bad_step)
        warn(
          f"checkpoint {os.path.join(self.directory, str(bad_step))} is unreadable ({_reason(error)}); "
          f"moved it to {moved} and resuming from step {step}"
        )
      if bad:
        self.manager.reload()
      return step, state, meta
    if bad:
      listed = "; ".join(f"step {s}: {_reason(e)}" for s, e in bad)
      raise CheckpointError(
        f"no readable checkpoint in {self.directory} ({listed}); move that directory aside to start from scratch"
      )
    return None

  def _move_aside(self, step: int) -> str:
    dest_root = corrupt_dir(self.workdir)
    os.makedirs(dest_root, exist_ok=True)
    dest, n = os.path.join(dest_root, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
    os.rename(os.path.join(self.directory, str(step)), dest)
    return dest

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_variables(self, step: int, abstract_variables: dict) -> dict:
    """Restores only the parts of the saved state that `abstract_variables` names ({'params': ...,
    'model_state': ...}: no optimizer state) at `step`, onto its shardings. The saved shapes are checked
    first; a mismatch is a CheckpointError naming the first differing parameter."""
    where = os.path.join(self.directory, str(step))
    try:
      saved = self._state_metadata(step)
    except Exception as e:  # orbax raises many types for a damaged metadata file
      raise CheckpointError(f"{where}: unreadable checkpoint ({_reason(e)})") from e
    if not isinstance(saved, dict) or "params" not in saved:
      raise CheckpointError(f"{where}: the saved state holds no parameters")
    saved = {name: saved.get(name) or {} for name in abstract_variables}
    pytree.check_shapes(saved, abstract_variables, f"{where}: parameters do not match the config", CheckpointError)
    try:
      return ocp.PyTreeCheckpointer().restore(
        os.path.join(where, "state"),
        args=ocp.args.PyTreeRestore(
          item=abstract_variables,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_variables),
          partial_restore=True,
        ),
      )
    except Exception as e:
      raise CheckpointError(f"{where}: could not restore the parameters ({_reason(e)})") from e

  def close(self) -> None:
    """Waits for a background save (raising CheckpointError if it failed), then releases the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()


def _params(state):
  """The `params` entry of a train state or of its saved metadata (a dict), or None."""
  return state.get("params") if isinstance(state, Mapping) else getattr(state, "params", None)


def abstract(tree, shardings=None):
  """ShapeDtypeStructs describing `tree`, the target for a restore.

  Each leaf carries the sharding it should be restored onto: `shardings` (a matching tree, or one
  Sharding for every leaf) when given, else the sharding of the leaf in `tree`.
  """
  if shardings is None:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_bytes(tree) -> int:
  """Bytes of all array leaves: an estimate of one checkpoint's size on disk."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable with a probe file; raises WorkdirError otherwise."""
  workdir = os.path.abspath(workdir)
  try:
    ckpt = checkpoint_dir(workdir)
    for path in (workdir, ckpt):
      if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", path)
    os.makedirs(workdir, exist_ok=True)
    for directory in (workdir, ckpt) if os.path.isdir(ckpt) else (workdir,):
      probe = os.path.join(directory, f".write_probe.{os.getpid()}")
      with open(probe, "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
      os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not usable: {_reason(e)}") from e


def missing_root(path: str) -> str | None:
  """The outermost folder of `path` (itself included) that does not exist yet, or None."""
  path, root = os.path.abspath(path), None
  while not os.path.exists(path):
    root, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return root


def remove_empty_outputs(workdir: str, created_root: str | None = None, remove_config: bool = False) -> None:
  """After a failed start: removes an empty checkpoints/ folder and an empty metrics.jsonl, then (with
  `remove_config`: the run wrote it) config.json if neither is left, then the empty folders from the
  workdir up to `created_root` (what the run created). Nothing that holds data is touched."""
  workdir = os.path.abspath(workdir)
  outputs = (checkpoint_dir(workdir), os.path.join(workdir, "metrics.jsonl"))
  for path in outputs:
    try:
      if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)  # only succeeds when empty
      elif os.path.isfile(path) and os.path.getsize(path) == 0:
        os.remove(path)
    except OSError:
      pass
  config_json = os.path.join(workdir, "config.json")
  if remove_config and not any(os.path.lexists(path) for path in outputs) and os.path.isfile(config_json):
    os.remove(config_json)
  if created_root:
    path = workdir
    while path.startswith(created_root):
      try:
        os.rmdir(path)
      except OSError:
        return
      path = os.path.dirname(path)


def saved_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in `workdir` (orbax renames a step's folder to its number only once
  it is fully written), read from the folder names without opening any."""
  directory = checkpoint_dir(workdir)
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def saved_with_model(workdir: str, step: int, config: ml_collections.ConfigDict) -> bool:
  """Whether checkpoint `step` was saved with the same model section as `config`, and its record and state
  metadata are readable (the arrays themselves are read only by a restore)."""
  checkpointer = Checkpointer(workdir, max_to_keep=0, async_save=False, read_only=True)
  try:
    saved = json.loads(checkpointer.restore_meta(step)["config"])["model"]
    checkpointer._state_metadata(step)
    return saved == json.loads(config.to_json())["model"]
  except Exception:  # unreadable: the restore path reports or falls back
    return False
  finally:
    checkpointer.manager.close()


def check_free_space(workdir: str, checkpoint_bytes: int, keep: int) -> str | None:
  """Raises WorkdirError if one checkpoint cannot fit; returns a warning if `keep` + 1 of them may not."""
  free = shutil.disk_usage(os.path.abspath(workdir)).free
  margin = 16 * _MiB  # metrics, the loss plot and orbax metadata
  if free < checkpoint_bytes + margin:
    raise WorkdirError(
      f"workdir {os.path.abspath(workdir)} has {free / _MiB:,.1f} MiB free but one checkpoint "
      f"needs about {(checkpoint_bytes + margin) / _MiB:,.1f} MiB"
    )
  need = (keep + 1) * checkpoint_bytes + margin
  if keep and free < need:
    return (
      f"workdir {os.path.abspath(workdir)} has {free / _MiB:,.1f} MiB free; keeping {keep} checkpoints "
      f"(plus one being written) needs about {need / _MiB:,.1f} MiB"
    )
  return None


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  try:
    return config_lib.from_saved(json.loads(meta["config"]))
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"checkpoint metadata holds no readable config ({e})") from e
