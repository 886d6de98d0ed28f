r"""Step time and per-device memory of each mesh preset on 1, 2, 4 and 8 simulated CPU devices.

  python -m benchmarks.scaling                  # -> benchmarks/results/scaling.md
  python -m benchmarks.scaling --devices 1,8 --steps 3 --no_write

The simulated devices (`--xla_force_host_platform_device_count`) all share this machine's cores, so more
devices cannot run faster: on CPU the step-time column measures the overhead of splitting the work
(collectives, resharding, smaller matmuls), not a speed-up. The memory columns are what sharding is
for and carry over to real accelerators: the train state each device holds (parameters + AdamW moments,
from the arrays' addressable shards) and XLA's `memory_analysis()` of the compiled step per device
(arguments + outputs + temporaries - donated buffers reused).

Each device count runs in its own process (the device count is fixed when JAX starts). The model is a
small MLA + MoE (configs/moe.py shrunk to hidden 256, 4 layers, 8 heads, 8 experts of width 512), trained
in float32 with the capacity dispatch in every preset so that the rows differ only in their sharding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BYTE_VOCAB = 320


def presets(n: int) -> dict[str, dict[str, int]]:
  """The four presets on n devices (FSDP + tensor and expert need n >= 2)."""
  out = {"data parallel": {"data": n}, "FSDP": {"data": 1, "fsdp": n}}
  if n >= 2:
    out["FSDP + tensor"] = {"data": 1, "fsdp": n // 2, "tensor": 2}
    expert = min(n, 8)
    out["expert parallel"] = {"data": n // expert, "expert": expert}
  return out


def make_config(mesh: dict, batch: int, seq_len: int):
  import configs.moe
  from mla_jax.config import validate

  config = configs.moe.get_config()
  m = config.model
  m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size = 256, 4, 8, 1024
  m.kv_latent_dim, m.q_latent_dim, m.d_rope = 128, 128, 16
  m.num_experts, m.experts_per_tok, m.moe_intermediate_size = 8, 2, 512
  m.moe_dispatch, m.vocab_size = "capacity", BYTE_VOCAB
  config.trainer.batch_size, config.trainer.seq_len = batch, seq_len
  for axis in ("data", "fsdp", "tensor", "expert"):
    config.mesh[axis] = mesh.get(axis, 1)
  validate(config)
  return config


def worker(args) -> None:
  """Runs every preset on this process's devices and prints one JSON line per preset."""
  import time

  import jax
  import numpy as np

  from benchmarks.common import median_time
  from mla_jax import memory, train_state
  from mla_jax.config import ModelConfig
  from mla_jax.model import LanguageModel
  from mla_jax.optim import make_optimizer, make_schedule
  from mla_jax.train_step import make_train_step

  n = jax.device_count()
  tokens = np.random.default_rng(0).integers(0, 256, (args.batch, args.seq_len + 1)).astype(np.int32)
  for name, mesh in presets(n).items():
    config = make_config(mesh, args.batch, args.seq_len)
    model = LanguageModel(ModelConfig.from_config(config))
    tx, schedule = make_optimizer(config.trainer, 1000), make_schedule(config.trainer, 1000)
    plan = train_state.plan(config, model, tx, args.seq_len)
    state = train_state.init_state(model, tx, jax.random.PRNGKey(0), args.seq_len, plan.state)
    per_device = {}
    for leaf in jax.tree_util.tree_leaves(state):
      for shard in leaf.addressable_shards:
        per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    batch = plan.put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    start = time.perf_counter()
    step = make_train_step(config, model, tx, schedule, plan.state, plan.batch).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
      holder["state"], metrics = step(holder["state"], batch)
      jax.block_until_ready(metrics["loss"])

    run()
    seconds = median_time(run, args.steps)
    print(
      json.dumps(
        {
          "preset": name,
          "devices": n,
          "mesh": dict(plan.sizes),
          "compile_s": compile_s,
          "step_s": seconds,
          "tok_s": args.batch * args.seq_len / seconds,
          "state_bytes": max(per_device.values()),
          "xla_bytes": memory.compiled_bytes(step),
        }
      ),
      flush=True,
    )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--no_write", action="store_true")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args)
    return

  rows = []
  for n in (int(d) for d in args.devices.split(",")):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    out = subprocess.run(
      [
        sys.executable,
        "-m",
        "benchmarks.scaling",
        "--worker",
        f"--batch={args.batch}",
        f"--seq_len={args.seq_len}",
        f"--steps={args.steps}",
      ],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
    )
    if out.returncode:
      sys.exit(f"worker with {n} devices failed:\n{out.stderr[-3000:]}")
    for line in out.stdout.splitlines():
      if line.startswith("{"):
        rows.append(json.loads(line))
        print(line, flush=True)

  mib = lambda b: f"{b / 2**20:,.1f}"
  order = {"data parallel": 0, "FSDP": 1, "FSDP + tensor": 2, "expert parallel": 3}
  rows.sort(key=lambda r: (order[r["preset"]], r["devices"]))
  lines = [
    f"Model: configs/moe.py shrunk (hidden 256, 4 MLA + MoE layers, 8 experts top-2, capacity dispatch), "
    f"float32, batch {args.batch} x {args.seq_len} tokens; median of {args.steps} steps after compilation.",
    "",
    "Each row runs in its own process with that many simulated CPU devices "
    "(`--xla_force_host_platform_device_count`); the device count above is the parent process's.",
    "",
    "**On CPU the simulated devices share the same cores: step time shows the overhead of sharding, not a "
    "speed-up.** The memory columns are per device: the train state (params + AdamW moments) it holds, "
    "and XLA's memory_analysis of the compiled step (arguments + outputs + temporaries - reused donations).",
    "",
    "| preset | devices | mesh (data, fsdp, tensor, expert) | compile (s) | step (ms) | tokens/s | "
    "state MiB / device | XLA MiB / device |",
    "|---|---:|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    m = r["mesh"]
    lines.append(
      f"| {r['preset']} | {r['devices']} | {m['data']}, {m['fsdp']}, {m['tensor']}, {m['expert']} | "
      f"{r['compile_s']:.1f} | {r['step_s'] * 1e3:,.0f} | {r['tok_s']:,.0f} | {mib(r['state_bytes'])} | "
      f"{mib(r['xla_bytes']) if r['xla_bytes'] is not None else '-'} |"
    )
  table = "\n".join(lines)
  print(table)
  if not args.no_write:
    from benchmarks.common import write_results

    path = write_results("scaling", "Mesh presets on simulated CPU devices", table)
    print("wrote", path)


if __name__ == "__main__":
  main()
