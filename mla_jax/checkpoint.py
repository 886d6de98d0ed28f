"""Checkpoints: an orbax CheckpointManager holding the train state and a JSON record per step.

Each step directory holds `state` (params, optimizer state, step, RNG, non-trainable model variables)
and `meta` (data-iterator position and the resolved config). Orbax writes into a temporary directory
and renames it when complete, so a save killed half-way never replaces the last good checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from mla_jax.errors import CheckpointError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict,
           extra: Optional[dict] = None) -> None:
    meta = {"step": int(step), "data": data_state, "config": config.to_json(), **(extra or {})}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` into the structure/shardings of `abstract_state`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract(tree):
  """ShapeDtypeStructs (with shardings) describing `tree`, the target for a restore."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  try:
    return ml_collections.ConfigDict(json.loads(meta["config"]))
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"checkpoint metadata holds no readable config ({e})") from e
