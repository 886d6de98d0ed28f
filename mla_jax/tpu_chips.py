"""TPU generations: the HBM one program may use and the dense bf16 peak per chip, and their topology names;
and the dense bf16 peak of common GPUs, for MFU."""

from __future__ import annotations

import dataclasses

import jax

from mla_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: nominal HBM and dense bf16 peak per chip, and how libtpu names its topologies."""

  name: str
  device_kinds: tuple[str, ...]  # jax Device.device_kind values
  hbm_bytes: int
  bf16_flops: float  # peak FLOP/s per chip
  dims: int  # topology dimensions (2: AxB, 3: AxBxC)
  chip_config: str  # get_topology_desc's chip_config_name: one device per chip
  host_bounds: tuple[int, int, int]  # chips per host of a multi-host slice


# Peak bf16 FLOP/s per chip: cloud.google.com/tpu/docs/system-architecture-tpu-vm. HBM is what XLA:TPU
# lets one program use (it refuses larger programs at compile time), a little under the nominal 32 / 16 /
# 95 / 32 GiB. v4 and v5p have two TensorCores per chip, presented as one device ("megacore") as on their VMs.
TPU_CHIPS = {
  "v4": Chip("v4", ("TPU v4",), int(30.75 * GiB), 275e12, 3, "megacore", (2, 2, 1)),
  "v5e": Chip("v5e", ("TPU v5 lite", "TPU v5e"), int(15.75 * GiB), 197e12, 2, "default", (2, 2, 1)),
  "v5p": Chip("v5p", ("TPU v5", "TPU v5p"), int(95.74 * GiB), 459e12, 3, "default", (2, 2, 1)),
  "v6e": Chip("v6e", ("TPU v6 lite", "TPU v6e"), int(31.25 * GiB), 918e12, 2, "default", (2, 2, 1)),
}


def chip_for_device(device: jax.Device) -> Chip:
  for chip in TPU_CHIPS.values():
    if device.device_kind in chip.device_kinds:
      return chip
  raise UserError(
    f"unknown TPU device kind {device.device_kind!r} (known: "
    f"{', '.join(k for c in TPU_CHIPS.values() for k in c.device_kinds)})"
  )


# Dense bf16 tensor-core peak FLOP/s (vendor data sheets; SXM parts), by a substring of Device.device_kind.
GPU_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_bf16_flops(device: jax.Device) -> float | None:
  """The device's dense bf16 peak FLOP/s, or None when unknown (CPUs, unlisted GPUs)."""
  if device.platform == "tpu":
    return next((c.bf16_flops for c in TPU_CHIPS.values() if device.device_kind in c.device_kinds), None)
  if device.platform == "gpu":
    return next((f for name, f in GPU_BF16_FLOPS.items() if name in device.device_kind), None)
  return None
