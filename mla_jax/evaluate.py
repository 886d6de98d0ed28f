r"""Validation loss, perplexity and bits per byte of a training workdir's newest checkpoint.

  python -m mla_jax.evaluate --workdir=runs/mla [--data=PATH] [--batches=N] [--json=PATH]

Without --data the held-out split of the run's own data config is evaluated, in the batches the
training loop evaluates (the same windows, batch size and sequence length), so the loss equals the
run's last validation loss. With --data the whole file or folder (every file in it) is the evaluation
data. --batches caps the number of batches (default: trainer.eval_steps, or every window when that is 0;
0: every window). Bits per byte = total nats / ln 2 / the UTF-8 bytes the evaluated target tokens decode
to (for the byte tokenizer: the non-EOS targets). Prints a table and writes JSON (default
<workdir>/eval.json).
"""

from __future__ import annotations

from absl import flags

from mla_jax import cli
from mla_jax.errors import UserError
from mla_jax.evaluation import evaluate_workdir


def main(argv: list[str] | None = None) -> None:
  flags.DEFINE_string("workdir", None, "Training workdir whose newest checkpoint is evaluated.")
  flags.DEFINE_string(
    "data", None, "Text file, folder or token file evaluated whole (default: the run's held-out split)."
  )
  flags.DEFINE_integer("batches", None, "Batches to evaluate (default: trainer.eval_steps; 0: all).")
  flags.DEFINE_string("json", None, "Where to write the results (default: <workdir>/eval.json).")
  cli.parse_flags(argv)
  f = flags.FLAGS

  def go():
    if not f.workdir:
      raise UserError("--workdir is required")
    evaluate_workdir(f.workdir, f.data, f.batches, f.json)

  cli.run(go)


if __name__ == "__main__":
  main()
