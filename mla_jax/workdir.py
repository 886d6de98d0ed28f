"""A run's workdir as inference reads it and conversion writes it.

`load(workdir)` reads the newest checkpoint's parameters and non-trainable model state (no optimizer
state) into targets from `jax.eval_shape`, with the config stored beside them (or a given one, whose model
must match) and the config's tokenizer. `write(config, params, workdir)` makes the step-0 checkpoint of
converted parameters (with a fresh optimizer state) that generation, evaluation and training load;
`write_from_hf` and `write_from_seed` convert a Hugging Face folder or a seed-trainer checkpoint into one.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mla_jax import checkpoint as ckpt_lib
from mla_jax import cli
from mla_jax import config as config_lib
from mla_jax.data import load_tokenizer
from mla_jax.errors import CheckpointError, UserError
from mla_jax.hf import from_hf
from mla_jax.model import abstract_variables
from mla_jax.optim import make_optimizer
from mla_jax.seed_checkpoint import from_seed
from mla_jax.train_program import resolve_model_config
from mla_jax.train_state import TrainState


class Loaded(NamedTuple):
  """What `load` returns; unpacks as (config, cfg, variables, tokenizer, step)."""

  config: ml_collections.ConfigDict
  cfg: config_lib.ModelConfig
  variables: dict  # {"params": ..., other model collections}
  tokenizer: Any
  step: int


def _open(workdir: str) -> tuple[ckpt_lib.Checkpointer, int]:
  """A read-only Checkpointer of `workdir` and its newest complete step, or a CheckpointError."""
  if not workdir or not os.path.isdir(workdir):
    raise CheckpointError(f"{workdir}: workdir does not exist")
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{workdir}: no checkpoints (expected {directory}/<step>)")
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False, read_only=True)
  step = checkpointer.latest_step()
  if step is None:
    checkpointer.close()
    raise CheckpointError(f"{directory}: no complete checkpoint")
  return checkpointer, step


def _config_at(checkpointer: ckpt_lib.Checkpointer, step: int) -> ml_collections.ConfigDict:
  try:
    meta = checkpointer.restore_meta(step)
  except Exception as e:  # orbax raises many types for a damaged metadata file
    where = os.path.join(checkpointer.directory, str(step))
    raise CheckpointError(f"{where}: unreadable checkpoint metadata ({cli.one_line(e)})") from e
  return ckpt_lib.config_from_meta(meta)


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored with the newest checkpoint of `workdir` (a trained or converted run), so that
  training can continue it (`configs/workdir.py`)."""
  checkpointer, step = _open(workdir)
  try:
    return _config_at(checkpointer, step)
  finally:
    checkpointer.close()


def load(workdir: str, config: ml_collections.ConfigDict | None = None) -> Loaded:
  """The latest checkpoint in `workdir`: only its parameters and non-trainable model state are read."""
  checkpointer, step = _open(workdir)
  try:
    if config is None:
      config = _config_at(checkpointer, step)
    config_lib.validate(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    cfg = resolve_model_config(config, tokenizer)
    params, _, model_state = abstract_variables(cfg)
    target = ckpt_lib.abstract(
      {"params": params, "model_state": model_state}, jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )
    restored = checkpointer.restore_variables(step, target)
  finally:
    checkpointer.close()
  variables = {"params": restored["params"], **(restored.get("model_state") or {})}
  return Loaded(config, cfg, variables, tokenizer, step)


def write(config: ml_collections.ConfigDict, params, workdir: str, tokenizer_json: str | None = None) -> None:
  """A step-0 checkpoint (params, fresh optimizer state, the config) in a new or empty `workdir`.

  A `tokenizer_json` is copied into the workdir and becomes the config's tokenizer."""
  tokenizer = load_tokenizer(tokenizer_json or config.data.tokenizer)
  if config.model.vocab_size < tokenizer.vocab_size:
    raise UserError(
      f"the model's vocabulary ({config.model.vocab_size}) is smaller than the tokenizer's "
      f"({tokenizer.vocab_size}); put the model's tokenizer.json beside its weights"
    )
  ckpt_lib.prepare_workdir(workdir)
  if os.path.isdir(ckpt_lib.checkpoint_dir(workdir)) and os.listdir(ckpt_lib.checkpoint_dir(workdir)):
    raise UserError(f"{workdir}: already holds checkpoints; choose an empty workdir")
  if tokenizer_json:
    dest = os.path.join(os.path.abspath(workdir), "tokenizer.json")
    shutil.copyfile(tokenizer_json, dest)
    config.data.tokenizer = dest
  config_lib.validate(config)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = make_optimizer(config.trainer, config.trainer.max_steps)
  state = TrainState.create(params, tx, jax.random.PRNGKey(config.trainer.seed))
  data_state = {
    "step": 0,
    "seed": config.trainer.seed,
    "batch_size": config.trainer.batch_size,
    "seq_len": config_lib.seq_len(config),
  }
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    checkpointer.save(0, state, data_state, config)
  finally:
    checkpointer.close()


def write_from_hf(hf_path: str, workdir: str, stream=sys.stdout) -> None:
  """Converts a Hugging Face folder (`mla_jax.hf.from_hf`) into a step-0 workdir, with its tokenizer.json."""
  config, params = from_hf(hf_path)
  tokenizer_json = os.path.join(hf_path, "tokenizer.json")
  _write_and_report(
    config, params, workdir, hf_path, tokenizer_json if os.path.isfile(tokenizer_json) else None, stream
  )


def write_from_seed(
  checkpoint: str, yaml_path: str, workdir: str, tokenizer_json: str | None = None, stream=sys.stdout
) -> None:
  """Converts a seed-trainer checkpoint (`mla_jax.seed_checkpoint.from_seed`) into a step-0 workdir."""
  config, params = from_seed(checkpoint, yaml_path)
  if tokenizer_json is None:
    stream.write(
      f"note: the workdir uses the byte tokenizer; give --tokenizer=tokenizer.json if the seed run used "
      f"another (its vocabulary has {config.model.vocab_size} entries)\n"
    )
  _write_and_report(config, params, workdir, checkpoint, tokenizer_json, stream)


def _write_and_report(config, params, workdir: str, source: str, tokenizer_json: str | None, stream) -> None:
  write(config, params, workdir, tokenizer_json)
  cfg = config_lib.ModelConfig.from_config(config)
  stream.write(
    f"{source} -> {os.path.join(os.path.abspath(workdir), 'checkpoints', '0')}: {cfg.num_layers} layers, "
    f"{cfg.num_experts} experts, vocab {cfg.vocab_size}, tokenizer {config.data.tokenizer}\n"
  )
  stream.flush()
