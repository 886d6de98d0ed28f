r"""Training entry point.

  python -m mla_jax.train --config=configs/hybrid.py --workdir=runs/hybrid \
      [--config.trainer.max_steps=200 --config.model.kv_latent_dim=256 ...]

Prints a one-line config summary (every key goes to <workdir>/config.json), the parameter count and the
FLOPs per step, compiles the step once, shows progress (loss, tokens/s, ETA; every log_interval steps
and at least every 30 s), writes metrics.jsonl, evaluates periodically, saves orbax checkpoints
every `trainer.save_interval` steps and at the end, and finishes with a loss-curve PNG and sample text.
A workdir that already holds checkpoints resumes from the newest readable one (see checkpoint.py); one
that holds the final checkpoint says the run is complete and exits without compiling.
SIGTERM or SIGINT says at once that it finishes the current step and saves, then does so, prints the
command that resumes and exits with 128 + the signal number; a second SIGINT exits at once without saving.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from mla_jax import cli, distributed, preemption, trainer


def main(argv: list[str] | None = None) -> None:
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/hybrid.py[:arg].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
  flags.mark_flags_as_required(["config", "workdir"])
  distributed.define_flags()
  cli.parse_flags(argv)
  argv = list(sys.argv[1:] if argv is None else argv[1:])
  result = {}
  cli.run(
    lambda: (
      distributed.initialize_from_flags(),
      result.update(trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, argv=argv)),
    )
  )
  if result.get("stopped_by"):
    sys.exit(preemption.exit_code(result["stopped_by"]))


if __name__ == "__main__":
  main()
