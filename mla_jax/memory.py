"""What a compiled program needs per device, what a device has, and the remat policy that makes a step fit.

`compiled_bytes` reads XLA's `memory_analysis()` (arguments + outputs + temporaries - the outputs that
reuse donated inputs). `device_capacity_bytes` is the device's memory: `memory_stats()["bytes_limit"]` on
GPU/TPU, the chip's HBM from `mla_jax.tpu_chips.TPU_CHIPS` for an abstract TPU topology device, and on CPU the
host's available memory shared by its CPU devices. `select_remat` compiles the policies in
`config.REMAT_POLICIES` order (least recomputation first) and returns the first that fits. The lines
that show these numbers to a person are in `mla_jax.reports`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import jax

from mla_jax.config import REMAT_POLICIES
from mla_jax.errors import UserError
from mla_jax.reports import fmt_bytes
from mla_jax.tpu_chips import chip_for_device


class DoesNotFitError(UserError):
  """The compiled step needs more memory than the device has. `table` holds each compiled policy's numbers."""

  def __init__(
    self, message: str, needed: int = 0, capacity: int = 0, table: list | None = None, compiled=None, policy: str = ""
  ):
    super().__init__(message)
    self.needed, self.capacity, self.table, self.compiled = needed, capacity, table or [], compiled
    self.policy = policy  # the policy that needs least (whose program `compiled` is, None if refused)


def memory_stats(compiled) -> dict | None:
  """{arguments, outputs, aliased, temporaries, total} bytes per device (None when not reported)."""
  stats = None if compiled is None else compiled.memory_analysis()
  if stats is None:
    return None
  out = {
    "arguments": int(stats.argument_size_in_bytes),
    "outputs": int(stats.output_size_in_bytes),
    "aliased": int(stats.alias_size_in_bytes),
    "temporaries": int(stats.temp_size_in_bytes),
  }
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def compiled_bytes(compiled) -> int | None:
  """arguments + outputs + temporaries - aliased bytes per device (None when not reported)."""
  stats = memory_stats(compiled)
  return None if stats is None else stats["total"]


def flops(compiled) -> float | None:
  """XLA's FLOP count per device for one call (None when not reported)."""
  if compiled is None:
    return None
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def _host_available_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_capacity_bytes(device: jax.Device) -> int:
  """Bytes one device can hold: a share of the host's available memory on CPU (all CPU devices of a
  process share it), `memory_stats()["bytes_limit"]` on GPU/TPU, the chip's HBM for a TPU topology
  device that is not attached (AOT compilation)."""
  if device.platform == "cpu":
    return _host_available_bytes() // max(len(jax.local_devices(backend="cpu")), 1)
  try:
    stats = device.memory_stats()
  except Exception:
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "tpu":
    return chip_for_device(device).hbm_bytes
  raise UserError(f"cannot tell how much memory {device.device_kind} has (memory_stats() reports no bytes_limit)")


def capacity_source(device: jax.Device) -> str:
  """Where `device_capacity_bytes` comes from, for messages."""
  if device.platform == "cpu":
    n = len(jax.local_devices(backend="cpu"))
    return "available host memory" + (f" / {n} CPU devices" if n > 1 else "")
  return f"{device.device_kind} memory"


def fit_message(needed: int, capacity: int, where: str, policy: str, tried: tuple) -> str:
  """The one line for a step that does not fit: needed, available, and the keys that reduce it."""
  need = f"needs {fmt_bytes(needed)}" if needed else "is refused by the compiler as too large"
  if len(tried) > 1:
    remat, fix = f"model.remat={policy}, the least of auto's {', '.join(tried)}", ""
  else:
    remat = f"model.remat={policy}"
    fix = "" if policy == REMAT_POLICIES[-1] else f", or set model.remat=auto or {REMAT_POLICIES[-1]}"
  return (
    f"the train step does not fit in memory: it {need} per device and has {fmt_bytes(capacity)} "
    f"({where}) with {remat}; lower trainer.batch_size or trainer.seq_len, or raise "
    f"trainer.gradient_accumulation{fix}"
  )


def _row(policy: str, compiled, capacity: int) -> dict:
  stats = memory_stats(compiled) or {}
  total = stats.get("total")
  return {
    "policy": policy,
    "temporaries": stats.get("temporaries"),
    "total": total,
    "flops": flops(compiled),
    "fits": total is None or total <= capacity,
  }


def compile_or_refusal(compile_fn: Callable[[], object]):
  """(compiled, None), or (None, bytes needed) when the compiler refuses a program larger than the device
  (XLA:TPU's RESOURCE_EXHAUSTED at compile time; 0 when its message gives no size). Other errors raise."""
  try:
    return compile_fn(), None
  except Exception as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    match = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", text)
    return None, int(float(match.group(1)) * 2 ** (10 * "KMGT".index(match.group(2)) + 10)) if match else 0


def _compile_checked(compile_for_policy: Callable[[str], object], policy: str, capacity: int):
  """(compiled or None, the policy's table row); a compiler refusal is a row that does not fit."""
  compiled, refused = compile_or_refusal(lambda: compile_for_policy(policy))
  if compiled is None:
    return None, {"policy": policy, "temporaries": None, "total": refused or None, "flops": None, "fits": False}
  return compiled, _row(policy, compiled, capacity)


def select_remat(
  compile_for_policy: Callable[[str], object], capacity_bytes: int, where: str = "the device", policies=REMAT_POLICIES
):
  """Compiles `policies` in order (least recomputation first) and returns the first that fits:
  (policy, compiled, table) where table has one row per compiled policy: {policy, temporaries, total,
  flops, fits} (None where the backend reports nothing; a backend that reports no memory fits).

  Raises DoesNotFitError (a one-line UserError: needed, available, the keys that reduce it) when none
  fits; it carries the table and the compiled program of the policy that needs least (None when the
  compiler refused every one). With one policy in `policies` the message speaks of model.remat=<it>, with
  several of model.remat=auto.
  """
  table, programs = [], []
  for policy in policies:
    compiled, row = _compile_checked(compile_for_policy, policy, capacity_bytes)
    table.append(row)
    programs.append(compiled)
    if row["fits"]:
      return policy, compiled, table
  known = [i for i, r in enumerate(table) if r["total"] is not None]
  least = min(known, key=lambda i: table[i]["total"]) if known else len(table) - 1
  needed = table[least]["total"] or 0
  raise DoesNotFitError(
    fit_message(needed, capacity_bytes, where, table[least]["policy"], tuple(policies)),
    needed,
    capacity_bytes,
    table,
    programs[least],
    table[least]["policy"],
  )
