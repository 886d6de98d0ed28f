r"""Import weights from elsewhere into a workdir that `mla_jax.generate`, `mla_jax.evaluate` and training use.

  python -m mla_jax.convert --hf=PATH --workdir=OUT
  python -m mla_jax.convert --seed=CHECKPOINT --seed_yaml=model.yaml --workdir=OUT

`--hf` reads a Hugging Face DeepSeek-V2/V3 or Mamba2 folder (`mla_jax.hf`: exact, or refused naming the
feature); `--seed` reads a seed-trainer checkpoint with its YAML (`mla_jax.seed_checkpoint`). The workdir
gets a step-0 checkpoint; a `tokenizer.json` beside the weights is copied into it, otherwise the byte
tokenizer is used. `from_hf` and `to_hf` are importable from here too (the public API).
"""

from __future__ import annotations

from absl import flags

from mla_jax import cli
from mla_jax.errors import UserError
from mla_jax.hf import from_hf, to_hf  # noqa: F401  # the public API: mla_jax.convert.from_hf / to_hf
from mla_jax.workdir import write_from_hf, write_from_seed


def main(argv: list[str] | None = None) -> None:
  flags.DEFINE_string("hf", None, "Hugging Face model folder (config.json + *.safetensors).")
  flags.DEFINE_string("seed", None, "Seed-trainer checkpoint: a .safetensors file or its checkpoint folder.")
  flags.DEFINE_string("seed_yaml", None, "The seed-trainer YAML the --seed checkpoint was trained with.")
  flags.DEFINE_string("tokenizer", None, "tokenizer.json for a --seed checkpoint (default: the byte tokenizer).")
  flags.DEFINE_string("workdir", None, "Workdir to create with the converted step-0 checkpoint.")
  cli.parse_flags(argv)
  f = flags.FLAGS

  def go():
    if not f.workdir or bool(f.hf) == bool(f.seed):
      raise UserError("give --workdir and one of --hf or --seed (with --seed_yaml)")
    if f.seed:
      if not f.seed_yaml:
        raise UserError("--seed needs --seed_yaml: the checkpoint folder's config.json lacks rope_theta and kv_heads")
      write_from_seed(f.seed, f.seed_yaml, f.workdir, f.tokenizer)
    else:
      write_from_hf(f.hf, f.workdir)

  cli.run(go)


if __name__ == "__main__":
  main()
