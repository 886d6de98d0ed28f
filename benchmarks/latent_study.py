r"""Latent-size study: validation loss against KV-cache bytes per token for MHA, GQA and MLA.

  python -m benchmarks.latent_study             # 7 runs, ~45 min on 2 CPU cores -> benchmarks/results/
  python -m benchmarks.latent_study --ablation  # 2 more MLA runs at d_c 192 (d_rope 64; no q compression)
  python -m benchmarks.latent_study --steps 2000 --layers 8 --latents 64,128,192,256,384
  python -m benchmarks.latent_study --steps 3 --eval_steps 1 --no_write   # a smoke run

Every variant is the seed's "Standalone MLA" model (configs/mla.py: hidden 512, 8 heads of 64,
intermediate 2048, q_latent_dim 192, d_rope 16) at a CPU-sized depth, trained by the real loop
(`mla_jax.trainer.train_and_evaluate`) for the same tokens in the same order from the same seed on the
embedded corpus, and evaluated on the same held-out batches. Only the attention changes:

  MHA            kv_heads = num_heads           cache 2 x heads x head_dim values per token per layer
  GQA            kv_heads = 4 (the seed's)      cache 2 x kv_heads x head_dim
  MLA (d_c)      kv_latent_dim = d_c            cache d_c + d_rope (DeepSeek-V2 Table 1)

One baseline is trained again from a second seed, so differences can be read against run-to-run noise.
Cache bytes are for bfloat16 (2 bytes a value), summed over layers. The seed guide's compression
column is hidden_size / kv_latent_dim, from its formula 2 x layers x seq_len x kv_latent_dim; the table
prints it beside the measured ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import jax

from benchmarks.common import RESULTS, machine_lines, train_quietly, write_lines
from configs import mla as mla_config
from mla_jax import cache as cache_lib
from mla_jax.config import ModelConfig, validate
from mla_jax.model import count_params, init_params

BYTES_PER_VALUE = 2  # bfloat16 cache
BYTE_VOCAB = 320


def variants(latents: list[int], gqa_heads: int, num_heads: int) -> list[dict]:
  out = [
    {"name": f"MHA ({num_heads} kv heads)", "kind": "mha", "kv_heads": num_heads, "seed": 0},
    {"name": f"GQA ({gqa_heads} kv heads)", "kind": "gqa", "kv_heads": gqa_heads, "seed": 0},
  ]
  out += [{"name": f"MLA d_c {c}", "kind": "mla", "kv_latent_dim": c, "seed": 0} for c in latents]
  out.append({"name": f"GQA ({gqa_heads} kv heads), seed 1", "kind": "gqa", "kv_heads": gqa_heads, "seed": 1})
  return out


# --ablation: what makes MLA differ from GQA at this budget, at the seed's kv_latent_dim 192.
ABLATIONS = [
  {"name": "MLA d_c 192, d_rope 64", "kind": "mla", "kv_latent_dim": 192, "d_rope": 64, "seed": 0},
  {"name": "MLA d_c 192, no query compression", "kind": "mla", "kv_latent_dim": 192, "q_latent_dim": 0, "seed": 0},
]


def make_config(v: dict, args) -> ml_collections.ConfigDict:  # noqa: F821
  config = mla_config.get_config()
  mla_config.apply_quick(config, args.steps, args.learning_rate)
  m, t = config.model, config.trainer
  m.name = v["name"]
  m.num_layers = args.layers
  if v["kind"] == "mla":
    m.kv_latent_dim = v["kv_latent_dim"]
    m.d_rope = v.get("d_rope", m.d_rope)
    m.q_latent_dim = v.get("q_latent_dim", m.q_latent_dim)
  else:
    m.kv_latent_dim, m.q_latent_dim, m.d_rope = 0, 0, 0
    m.kv_heads = v["kv_heads"]
  t.batch_size, t.seq_len = args.batch, args.seq_len
  t.seed = v["seed"]
  t.eval_interval = args.steps
  t.eval_steps = args.eval_steps
  t.log_interval = max(1, args.steps // 10)
  t.save_interval = args.steps
  config.sample.max_new_tokens = 0
  validate(config)
  return config


def run_variant(v: dict, args, workroot: str) -> dict:
  config = make_config(v, args)
  cfg = ModelConfig.from_config(config, BYTE_VOCAB)
  params, _ = init_params(cfg, jax.random.PRNGKey(0), 8)
  counts = count_params(cfg, params)
  per_token = sum(cache_lib.values_per_token(cfg, i) for i in range(cfg.num_layers)) * BYTES_PER_VALUE
  workdir = os.path.join(workroot, "".join(ch if ch.isalnum() else "_" for ch in v["name"]))
  final, seconds, tok_s = train_quietly(config, workdir)
  return {
    **v,
    "params": counts["total"],
    "attention_params": counts.get("attention", 0),
    "cache_bytes_per_token": per_token,
    "val_loss": final["val_loss"],
    "train_loss": final["loss"],
    "seconds": seconds,
    "tokens_per_s": tok_s,
  }


def plot(rows: list[dict], path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {"mha": "tab:red", "gqa": "tab:blue", "mla": "tab:green"}
  for r in rows:
    marker = "x" if r["seed"] else "o"
    ax.scatter(r["cache_bytes_per_token"] / 1024, r["val_loss"], color=colors[r["kind"]], marker=marker, s=50)
    ax.annotate(
      r["name"],
      (r["cache_bytes_per_token"] / 1024, r["val_loss"]),
      fontsize=8,
      xytext=(5, 3),
      textcoords="offset points",
    )
  mla_rows = sorted((r for r in rows if r["kind"] == "mla"), key=lambda r: r["cache_bytes_per_token"])
  ax.plot(
    [r["cache_bytes_per_token"] / 1024 for r in mla_rows],
    [r["val_loss"] for r in mla_rows],
    color=colors["mla"],
    alpha=0.5,
  )
  ax.set_xscale("log", base=2)
  ax.set_xlabel("KV cache per token, all layers (KiB, bfloat16)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(rows: list[dict], args, hidden: int, layers: int) -> list[dict]:
  mha = next(r for r in rows if r["kind"] == "mha")
  gqa = next(r for r in rows if r["kind"] == "gqa" and r["seed"] == 0)
  lines = [
    "| variant | cache B/token | vs MHA | vs GQA | seed guide's ratio | params | val loss | "
    "Δ vs GQA | Δ vs MHA | train loss | tokens/s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    guide = f"{hidden / r['kv_latent_dim']:.1f}x" if r["kind"] == "mla" else "-"
    lines.append(
      f"| {r['name']} | {r['cache_bytes_per_token']:,} | "
      f"{mha['cache_bytes_per_token'] / r['cache_bytes_per_token']:.1f}x | "
      f"{gqa['cache_bytes_per_token'] / r['cache_bytes_per_token']:.2f}x | {guide} | "
      f"{r['params'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['val_loss'] - gqa['val_loss']:+.4f} | "
      f"{r['val_loss'] - mha['val_loss']:+.4f} | {r['train_loss']:.4f} | {r['tokens_per_s']:,.0f} |"
    )
  return lines


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.latent_study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--latents", default="64,128,192,256")
  parser.add_argument("--gqa_heads", type=int, default=4)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--steps", type=int, default=160)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--eval_steps", type=int, default=32)
  parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
  parser.add_argument(
    "--ablation",
    action="store_true",
    help="train the ABLATIONS variants and compare them with the rows of the last full study "
    "(benchmarks/results/latent_study.json, same settings) -> latent_study_ablation.md",
  )
  parser.add_argument("--no_write", action="store_true")
  args = parser.parse_args(argv)

  base = mla_config.get_config().model
  if args.ablation:
    return ablation(args, base)
  runs = variants([int(c) for c in args.latents.split(",")], args.gqa_heads, base.num_heads)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    workroot = args.workdir or tmp
    for v in runs:
      r = run_variant(v, args, workroot)
      rows.append(r)
      print(
        f"{r['name']:32s} cache {r['cache_bytes_per_token']:6,} B/token  val loss {r['val_loss']:.4f}  "
        f"train loss {r['train_loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s  {r['seconds']:.0f}s",
        flush=True,
      )

  setup = describe(args, base)
  lines = table(rows, args, base.hidden_size, args.layers)
  noise = abs(rows[-1]["val_loss"] - next(r for r in rows if r["kind"] == "gqa")["val_loss"])
  print("\n".join(lines))
  if args.no_write:
    return
  png = RESULTS / "latent_study.png"
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "latent_study.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
  tokens = args.steps * args.batch * args.seq_len
  plot(rows, png, f"{args.layers} layers, hidden {base.hidden_size}, {tokens / 1e6:.2f}M tokens")
  body = [
    "# Latent-size study: validation loss against KV cache",
    "",
    *machine_lines(),
    "",
    setup + ".",
    "",
    "Cache B/token: bytes cached per token for one sequence, all layers, bfloat16. 'vs MHA' and "
    "'vs GQA' are the measured compression ratios; the seed guide's ratio is hidden_size / "
    "kv_latent_dim. Δ: validation loss minus the baseline's (negative is better). Run-to-run "
    f"noise: the GQA baseline from a second seed differs by {noise:.4f}.",
    "",
    *lines,
    "",
    f"![validation loss against cache bytes]({png.name})",
    "",
    *quality_verdicts(rows, noise),
    "",
    *guide_table(base.d_rope),
  ]
  write_lines(RESULTS / "latent_study.md", body)
  print(f"wrote {png}")


def ablation(args, base) -> None:
  study = json.loads((RESULTS / "latent_study.json").read_text())
  setup = describe(args, base)
  if study["setup"] != setup:
    sys.exit(f"the saved study ran with other settings:\n  {study['setup']}\nthis run:\n  {setup}")
  keep = [r for r in study["rows"] if r["kind"] != "mla" or r["kv_latent_dim"] == 192]
  with tempfile.TemporaryDirectory() as tmp:
    rows = keep[:-1] + [run_variant(v, args, args.workdir or tmp) for v in ABLATIONS] + keep[-1:]
  lines = table(rows, args, base.hidden_size, args.layers)
  print("\n".join(lines))
  if args.no_write:
    return
  body = [
    "# Latent-size study, ablation at kv_latent_dim 192",
    "",
    *machine_lines(),
    "",
    setup + ".",
    "",
    "The MHA, GQA and 'MLA d_c 192' rows are the full study's (latent_study.md, same settings and data "
    "order); the others are trained now. 'd_rope 64' gives the decoupled RoPE part the width of a GQA "
    "head; 'no query compression' projects the query straight from the input (q_latent_dim 0).",
    "",
    *lines,
  ]
  write_lines(RESULTS / "latent_study_ablation.md", body)


def describe(args, base) -> str:
  hidden = base.hidden_size
  tokens = args.steps * args.batch * args.seq_len
  return (
    f"hidden {hidden}, {args.layers} layers, {base.num_heads} heads of {hidden // base.num_heads}, "
    f"SwiGLU {base.intermediate_size}; MLA q_latent_dim {base.q_latent_dim}, d_rope {base.d_rope}; "
    f"{args.steps} steps of {args.batch} x {args.seq_len} tokens ({tokens / 1e6:.2f}M tokens), AdamW "
    f"lr {args.learning_rate} (warmup {args.steps // 8}, cosine), byte tokenizer, embedded corpus "
    f"(Python standard library, held-out files); validation loss over {args.eval_steps} batches "
    f"({args.eval_steps * args.batch * args.seq_len:,} tokens)"
  )


def quality_verdicts(rows: list[dict], noise: float) -> list[str]:
  """The seed guide says MLA quality is "slightly lower" than standard attention: each MLA row, read
  against the MHA row and the seed-to-seed spread."""
  mha = next(r for r in rows if r["kind"] == "mha")
  out = ['## The seed guide\'s quality claim ("Quality: slightly lower") against this run', ""]
  for r in rows:
    if r["kind"] != "mla":
      continue
    delta = r["val_loss"] - mha["val_loss"]
    verdict = (
      "within the seed-to-seed spread"
      if abs(delta) <= noise
      else "lower loss than MHA"
      if delta < 0
      else "higher loss than MHA"
    )
    out.append(
      f"- {r['name']}: {delta:+.4f} nats vs MHA ({verdict}, spread {noise:.4f}) with "
      f"{mha['cache_bytes_per_token'] / r['cache_bytes_per_token']:.1f}x less cache"
    )
  return out


def guide_table(d_rope: int) -> list[str]:
  """The seed guide's compression examples recomputed: its formula caches 2 x kv_latent_dim per token
  per layer against 2 x hidden_size for standard attention, but MLA caches c_kv once (K and V both come
  from it) plus the shared RoPE key, kv_latent_dim + d_rope values."""
  out = [
    "## The seed guide's compression table, recomputed",
    "",
    f"MLA caches kv_latent_dim + d_rope values per token per layer (d_rope {d_rope} here, as in the seed "
    "configs); standard multi-head attention caches 2 x hidden_size.",
    "",
    "| hidden_size | kv_latent_dim | guide says | MLA values/token/layer | MHA values/token/layer | "
    "real compression vs MHA |",
    "|---:|---:|---:|---:|---:|---:|",
  ]
  for hidden, latent in ((512, 192), (512, 256), (768, 256), (1024, 384)):
    mla, mha = latent + d_rope, 2 * hidden
    out.append(f"| {hidden} | {latent} | {hidden / latent:.1f}x | {mla} | {mha} | {mha / mla:.1f}x |")
  return out


if __name__ == "__main__":
  main()
