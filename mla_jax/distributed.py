"""Multi-process start-up: `jax.distributed.initialize()` when the flags or the environment ask for it.

  explicit flags   --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  SLURM            SLURM_NTASKS > 1: process id SLURM_PROCID, coordinator the first host of
                   SLURM_JOB_NODELIST (`scontrol show hostnames`) unless --coordinator_address is given;
                   each task picks its GPU by SLURM_LOCALID (JAX's SLURM support)
  TPU pod          --multihost, or TPU_WORKER_HOSTNAMES / MEGASCALE_COORDINATOR_ADDRESS /
                   CLOUD_TPU_TASK_ID naming more than one worker: JAX reads the rest from the TPU runtime

It must run before anything else touches the devices. Afterwards every process runs the same program;
only process 0 prints and writes files (`is_main`), and orbax writes checkpoints from all of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

import jax
from absl import flags

from mla_jax.errors import UserError

DEFAULT_PORT = 8476


def slurm_first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: `scontrol show hostnames` when available, else parsed here
  ('node[003-005,9],gpu2' -> 'node003')."""
  if shutil.which("scontrol"):
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]
  head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
  if "[" not in head:
    return head
  prefix, ranges = head[: head.index("[")], head[head.index("[") + 1 : -1]
  return prefix + ranges.split(",")[0].split("-")[0]


def _tpu_workers(env: Mapping[str, str]) -> int:
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h.strip()])


def distributed_args(
  coordinator_address: str = "",
  num_processes: int = 0,
  process_id: int = -1,
  multihost: bool = False,
  env: Mapping[str, str] | None = None,
) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, or None for a single-process run."""
  env = os.environ if env is None else env
  given = coordinator_address and num_processes > 0 and process_id >= 0
  if (num_processes > 1 or coordinator_address) and not given and "SLURM_NTASKS" not in env:
    raise UserError("--coordinator_address, --num_processes and --process_id must be given together")
  ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
  if ntasks > 1 and "SLURM_PROCID" in env:
    port = int(env.get("JAX_COORDINATOR_PORT", DEFAULT_PORT))
    address = coordinator_address or f"{slurm_first_host(env['SLURM_JOB_NODELIST'])}:{port}"
    return {
      "coordinator_address": address,
      "num_processes": num_processes or ntasks,
      "process_id": process_id if process_id >= 0 else int(env["SLURM_PROCID"]),
    }
  if coordinator_address:
    return {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  if (
    multihost
    or _tpu_workers(env) > 1
    or "MEGASCALE_COORDINATOR_ADDRESS" in env
    or ("CLOUD_TPU_TASK_ID" in env and _tpu_workers(env) != 1)
  ):
    return {}  # JAX finds the coordinator, process count and id from the TPU environment
  return None


def initialize(
  coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, multihost: bool = False
) -> dict | None:
  """Starts the JAX distributed runtime when needed; returns the arguments used (None: single process)."""
  args = distributed_args(coordinator_address, num_processes, process_id, multihost)
  if args is not None:
    jax.distributed.initialize(**args)
  return args


def is_main() -> bool:
  """True on the process that prints logs and writes metrics, plots and samples."""
  return jax.process_index() == 0


def define_flags() -> None:
  """The absl flags that `initialize_from_flags` reads."""
  flags.DEFINE_string(
    "coordinator_address", "", "Multi-process: HOST:PORT of process 0 (SLURM: default the first host of the job)."
  )
  flags.DEFINE_integer("num_processes", 0, "Multi-process: how many processes (SLURM: SLURM_NTASKS).")
  flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index (SLURM: SLURM_PROCID).")
  flags.DEFINE_bool("multihost", False, "Start jax.distributed from the TPU pod environment.")


def initialize_from_flags() -> dict | None:
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id, f.multihost)
