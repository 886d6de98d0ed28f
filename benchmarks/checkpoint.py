"""Checkpoint save and restore: time and bytes for the seed configs, and what an async save blocks.

  python -m benchmarks.checkpoint                       # -> benchmarks/results/checkpoint.md
  python -m benchmarks.checkpoint --configs mla gqa --runs 1 --dir /mnt/fast --out /tmp/ckpt.md

For each config file in configs/ (mla, gqa, moe, hybrid; missing ones are skipped) the full train state
(params, AdamW moments, step, RNG, model state) is built as mla_jax.trainer builds it and saved with
mla_jax.checkpoint.Checkpointer into a fresh directory, `--runs` times per mode, median reported:
'sync save' is a synchronous save to completion; 'async blocks' is the part of an async save that the
training loop waits for (the save() call), 'async total' adds the background write; 'restore' reads
the newest checkpoint back onto the state's shardings (with the shape check). 'per step' spreads the
blocking part over the config's trainer.save_interval steps. The AdamW moments are filled with small
random values, as after training (fresh ones are zeros, which compress to nearly nothing on disk).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.common import write_results
from mla_jax import checkpoint as ckpt_lib
from mla_jax import config as config_lib
from mla_jax import train_state
from mla_jax.data import load_tokenizer
from mla_jax.model import LanguageModel
from mla_jax.optim import make_optimizer
from mla_jax.train_program import resolve_model_config

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ("mla", "gqa", "moe", "hybrid")


def load_config(name: str):
  return importlib.import_module(f"configs.{name}").get_config()


def build_state(config):
  """The train state as mla_jax.trainer initialises it (sharded by the config's mesh), with random AdamW moments:
  a fresh optimizer state is all zeros and would compress to almost nothing."""
  config_lib.validate(config)
  cfg = resolve_model_config(config, load_tokenizer(config.data.tokenizer))
  model = LanguageModel(cfg)
  seq_len = config_lib.seq_len(config)
  tx = make_optimizer(config.trainer, config.trainer.max_steps)
  plan = train_state.plan(config, model, tx, seq_len)
  state = train_state.init_state(model, tx, jax.random.PRNGKey(0), seq_len, plan.state)
  leaves, treedef = jax.tree_util.tree_flatten(state.opt_state)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  noisy = [
    jax.device_put(jax.random.normal(k, x.shape, x.dtype) * 1e-3, x.sharding)
    if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) and x.ndim
    else x
    for k, x in zip(keys, leaves)
  ]
  return jax.block_until_ready(state.replace(opt_state=jax.tree_util.tree_unflatten(treedef, noisy)))


def du(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def median(values: list[float]) -> float:
  return sorted(values)[len(values) // 2]


def measure(name: str, runs: int, root: Path) -> dict:
  config = load_config(name)
  state = build_state(config)
  data_state = {
    "step": 1,
    "seed": config.trainer.seed,
    "batch_size": config.trainer.batch_size,
    "seq_len": config_lib.seq_len(config),
  }
  sync_s, block_s, async_s, restore_s, disk = [], [], [], [], 0
  for run in range(runs):
    for mode in ("sync", "async"):
      workdir = root / f"{name}_{mode}_{run}"
      checkpointer = ckpt_lib.Checkpointer(str(workdir), max_to_keep=1, async_save=mode == "async")
      start = time.perf_counter()
      checkpointer.save(1, state, data_state, config)
      blocked = time.perf_counter() - start
      checkpointer.wait()
      total = time.perf_counter() - start
      checkpointer.close()
      if mode == "sync":
        sync_s.append(total)
      else:
        block_s.append(blocked)
        async_s.append(total)
        disk = du(workdir / "checkpoints" / "1")
        reader = ckpt_lib.Checkpointer(str(workdir), max_to_keep=1)
        start = time.perf_counter()
        _, restored, _ = reader.restore_latest(ckpt_lib.abstract(state))
        jax.block_until_ready(restored)
        restore_s.append(time.perf_counter() - start)
        reader.close()
        del restored
      shutil.rmtree(workdir)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  return {
    "config": name,
    "params": n_params,
    "state_bytes": ckpt_lib.state_bytes(state),
    "disk_bytes": disk,
    "sync": median(sync_s),
    "block": median(block_s),
    "async": median(async_s),
    "restore": median(restore_s),
    "save_interval": config.trainer.save_interval,
  }


def table(rows: list[dict]) -> str:
  lines = [
    "| config | params | state MiB | on disk MiB | sync save s | async blocks s | async total s | "
    "restore s | save MB/s (sync) | async blocking per step |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    mib = 1 << 20
    per_step = r["block"] / r["save_interval"] * 1e3
    lines.append(
      f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['state_bytes'] / mib:,.0f} | "
      f"{r['disk_bytes'] / mib:,.0f} | {r['sync']:.2f} | {r['block']:.2f} | {r['async']:.2f} | "
      f"{r['restore']:.2f} | {r['state_bytes'] / 1e6 / r['sync']:,.0f} | "
      f"{per_step:.2f} ms (every {r['save_interval']} steps) |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint", description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
  parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/checkpoint.md)")
  args = parser.parse_args()
  names = [n for n in args.configs if (ROOT / "configs" / f"{n}.py").exists()]
  root = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir))
  try:
    rows = []
    for name in names:
      rows.append(measure(name, args.runs, root))
      print(f"{name}: done", file=sys.stderr, flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  body = (
    f"Full seed configs (not `:quick`), float32 state, orbax OCDBT format, written to {root.parent} "
    f"(the default temp dir unless --dir). Median of {args.runs} run(s) per mode.\n\n" + table(rows)
  )
  print(body)
  if args.out:
    Path(args.out).write_text(body + "\n")
  else:
    print(f"wrote {write_results('checkpoint', 'Checkpoint save / restore', body)}", file=sys.stderr)


if __name__ == "__main__":
  main()
