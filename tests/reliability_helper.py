"""Subprocess entry points for tests/test_reliability.py.

  python tests/reliability_helper.py hold-save STEP -- <mla_jax.train flags>
      runs the trainer, but the save of STEP never commits (its temporary directory stays), so the test
      can SIGKILL the process in the middle of that save.
  python tests/reliability_helper.py slow-data SECONDS -- <mla_jax.train flags>
      runs the trainer with every batch delayed by SECONDS, so a signal reliably lands mid-run.
  python tests/reliability_helper.py reshard CKPT_IN CKPT_OUT BATCH.npy
      (with XLA_FLAGS=--xla_force_host_platform_device_count=8) restores CKPT_IN onto 8 devices with
      parameters split over them, prints the loss on the batch (rows split over the devices) as JSON,
      and saves the sharded state to CKPT_OUT.

`build_state` and `eval_loss` are shared with the tests, so both sides build the same model.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity  # noqa: E402

from mla_jax import checkpoint as ckpt_lib  # noqa: E402
from mla_jax import train  # noqa: E402
from mla_jax.config import ModelConfig, seq_len  # noqa: E402
from mla_jax.data import BatchIterator  # noqa: E402
from mla_jax.model import LanguageModel, init_params  # noqa: E402
from mla_jax.optim import make_optimizer  # noqa: E402
from mla_jax.train_state import TrainState  # noqa: E402
from mla_jax.train_step import make_eval_step  # noqa: E402


def build_state(config):
  """A fresh TrainState for `config` (model.vocab_size must be set)."""
  params, _ = init_params(ModelConfig.from_config(config), jax.random.PRNGKey(0), seq_len(config))
  return TrainState.create(params, make_optimizer(config.trainer, 10), jax.random.PRNGKey(1))


def eval_loss(config, state, batch) -> float:
  """Mean next-token cross-entropy of `state.params` on `batch` ({"inputs", "targets"})."""
  nll, count = make_eval_step(LanguageModel(ModelConfig.from_config(config)))(state.params, state.model_state, batch)
  return float(nll) / float(count)


def hold_save(step: str, argv: list[str]) -> None:
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def held(self):
    if self.get_final().name == step:
      time.sleep(600)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = held
  train.main([sys.argv[0], *argv])


def slow_data(seconds: str, argv: list[str]) -> None:
  next_batch = BatchIterator.__next__

  def slow(self):
    time.sleep(float(seconds))
    return next_batch(self)

  BatchIterator.__next__ = slow
  train.main([sys.argv[0], *argv])


def reshard(ckpt_in: str, ckpt_out: str, batch_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  split = lambda x: NamedSharding(mesh, P("data") if x.ndim and x.shape[0] % 8 == 0 else P())
  checkpointer = ckpt_lib.Checkpointer(ckpt_in, max_to_keep=0)
  meta = checkpointer.restore_meta(checkpointer.latest_step())
  config = ckpt_lib.config_from_meta(meta)
  target = jax.eval_shape(lambda: build_state(config))
  step, state, meta = checkpointer.restore_latest(ckpt_lib.abstract(target, jax.tree_util.tree_map(split, target)))
  checkpointer.close()
  split_leaves = sum(
    len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.shape != x.shape
    for x in jax.tree_util.tree_leaves(state.params)
  )
  tokens = np.load(batch_path)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, NamedSharding(mesh, P("data")))
  loss = eval_loss(config, state, batch)
  out = ckpt_lib.Checkpointer(ckpt_out, max_to_keep=0)
  out.save(step, state, meta["data"], config)
  out.close()
  print(json.dumps({"loss": loss, "devices": jax.device_count(), "split_leaves": int(split_leaves)}))


if __name__ == "__main__":
  if sys.argv[1] == "hold-save":
    hold_save(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
  elif sys.argv[1] == "slow-data":
    slow_data(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
  elif sys.argv[1] == "reshard":
    reshard(*sys.argv[2:5])
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
