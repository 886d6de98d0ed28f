r"""Text generation from a training workdir, with decode caches.

  python -m mla_jax.generate --workdir=runs/mla --prompt="def " [--max_new_tokens=200 --temperature=0.8
      --top_k=40 --top_p=1.0 --seed=0 --batch=1 --max_len=0 --mla_decode=absorbed]
  python -m mla_jax.generate --config=configs/mla.py --report_cache [--length=2048 --batch=1]

Loads the latest checkpoint's parameters (and non-trainable model state) into targets built with
`jax.eval_shape`, using the config stored with the checkpoint (or --config). The prompt is prefilled in
one call (jitted once per prompt shape); then a jitted single-token step with fixed shapes (token [B, 1],
scalar position, caches preallocated to the final length and donated) runs once per new token. It
compiles once before the loop and is reused for every token, so tokens stream to stdout as they are
sampled. Temperature 0 or top_k 1 is greedy and deterministic; sampling is deterministic per --seed.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mla_jax import cache as cache_lib
from mla_jax import cli
from mla_jax.decode import generate_text, report_cache
from mla_jax.errors import UserError


def main(argv: list[str] | None = None) -> None:
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file; with --workdir it replaces the config stored "
    "with the checkpoint (its model must match the saved parameters).",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Training workdir whose latest checkpoint is loaded.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 40, "Keep the k most likely tokens (0: all; 1: greedy).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch", 1, "Sequences generated together from the same prompt.")
  flags.DEFINE_integer("max_len", 0, "Maximum prompt + generated length (0: model.max_seq_len).")
  flags.DEFINE_enum(
    "mla_decode",
    "absorbed",
    list(cache_lib.MLA_DECODE_MODES),
    "MLA decode: absorbed (latent attention) or expanded (rebuild K/V, the reference).",
  )
  flags.DEFINE_bool("report_cache", False, "Print the decode-cache size table for --config and exit.")
  flags.DEFINE_integer("length", 2048, "Sequence length for --report_cache.")
  cli.parse_flags(argv)
  f = flags.FLAGS

  def go():
    if f.report_cache:
      if f.config is None:
        raise UserError("--report_cache needs --config")
      report_cache(f.config, f.length, f.batch)
      return
    if not f.workdir:
      raise UserError("--workdir is required (or --config with --report_cache)")
    generate_text(
      f.workdir,
      f.prompt,
      f.max_new_tokens,
      f.temperature,
      f.top_k,
      f.top_p,
      f.seed,
      f.batch,
      f.max_len,
      f.mla_decode,
      f.config,
    )

  cli.run(go)


if __name__ == "__main__":
  main()
