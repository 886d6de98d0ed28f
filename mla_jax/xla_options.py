"""XLA:CPU compiler options per executable, chosen by measurement (benchmarks/xla_cpu_options.py).

XLA:CPU hands some operations to YNNPACK (`xla_cpu_experimental_ynn_fusion_type`). By default that is
every dot plus fusions of reductions and elementwise work around them. On a 2-core CPU (results in
benchmarks/results/xla_cpu_options.md) those fusions slowed the train steps of the models with Mamba2
or MoE layers (the SSD's chunk reductions, the MoE block loop) by 6-19%, and YNNPACK's small-N dots made
MLA's batch-1 decode step (the absorbed latent attention over the cache, N = heads) 8-12% slower than
XLA's own kernels; dense attention models trained as fast or faster with the default, and GQA decoded
faster with it. So:

  whole sequences (`"sequence"`: train, evaluation, prefill)   YNNPACK for individual dots only when the
                                                                model has Mamba2 or MoE layers
  one-token decode (`"decode"`)                                 no YNNPACK when the model has MLA layers

and XLA's default everywhere else. The options go to `jax.jit(..., compiler_options=...)` of that
executable only. They apply to CPU targets only, when this jaxlib knows the option, and never override an
`--xla_cpu_experimental_ynn_fusion_type` given in XLA_FLAGS.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from mla_jax.config import ModelConfig

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
DOTS_ONLY = {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
NO_YNN = {YNN_FUSION_TYPE: ""}
PURPOSES = ("sequence", "decode")


@functools.cache
def _supported() -> bool:
  """Whether this jaxlib's CPU compiler accepts the option (older ones do not know YNNPACK)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=NO_YNN).lower(jnp.zeros((), jnp.float32)).compile()
  except Exception:  # an unknown option fails the compile with INVALID_ARGUMENT
    return False
  return True


def mesh_platform(mesh) -> str:
  """The platform of a mesh's devices: 'tpu' for a TPU topology compiled from a CPU host."""
  return mesh.devices.flat[0].platform


def compiler_options(cfg: ModelConfig, purpose: str, platform: str | None = None) -> dict[str, str] | None:
  """`compiler_options` for jax.jit of a `purpose` executable of this model on `platform` (default: JAX's
  default backend); None where nothing is set."""
  if purpose not in PURPOSES:
    raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
  if (platform or jax.default_backend()) != "cpu" or YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
    return None
  if not _supported():
    return None
  if purpose == "decode":
    has_mla = any(cfg.mixer_kind(i) == "mla" for i in range(cfg.num_layers))
    return dict(NO_YNN) if has_mla else None
  has_mamba_or_moe = any(cfg.mixer_kind(i) == "mamba2" or cfg.ffn_kind(i) == "moe" for i in range(cfg.num_layers))
  return dict(DOTS_ONLY) if has_mamba_or_moe else None
