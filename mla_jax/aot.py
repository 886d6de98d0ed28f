"""Ahead-of-time compilation for a TPU slice on a machine without TPUs.

`jax.experimental.topologies.get_topology_desc` gives the devices of a named TPU topology (`v5e:2x2`,
`v5p:4x4x4`, ...) when libtpu is installed; `jit(...).lower(...).compile()` then runs the real XLA:TPU
compiler for them. `analyze` compiles the train step exactly as `mla_jax.train` builds it
(`mla_jax.train_program`: same mesh rules, shardings and remat selection) and the single-token decode
step of `mla_jax.generate` (absorbed MLA, Mamba2 state) with sharded caches, and reports per-chip memory
against the chip's HBM and XLA's FLOP count against the chip's bf16 peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mla_jax import cache as cache_lib
from mla_jax import cli, memory, reports, train_program
from mla_jax import config as config_lib
from mla_jax import model as model_lib
from mla_jax import sharding as sharding_lib
from mla_jax.data import load_tokenizer
from mla_jax.decode import Decoder
from mla_jax.errors import UserError
from mla_jax.tpu_chips import TPU_CHIPS, Chip, chip_for_device  # noqa: F401  (re-exported)
from mla_jax.xla_options import mesh_platform


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5e:2x2' -> (TPU_CHIPS['v5e'], (2, 2)); a UserError naming the flag otherwise."""
  match = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", name or "")
  examples = "e.g. v5e:2x2, v6e:4x4, v4:2x2x1, v5p:4x4x4"
  if not match:
    raise UserError(f"--topology={name} is not a TPU topology name GENERATION:AxB[xC] ({examples})")
  generation, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
  if generation not in TPU_CHIPS:
    raise UserError(f"--topology={name}: unknown TPU generation {generation!r} (known: {', '.join(TPU_CHIPS)})")
  chip = TPU_CHIPS[generation]
  if len(dims) != chip.dims or min(dims) < 1:
    form = "x".join("ABC"[: chip.dims])
    raise UserError(
      f"--topology={name}: {generation} topologies have {chip.dims} positive dimensions "
      f"({generation}:{form}; {examples})"
    )
  return chip, dims


def tpu_compiler_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _quiet_stderr():
  """Holds back what native code writes to stderr (libtpu's start-up warnings about the missing TPU VM
  environment); it is printed only if the block fails."""
  try:
    saved = os.dup(2)
  except OSError:
    yield
    return
  with tempfile.TemporaryFile() as captured:
    sys.stderr.flush()
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


@contextlib.contextmanager
def _topology_compiles():
  """A persistent compilation cache (jax_compilation_cache_dir) stores executables for topology devices
  but cannot load them back without an attached TPU; its warning about that is dropped (the program is
  compiled again)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
    yield


def topology_devices(name: str) -> tuple[Chip, list]:
  """(chip, the topology's devices, one per chip) for a topology name; one-line UserErrors for a bad name
  or a missing TPU compiler."""
  chip, dims = parse_topology(name)
  if not tpu_compiler_available():
    raise UserError(
      f"--topology={name} needs the TPU compiler (libtpu), which is not installed: "
      f'pip install "jax[tpu]=={jax.__version__}"'
    )
  # Compiling for a topology uses no TPU, so processes need not take turns (libtpu's lockfile is for chips).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  padded = dims + (1,) * (3 - len(dims))
  bounds = tuple(min(d, h) for d, h in zip(padded, chip.host_bounds))
  try:
    with _quiet_stderr():
      devices = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{chip.name}:{'x'.join(map(str, dims))}",
        chip_config_name=chip.chip_config,
        chips_per_host_bounds=bounds,
        num_slices=1,
      ).devices
  except Exception as e:
    raise UserError(f"--topology={name}: libtpu cannot build this topology ({cli.one_line(e)})") from e
  return chip, list(devices)


@dataclasses.dataclass
class Report:
  """What `analyze` found; byte counts are per chip, FLOPs per chip per call."""

  topology: str
  chip: Chip
  num_chips: int
  mesh: dict
  batch_spec: str
  batch_size: int
  seq_len: int
  remat_requested: str
  remat: str  # the policy compiled (the chosen one, or the least-memory one when nothing fits)
  remat_table: list  # rows of memory.select_remat
  train: dict | None  # memory.memory_stats of the train step (None: the compiler refused every policy)
  train_flops: float | None
  fits: bool
  # Model FLOPs per chip per step from the architecture (mla_jax.model.flops_per_token: 6 x active matmul
  # parameters + causal attention + SSD, no recomputation). XLA's count misses the work inside Pallas
  # kernels (splash attention) and counts a scanned layer loop once, so the bound uses the larger.
  model_flops: float | None = None
  # The decode step: {batch, length, memory (memory_stats, None if refused), refused (bytes the compiler
  # gave when it refused it), flops, fits}.
  decode: dict | None = None

  @property
  def step_time_lower_bound_s(self) -> float | None:
    flops = max(self.train_flops or 0.0, self.model_flops or 0.0)
    return flops / self.chip.bf16_flops if flops else None


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def compile_decode(program: train_program.Program, batch: int, length: int):
  """The compiled single-token decode step of `mla_jax.decode.Decoder` (absorbed MLA) for `batch`
  sequences with caches of `length` slots, parameters laid out as in training, caches by
  `sharding.cache_shardings`."""
  cfg = dataclasses.replace(program.cfg, remat="none")  # inference keeps nothing for a backward pass
  mesh, rules = program.plan.mesh, program.plan.rules
  replicated = NamedSharding(mesh, P())
  state, _ = program.abstract_args()
  variables = {"params": state.params, **state.model_state}
  caches = jax.eval_shape(lambda: cache_lib.init_caches(cfg, batch, length, mla_decode="absorbed"))
  caches = _abstract(caches, sharding_lib.cache_shardings(caches, mesh, rules))
  token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
  position = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # traced for the mesh's platform
    lowered = Decoder(cfg, mla_decode="absorbed", platform=mesh_platform(mesh)).step.lower(
      variables, token, position, caches, rng
    )
  return lowered.compile()


def analyze(config: ml_collections.ConfigDict, topology: str, decode_batch: int = 1, decode_length: int = 0) -> Report:
  """Compiles the train step (and, with decode_batch > 0, the decode step at decode_length, default
  model.max_seq_len) for `topology` and measures them. Raises UserError for a bad topology or config."""
  config_lib.validate(config)
  if decode_batch < 0 or decode_length < 0:
    raise UserError("--decode_batch and --decode_length must be >= 0")
  decode_length = decode_length or config.model.max_seq_len
  chip, devices = topology_devices(topology)
  mesh = sharding_lib.make_mesh(config, devices)  # ConfigError naming the mesh key when it does not divide
  cfg = train_program.resolve_model_config(config, load_tokenizer(config.data.tokenizer))
  capacity = chip.hbm_bytes
  where = f"{chip.name} HBM"
  requested = config.model.get("remat", "auto")
  try:
    with _topology_compiles():
      program, compiled, policy, table = train_program.compile_to_fit(
        config, None, cfg.vocab_size, config.trainer.max_steps, capacity, mesh=mesh, where=where
      )
    fits = True
  except memory.DoesNotFitError as e:
    compiled, table, policy, fits = e.compiled, e.table, e.policy, False
    program = train_program.build(config, None, cfg.vocab_size, config.trainer.max_steps, mesh=mesh, remat=policy)
  plan = program.plan
  report = Report(
    topology=topology,
    chip=chip,
    num_chips=len(devices),
    mesh=dict(plan.sizes),
    batch_spec=str(plan.batch.spec),
    batch_size=plan.batch_size,
    seq_len=program.seq_len,
    remat_requested=requested,
    remat=policy,
    remat_table=table,
    train=memory.memory_stats(compiled),
    train_flops=memory.flops(compiled),
    fits=fits,
    model_flops=model_flops_per_chip(program, len(devices)),
  )
  if decode_batch:
    with _topology_compiles():
      decode, refused = memory.compile_or_refusal(lambda: compile_decode(program, decode_batch, decode_length))
    stats = memory.memory_stats(decode)
    report.decode = {
      "batch": decode_batch,
      "length": decode_length,
      "memory": stats,
      "refused": refused,
      "flops": memory.flops(decode),
      "fits": stats is not None and stats["total"] <= capacity,
    }
  return report


def model_flops_per_chip(program: train_program.Program, num_chips: int) -> float:
  """Training FLOPs of one step per chip from the architecture (`model.flops_per_token`)."""
  state, _ = program.abstract_args()
  per_token = model_lib.flops_per_token(program.cfg, state.params, program.seq_len)["total"]
  return per_token * program.plan.batch_size * program.seq_len / num_chips


def _fmt_seconds(s: float) -> str:
  return f"{s:,.2f} s" if s >= 1 else f"{s * 1e3:,.2f} ms" if s >= 1e-3 else f"{s * 1e6:,.2f} us"


def _remat_row(row: dict, table: list) -> str:
  gib = reports.fmt_bytes
  if row["temporaries"] is None:
    needs = f" (needs {gib(row['total'])})" if row["total"] else ""
    return f"{row['policy']}: refused by the compiler{needs}, does not fit"
  base = next((r["flops"] for r in table if r["policy"] == "none"), None)
  flops = (
    "FLOPs not reported"
    if not row["flops"]
    else f"FLOPs {row['flops']:.3e}"
    + (f" ({row['flops'] / base - 1:+.0%} recomputed)" if base and row["policy"] != "none" else "")
  )
  return f"{row['policy']}: temporaries {gib(row['temporaries'])}, total {gib(row['total'])}, {flops}, " + (
    "fits" if row["fits"] else "does not fit"
  )


def format_report(r: Report) -> str:
  gib = reports.fmt_bytes
  c = r.chip
  lines = [
    f"Topology {r.topology}: {r.num_chips} {c.name} chips, {gib(c.hbm_bytes)} HBM and "
    f"{c.bf16_flops / 1e12:,.0f} TFLOP/s bf16 peak per chip",
    "Mesh: "
    + ", ".join(f"{a} {n}" for a, n in r.mesh.items())
    + f"; batch rows split {r.batch_spec} ({r.batch_size} x {r.seq_len} tokens per step)",
  ]
  m = r.train
  verdict = "FITS" if r.fits else "DOES NOT FIT"
  if m is None:
    needed = next(row["total"] for row in r.remat_table if row["policy"] == r.remat)
    needs = f" (it needs {gib(needed)})" if needed else ""
    lines.append(
      f"Train step (remat {r.remat}): the TPU compiler refused it as larger than the chip{needs} "
      f"of {gib(c.hbm_bytes)} HBM: {verdict}"
    )
  else:
    lines.append(
      f"Train step (remat {r.remat}), per chip: arguments {gib(m['arguments'])}, outputs "
      f"{gib(m['outputs'])} ({gib(m['aliased'])} reusing donated inputs), temporaries "
      f"{gib(m['temporaries'])}; total {gib(m['total'])} of {gib(c.hbm_bytes)} HBM "
      f"({m['total'] / c.hbm_bytes:.0%}): {verdict}"
    )
  if r.step_time_lower_bound_s:
    xla = f"{r.train_flops:.3e}" if r.train_flops else "not reported"
    model = f"{r.model_flops:.3e}" if r.model_flops else "not known"
    lines.append(
      f"FLOPs per chip per step: XLA cost analysis {xla} (it does not count Pallas kernels and "
      f"counts a scanned layer loop once), model {model} (6 x active matmul params + attention + "
      f"SSD, no recompute); at the {c.name} bf16 peak the larger is at least "
      f"{_fmt_seconds(r.step_time_lower_bound_s)} per step (a lower bound: no memory or "
      "communication time)"
    )
  if r.remat_requested == "auto" or not r.fits:
    lines.append(
      f"Remat (model.remat={r.remat_requested}): "
      + "; ".join(_remat_row(row, r.remat_table) for row in r.remat_table)
      + (f" -> {r.remat}" if r.fits else " -> none fits")
    )
  if not r.fits:
    remat = "" if r.remat_requested == "auto" else ", set model.remat=auto"
    lines.append(
      "To fit: lower trainer.batch_size or trainer.seq_len, raise trainer.gradient_accumulation"
      f"{remat}, or use a larger slice (more chips to shard over with mesh.fsdp / mesh.tensor / "
      "mesh.expert)"
    )
  if r.decode and r.decode["memory"] is None:
    lines.append(
      f"Decode step (batch {r.decode['batch']}, context {r.decode['length']:,}): the TPU compiler "
      "refused it as larger than the chip"
      + (f" (it needs {gib(r.decode['refused'])})" if r.decode["refused"] else "")
      + ": DOES NOT FIT"
    )
  elif r.decode:
    d = r.decode["memory"]
    lines.append(
      f"Decode step (batch {r.decode['batch']}, context {r.decode['length']:,}, absorbed MLA / "
      f"Mamba2 state), per chip: arguments {gib(d['arguments'])}, outputs {gib(d['outputs'])}, "
      f"temporaries {gib(d['temporaries'])}; total {gib(d['total'])} of {gib(c.hbm_bytes)} HBM: "
      f"{'FITS' if r.decode['fits'] else 'DOES NOT FIT'}"
    )
  return "\n".join(lines)


def run(
  config: ml_collections.ConfigDict, topology: str, decode_batch: int = 1, decode_length: int = 0, stream=sys.stdout
) -> Report:
  """`analyze` and print its report (what `python -m mla_jax.compile` does)."""
  report = analyze(config, topology, decode_batch, decode_length)
  stream.write(format_report(report) + "\n")
  stream.flush()
  return report
