r"""Per-chip memory and FLOPs of the real sharded train step compiled for TPU slices on this CPU machine.

  python -m benchmarks.tpu_compile                        # seed configs on v5e:2x2 and the CPU table
  python -m benchmarks.tpu_compile --tables=deepseek      # DeepSeek-V2-Lite shape on v5p / v5e slices
  python -m benchmarks.tpu_compile --tables=seed --configs=mla --policies=none,full

Each row compiles `mla_jax.train_program` (the step `mla_jax.train` runs: same mesh rules, shardings,
donation) with the TPU compiler for an abstract topology (`mla_jax.aot.topology_devices`) and reads XLA's
`memory_analysis()` (temporaries; total = arguments + outputs + temporaries - aliased) and
`cost_analysis()` FLOPs per chip. Rows differ in model.remat, model.attention_impl (xla: XLA attention
keeping T x T; flash: the Pallas splash kernel) and trainer.loss_chunk_size (0: [B, T, V] logits).
The seed rows use bfloat16, FSDP over v5e:2x2 (mesh.fsdp=-1 mesh.data=1), 8 sequences of 2048 tokens per
chip and vocabulary 32768, with model.scan_layers=True to keep each compile short; XLA counts a scanned
loop body once, so their FLOP column is per compiled program (compare within a row group). The CPU
table compiles (does not run) the seed MLA step at batch 2 x 2048 with the byte vocabulary on this CPU.
Needs libtpu (`pip install "jax[tpu]==<jax version>"`). Rows are written as they finish.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile beside other processes using libtpu

import importlib  # noqa: E402

import jax  # noqa: E402

from benchmarks.common import write_results  # noqa: E402
from mla_jax import memory, train_program  # noqa: E402
from mla_jax import sharding as sharding_lib  # noqa: E402
from mla_jax.config import REMAT_POLICIES, validate  # noqa: E402

GB = 1e9
SEED_BASE = {
  "model.dtype": "bfloat16",
  "model.vocab_size": 32768,
  "model.scan_layers": True,
  "mesh.fsdp": -1,
  "mesh.data": 1,
  "trainer.batch_size": 32,
  "trainer.seq_len": 2048,
}
# (attention_impl, loss_chunk_size) pairs of the seed rows: XLA attention with the plain loss is the
# starting point; flash attention with the chunked loss is the target.
SEED_PATHS = (("xla", 0), ("xla", 4096), ("flash", 4096))
# DeepSeek-V2-Lite shape: 4 sequences of 4096 tokens per chip, FSDP over the slice, experts over mesh.expert.
DEEPSEEK_SLICES = (("v5p:2x2x1", 4), ("v5p:2x2x2", 8), ("v5p:2x2x4", 8), ("v5e:4x8", 8))


def _config(name: str, overrides: dict):
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  validate(config)
  return config


def compile_row(name: str, topology: str, overrides: dict) -> dict:
  """Compiles one config for `topology` (or the local CPU for 'cpu') and returns its numbers."""
  from mla_jax import aot
  from mla_jax.data import load_tokenizer

  config = _config(name, overrides)
  if topology == "cpu":
    devices, capacity = jax.devices("cpu")[:1], None
  else:
    chip, devices = aot.topology_devices(topology)
    capacity = chip.hbm_bytes
  mesh = sharding_lib.make_mesh(config, devices)
  vocab = train_program.resolve_model_config(config, load_tokenizer(config.data.tokenizer)).vocab_size
  start = time.time()
  program = train_program.build(config, None, vocab, config.trainer.max_steps, mesh=mesh)
  compiled = train_program.compile(program)
  stats = memory.memory_stats(compiled)
  return {
    "temporaries": stats["temporaries"],
    "total": stats["total"],
    "flops": memory.flops(compiled),
    "fits": None if capacity is None else stats["total"] <= capacity,
    "capacity": capacity,
    "compile_s": time.time() - start,
    "mesh": dict(program.plan.sizes),
  }


def _cell_flops(row: dict, base) -> str:
  if not row["flops"]:
    return "n/a"
  text = f"{row['flops']:.3e}"
  if base and row is not base and base["flops"]:
    text += f" ({row['flops'] / base['flops'] - 1:+.0%})"
  return text


def _line(label: str, row: dict, base, unit: float) -> str:
  fits = "" if row["fits"] is None else ("yes" if row["fits"] else "**no**")
  return (
    f"| {label} | {row['temporaries'] / unit:.2f} | {row['total'] / unit:.2f} | {fits} | "
    f"{_cell_flops(row, base)} | {row['compile_s']:.0f} |"
  )


def _header(unit_name: str) -> str:
  return (
    f"| row | temporaries {unit_name}/chip | total {unit_name}/chip | fits | FLOPs/chip (vs the first "
    "row) | compile s |\n|---|---:|---:|---|---:|---:|"
  )


def seed_rows(configs, policies, paths=SEED_PATHS):
  for name in configs:
    for attention, loss_chunk in paths:
      for policy in policies:
        overrides = dict(
          SEED_BASE, **{"model.remat": policy, "model.attention_impl": attention, "trainer.loss_chunk_size": loss_chunk}
        )
        yield (
          f"{name}",
          f"{name} v5e:2x2, attention {attention}, loss chunk {loss_chunk or 'off'}",
          f"remat {policy}",
          "v5e:2x2",
          overrides,
        )


def deepseek_rows(policies):
  for topology, expert in DEEPSEEK_SLICES:
    chips = 1
    for d in topology.split(":")[1].split("x"):
      chips *= int(d)
    for policy in policies:
      overrides = {
        "model.remat": policy,
        "model.attention_impl": "flash",
        "trainer.loss_chunk_size": 4096,
        "mesh.fsdp": -1,
        "mesh.data": 1,
        "mesh.expert": expert,
        "trainer.batch_size": 4 * chips,
      }
      yield (
        "deepseek_v2_lite",
        f"deepseek_v2_lite {topology} (fsdp {chips // expert} x expert {expert}), flash, loss chunk 4096",
        f"remat {policy}",
        topology,
        overrides,
      )


def cpu_rows():
  base = {"model.remat": "none", "model.attention_impl": "reference", "trainer.loss_chunk_size": 0}
  yield "mla", "seed MLA on this CPU, batch 2 x 2048", "remat none, einsum attention, plain loss", "cpu", base
  for scan in (False, True):
    for policy in REMAT_POLICIES:
      yield (
        "mla",
        "seed MLA on this CPU, batch 2 x 2048",
        f"remat {policy}, chunked attention, loss chunk 4096" + (", scan_layers" if scan else ""),
        "cpu",
        {
          "model.remat": policy,
          "model.attention_impl": "chunked",
          "trainer.loss_chunk_size": 4096,
          "model.scan_layers": scan,
        },
      )


def main():
  parser = argparse.ArgumentParser(prog="python -m benchmarks.tpu_compile", description=__doc__.splitlines()[0])
  parser.add_argument("--tables", default="seed,cpu", help="comma list of seed, deepseek, cpu")
  parser.add_argument("--configs", default="mla,moe,hybrid", help="seed configs (configs/<name>.py)")
  parser.add_argument("--policies", default=",".join(REMAT_POLICIES), help="remat policies to compile")
  parser.add_argument(
    "--paths",
    default=",".join(f"{a}:{c}" for a, c in SEED_PATHS),
    help="seed rows' attention_impl:loss_chunk_size pairs",
  )
  parser.add_argument("--limit", type=int, default=0, help="compile only the first N rows (0: all)")
  parser.add_argument("--name", default="tpu_compile", help="results file benchmarks/results/<name>.md")
  args = parser.parse_args()
  from mla_jax import aot

  if not aot.tpu_compiler_available():
    sys.exit(f'the TPU compiler (libtpu) is not installed: pip install "jax[tpu]=={jax.__version__}"')
  from importlib.metadata import version

  policies = args.policies.split(",")
  tables = args.tables.split(",")
  plan = []
  if "seed" in tables:
    paths = [(p.split(":")[0], int(p.split(":")[1])) for p in args.paths.split(",")]
    plan += list(seed_rows(args.configs.split(","), policies, paths))
  if "deepseek" in tables:
    plan += list(deepseek_rows(policies))
  if "cpu" in tables:
    plan += list(cpu_rows())
  if args.limit:
    plan = plan[: args.limit]
  intro = (
    f"libtpu {version('libtpu')}: per-chip numbers from XLA:TPU compiles for abstract topologies "
    "(no TPU attached); GB = 1e9 bytes, GiB = 2^30. HBM per chip: "
    + ", ".join(f"{c.name} {c.hbm_bytes / GB:.1f} GB" for c in aot.TPU_CHIPS.values())
    + ".\n\n"
    "FLOPs are XLA's cost analysis: it counts a scanned loop body once and does not count the work "
    "inside the Pallas splash kernel, so compare FLOPs only within a row group (the recompute cost of "
    "each policy), not as the step's total.\n\n"
    f"Command: `python -m benchmarks.tpu_compile {' '.join(sys.argv[1:])}`."
  )
  lines, group, base = [], None, None
  for config_name, title, label, topology, overrides in plan:
    unit, unit_name = (2**30, "GiB") if topology == "cpu" else (GB, "GB")
    if title != group:
      group, base = title, None
      lines += ["", f"### {title}", "", _header(unit_name)]
    try:
      row = compile_row(config_name, topology, overrides)
    except Exception as e:
      lines.append(f"| {label} | failed: {str(e).splitlines()[0][:200]} | | | | |")
    else:
      base = base or row
      lines.append(_line(label, row, base, unit))
    print(lines[-1], flush=True)
    path = write_results(
      args.name, "Train step compiled for TPU slices: per-chip memory by remat policy", intro + "\n" + "\n".join(lines)
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
