r"""Ahead-of-time compile for a TPU slice, on any machine: does a config fit before you rent one?

  python -m mla_jax.compile --config=configs/mla.py --topology=v5e:2x2 \
      [--config.mesh.fsdp=-1 --config.mesh.data=1 --config.trainer.batch_size=32 ...] \
      [--decode_batch=1 --decode_length=0]

Compiles the real sharded train step (as `mla_jax.train` builds it) and the single-token decode step
with the TPU compiler for the named topology (v4, v5e, v5p, v6e: e.g. v5e:2x2, v6e:4x4, v4:2x2x1,
v5p:4x4x4) and prints the mesh, per-chip memory against the chip's HBM (FITS / DOES NOT FIT), XLA's FLOPs
per chip per step and the step time they give at the chip's bf16 peak (a lower bound). With
model.remat=auto it reports which rematerialisation policy it picked. Needs libtpu
(`pip install "jax[tpu]==<jax version>"`), no TPU; JAX runs on the CPU (JAX_PLATFORMS defaults to
cpu). Exits 1 when the train step does not fit.
"""

from __future__ import annotations

import os
import sys

# Compiling for a topology needs no local accelerator: JAX itself runs on the CPU unless told otherwise
# (with libtpu installed it would otherwise try to start a local TPU runtime).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402  (jax is imported below, after the platform is set)
from ml_collections import config_flags  # noqa: E402

from mla_jax import aot, cli  # noqa: E402


def main(argv: list[str] | None = None) -> None:
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mla.py[:arg].", lock_config=True)
  flags.DEFINE_string(
    "topology",
    None,
    "TPU topology GENERATION:AxB[xC], e.g. v5e:2x2, v6e:4x4, v4:2x2x1, "
    "v5p:4x4x4 (generations: " + ", ".join(aot.TPU_CHIPS) + ").",
  )
  flags.DEFINE_integer("decode_batch", 1, "Sequences of the compiled decode step (0: skip the decode step).")
  flags.DEFINE_integer("decode_length", 0, "Context length (cache slots) of the decode step (0: model.max_seq_len).")
  flags.mark_flags_as_required(["config", "topology"])
  cli.parse_flags(argv)
  f = flags.FLAGS
  result = {}
  cli.run(lambda: result.update(report=aot.run(f.config, f.topology, f.decode_batch, f.decode_length)))
  if not result["report"].fits:
    sys.exit(1)


if __name__ == "__main__":
  main()
