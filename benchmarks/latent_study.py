r"""Latent study v2: validation loss against KV-cache bytes per token for MHA, GQA, partial RoPE and MLA,
over several seeds, with 95% intervals and differences against MHA paired by seed.

  python -m benchmarks.latent_study                 # 11 variants x 3 seeds on CPU -> benchmarks/results/
  python -m benchmarks.latent_study --preset gpu    # the same study, larger model and budget, one accelerator
  python -m benchmarks.latent_study --steps 3 --seeds 2 --val_tokens 8192 --variants mha,mla192 --no_write  # smoke
  python -m benchmarks.latent_study --variants mha,mla192 --seeds 5 --workdir runs/latent   # a subset, kept

Default cost (--preset cpu: 33 trainings of 128 steps x 8 x 256 tokens, each followed by the 1M-token
evaluation): the committed run took 79.8 min of wall time on this 2-core machine (145 s a training plus
evaluation, about 60 s of it training; load average 0.5-2 from light work beside it), under the 2 hours
the study is sized for; a machine busy with other work stretches it to 2-3 h. --val_tokens and --steps
trade it. --preset gpu (33 runs of 1000 steps x 32 x 512 tokens, 16.4M tokens each, a 34M-parameter model)
was not measured here; the study prints and records its wall time.

Every variant has 8 heads of head_dim 64, the same SwiGLU MLP, embeddings and depth; only the attention
changes (the list is VARIANTS, in that order):

  MHA                   8 kv heads                      cache 2 x 8 x 64 values per token per layer
  GQA                   4 kv heads                      cache 2 x 4 x 64
  MHA, partial RoPE     model.rope_dim 16 or 32 of 64   cache as MHA (the control for MLA's narrow RoPE part)
  MLA d_c               kv_latent_dim d_c, d_rope 16    cache d_c + d_rope (DeepSeek-V2 Table 1)
  MLA d_rope            d_c 192 with d_rope 32 or 64
  MLA no q compression  d_c 192, d_rope 16, q_latent_dim 0

Each (variant, seed) trains with the real loop (`benchmarks.common.train_quietly` ->
`mla_jax.trainer.train_and_evaluate`); trainer.seed = seed sets both the initialisation and the data order,
so seed s of every variant sees the same batches. The trainer does not evaluate (eval_steps 0): the study
restores the final checkpoint (`mla_jax.workdir.load`) and evaluates it on one fixed held-out set, the same
for every run: `--val_tokens` targets (default 1,048,576) in windows of seq_len + 1 tokens whose starts are
spread evenly over the whole validation token stream (data.val_fraction 0.1: 64 held-out files, 1.41M
tokens, under Python 3.11; every window when the split holds fewer). The smoothed train loss is the mean
of the train losses logged over the last 10% of steps.

Per variant the results give the mean validation loss over seeds with its 95% t interval (mean +-
t_{0.975, n-1} sd / sqrt(n)), and the difference against MHA paired by seed (the mean of the per-seed
differences +- its own t interval), significant when that interval excludes 0. Cache bytes are for
bfloat16 (2 bytes a value), summed over layers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import RESULTS, machine_lines, train_quietly, write_lines
from configs import mla as mla_config
from mla_jax import cache as cache_lib
from mla_jax import workdir as workdir_lib
from mla_jax.config import validate
from mla_jax.data import load_corpus, load_tokenizer
from mla_jax.model import LanguageModel, count_params
from mla_jax.train_step import evaluation_totals, make_eval_step

BYTES_PER_VALUE = 2  # bfloat16 cache
NUM_HEADS, HEAD_DIM = 8, 64
VAL_FRACTION = 0.1
SMOOTH_SHARE = 0.1  # the smoothed train loss averages the logged losses of the last 10% of steps

# Overridable by flags; `None` flags take the preset's value.
PRESETS = {
  "cpu": {
    "hidden": 256,
    "layers": 2,
    "intermediate": 512,
    "q_latent": 192,
    "seq_len": 256,
    "batch": 8,
    "steps": 128,
    "learning_rate": 1e-3,
    "log_interval": 1,
    "val_tokens": 1 << 20,
    "eval_batch": 16,  # on 2 CPU cores 16 rows evaluate ~8% faster per token than 64
    "seeds": 3,
  },
  "gpu": {
    "hidden": 512,
    "layers": 8,
    "intermediate": 2048,
    "q_latent": 192,
    "seq_len": 512,
    "batch": 32,
    "steps": 1000,
    "learning_rate": 1e-3,
    "log_interval": 5,
    "val_tokens": 1 << 20,
    "eval_batch": 64,
    "seeds": 3,
  },
}

MHA_FAMILY, GQA_FAMILY, MLA_FAMILY = "MHA / partial RoPE", "GQA", "MLA"
VARIANTS = (
  {"key": "mha", "name": "MHA (8 kv heads)", "family": MHA_FAMILY, "kv_heads": 8},
  {"key": "gqa4", "name": "GQA (4 kv heads)", "family": GQA_FAMILY, "kv_heads": 4},
  {"key": "mha_rope16", "name": "MHA, RoPE on 16 of 64 dims", "family": MHA_FAMILY, "kv_heads": 8, "rope_dim": 16},
  {"key": "mha_rope32", "name": "MHA, RoPE on 32 of 64 dims", "family": MHA_FAMILY, "kv_heads": 8, "rope_dim": 32},
  *(
    {"key": f"mla{c}", "name": f"MLA d_c {c}", "family": MLA_FAMILY, "kv_latent_dim": c, "d_rope": 16}
    for c in (64, 128, 192, 256)
  ),
  *(
    {
      "key": f"mla192_rope{r}",
      "name": f"MLA d_c 192, d_rope {r}",
      "family": MLA_FAMILY,
      "kv_latent_dim": 192,
      "d_rope": r,
    }
    for r in (32, 64)
  ),
  {
    "key": "mla192_noq",
    "name": "MLA d_c 192, no q compression",
    "family": MLA_FAMILY,
    "kv_latent_dim": 192,
    "d_rope": 16,
    "q_latent_dim": 0,
  },
)
BASELINE = "mha"
SWEEP = ("mla64", "mla128", "mla192", "mla256")  # kv_latent_dim at d_rope 16, joined in the plot
PLOT_MARKERS = {
  "mha_rope16": "s",
  "mha_rope32": "D",
  "mla64": "<",
  "mla128": "o",
  "mla192": "s",
  "mla256": ">",
  "mla192_rope32": "^",
  "mla192_rope64": "v",
  "mla192_noq": "P",
}
# The partial-RoPE control: each MLA variant against the MHA variant that rotates as many dims of a head.
ROPE_CONTROLS = (("mla192", "mha_rope16"), ("mla192_rope32", "mha_rope32"))

# t_{0.975, dof} for dof 1..30 (two-sided 95%), to three decimals.
T_975 = (
  12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
  2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
  2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
  """The 97.5% quantile of Student's t with `dof` degrees of freedom (nan for dof < 1). Beyond the table,
  the Cornish-Fisher expansion around the normal quantile (within 1e-4 of the exact value from dof 30)."""
  if dof < 1:
    return float("nan")
  if dof <= len(T_975):
    return T_975[dof - 1]
  z = 1.959964
  return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def interval(values) -> dict:
  """Mean, sample sd (n - 1) and the 95% t half-width of `values` (nan sd and half-width for one value)."""
  x = np.asarray(values, np.float64)
  n = len(x)
  mean = float(x.mean()) if n else float("nan")
  sd = float(x.std(ddof=1)) if n > 1 else float("nan")
  half = t_quantile_975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
  return {"n": n, "mean": mean, "sd": sd, "half": half, "low": mean - half, "high": mean + half}


def paired(values: dict, baseline: dict) -> dict:
  """The interval of values[seed] - baseline[seed] over the seeds both have; `significant` when the 95%
  interval excludes 0 (None when it cannot be computed)."""
  seeds = sorted(set(values) & set(baseline))
  out = interval([values[s] - baseline[s] for s in seeds])
  out["seeds"] = seeds
  out["significant"] = None if math.isnan(out["half"]) else bool(out["low"] > 0 or out["high"] < 0)
  return out


def options(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.latent_study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model size and budget (default cpu)")
  parser.add_argument("--seeds", type=int, help="seeds per variant (0, 1, ...); preset: 3")
  parser.add_argument(
    "--variants",
    default="",
    help="comma-separated keys of VARIANTS (default: all); " + ", ".join(v["key"] for v in VARIANTS),
  )
  for flag, kind in (
    ("steps", int),
    ("layers", int),
    ("hidden", int),
    ("intermediate", int),
    ("q_latent", int),
    ("seq_len", int),
    ("batch", int),
    ("learning_rate", float),
    ("log_interval", int),
    ("val_tokens", int),
    ("eval_batch", int),
  ):
    parser.add_argument(f"--{flag}", type=kind, help="default: the preset's")
  parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder, removed)")
  parser.add_argument("--results_dir", default=str(RESULTS), help="where the .md, .json and .png go")
  parser.add_argument("--no_write", action="store_true", help="print the tables only")
  args = parser.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.seeds < 1:
    parser.error("--seeds must be >= 1")
  known = {v["key"] for v in VARIANTS}
  chosen = [k for k in args.variants.split(",") if k] or [v["key"] for v in VARIANTS]
  unknown = sorted(set(chosen) - known)
  if unknown:
    parser.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
  args.variant_list = [v for v in VARIANTS if v["key"] in chosen]
  return args


def make_config(v: dict, args, seed: int):
  config = mla_config.get_config()
  mla_config.apply_quick(config, args.steps, args.learning_rate, args.batch, args.seq_len)
  m, t = config.model, config.trainer
  m.name = v["key"]
  m.hidden_size, m.num_layers, m.intermediate_size = args.hidden, args.layers, args.intermediate
  m.num_heads, m.head_dim = NUM_HEADS, HEAD_DIM
  if "kv_latent_dim" in v:
    m.kv_latent_dim, m.d_rope = v["kv_latent_dim"], v["d_rope"]
    m.q_latent_dim = v.get("q_latent_dim", args.q_latent)
  else:
    m.kv_latent_dim, m.q_latent_dim, m.d_rope = 0, 0, 0
    m.kv_heads = v["kv_heads"]
    if "rope_dim" in v:
      m.rope_dim = v["rope_dim"]
  config.data.val_fraction = VAL_FRACTION
  t.seed = seed
  t.eval_steps = 0  # the study evaluates the final checkpoint itself
  t.eval_interval = t.save_interval = args.steps
  t.log_interval = args.log_interval
  t.max_checkpoints = 1
  config.sample.max_new_tokens = 0
  validate(config)
  return config


def validation_windows(tokens: np.ndarray, seq_len: int, val_tokens: int) -> np.ndarray:
  """[windows, seq_len + 1] int32: val_tokens // seq_len windows with starts spread evenly from the first
  token to the last window's place (neighbours share at most one token); every window, one after another,
  when the split holds fewer."""
  n, fit = max(1, val_tokens // seq_len), (len(tokens) - 1) // seq_len
  if fit < 1:
    raise SystemExit(f"the validation split holds {len(tokens):,} tokens, too few for one window of {seq_len + 1}")
  if n >= fit:
    starts = np.arange(fit, dtype=np.int64) * seq_len
  else:
    starts = np.round(np.linspace(0, len(tokens) - seq_len - 1, n)).astype(np.int64)
  return np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)


def smoothed_train_loss(workdir: str, steps: int) -> tuple[float, int]:
  """Mean of the logged train losses whose step is in the last 10% of `steps` (the last logged loss when
  none is), and how many it averaged."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logs = [json.loads(line) for line in f]
  losses = [(r["step"], r["loss"]) for r in logs if "loss" in r]
  first = steps - max(1, math.ceil(steps * SMOOTH_SHARE))
  tail = [loss for step, loss in losses if step > first] or [losses[-1][1]]
  return float(np.mean(tail)), len(tail)


def evaluate(workdir: str, batches: list[dict]) -> tuple[dict, dict]:
  """(totals over `batches`, parameter counts) of the newest checkpoint in `workdir`."""
  loaded = workdir_lib.load(workdir)
  model_state = {k: v for k, v in loaded.variables.items() if k != "params"}
  eval_step = make_eval_step(LanguageModel(loaded.cfg), loss_chunk_size=loaded.config.trainer.loss_chunk_size)
  nll, count = evaluation_totals(eval_step, loaded.variables["params"], model_state, batches)
  counts = count_params(loaded.cfg, loaded.variables["params"])
  per_token = sum(cache_lib.values_per_token(loaded.cfg, i) for i in range(loaded.cfg.num_layers))
  return {"nll": nll, "tokens": int(count), "step": int(loaded.step)}, {
    "params": counts["total"],
    "attention_params": counts.get("mla", 0) + counts.get("gqa", 0),
    "cache_bytes_per_token": per_token * BYTES_PER_VALUE,
  }


def run(v: dict, seed: int, args, workroot: str, batches: list[dict]) -> dict:
  config = make_config(v, args, seed)
  workdir = os.path.join(workroot, f"{v['key']}_seed{seed}")
  final, seconds, tok_s = train_quietly(config, workdir)
  if "stopped_by" in final:
    raise SystemExit(f"{workdir}: training stopped by {final['stopped_by']}")
  train_loss, points = smoothed_train_loss(workdir, args.steps)
  start = time.time()
  totals, sizes = evaluate(workdir, batches)
  eval_seconds = time.time() - start
  if totals["step"] != args.steps:
    raise SystemExit(f"{workdir}: the newest checkpoint is step {totals['step']}, not {args.steps}")
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  return {
    "key": v["key"],
    "name": v["name"],
    "family": v["family"],
    "seed": seed,
    **sizes,
    "val_loss": totals["nll"] / totals["tokens"],
    "val_tokens": totals["tokens"],
    "train_loss": train_loss,
    "train_loss_points": points,
    "final_train_loss": final.get("loss", float("nan")),
    "train_seconds": seconds,
    "eval_seconds": eval_seconds,
    "tokens_per_s": tok_s,
    "resumed": bool(final.get("already_complete")),
  }


def summarize(rows: list[dict], variant_list: list[dict]) -> list[dict]:
  by_key = {v["key"]: {r["seed"]: r for r in rows if r["key"] == v["key"]} for v in variant_list}
  base = {s: r["val_loss"] for s, r in by_key.get(BASELINE, {}).items()}
  out = []
  for v in variant_list:
    runs = by_key[v["key"]]
    if not runs:
      continue
    loss = {s: r["val_loss"] for s, r in runs.items()}
    first = next(iter(runs.values()))
    out.append(
      {
        "key": v["key"],
        "name": v["name"],
        "family": v["family"],
        "params": first["params"],
        "attention_params": first["attention_params"],
        "cache_bytes_per_token": first["cache_bytes_per_token"],
        "val_loss": interval(list(loss.values())),
        "train_loss": interval([r["train_loss"] for r in runs.values()]),
        "vs_mha": paired(loss, base) if base and v["key"] != BASELINE else None,
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in runs.values()])),
        "train_seconds": float(np.mean([r["train_seconds"] for r in runs.values()])),
      }
    )
  return out


def fmt_interval(s: dict, digits: int = 4, sign: bool = False) -> str:
  mean = f"{s['mean']:+.{digits}f}" if sign else f"{s['mean']:.{digits}f}"
  return mean if math.isnan(s["half"]) else f"{mean} ± {s['half']:.{digits}f}"


def verdict(p: dict | None) -> str:
  if p is None or p["significant"] is None:
    return "n/a"
  return "significant" if p["significant"] else "not significant"


def table(summary: list[dict]) -> list[str]:
  mha = next((s for s in summary if s["key"] == BASELINE), None)
  lines = [
    "| variant | cache B/token | vs MHA | params | attention params | val loss (95%) | Δ vs MHA, paired (95%) | "
    "significant | train loss, last 10% (95%) | tokens/s | s/run |",
    "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
  ]
  for s in summary:
    ratio = f"{mha['cache_bytes_per_token'] / s['cache_bytes_per_token']:.1f}x" if mha else "-"
    diff = fmt_interval(s["vs_mha"], sign=True) if s["vs_mha"] else "-"
    lines.append(
      f"| {s['name']} | {s['cache_bytes_per_token']:,} | {ratio} | {s['params'] / 1e6:.2f}M | "
      f"{s['attention_params'] / 1e6:.2f}M | {fmt_interval(s['val_loss'])} | {diff} | "
      f"{verdict(s['vs_mha']) if s['vs_mha'] else '-'} | {fmt_interval(s['train_loss'])} | "
      f"{s['tokens_per_s']:,.0f} | {s['train_seconds']:.0f} |"
    )
  return lines


def seed_table(rows: list[dict], summary: list[dict], seeds: int) -> list[str]:
  lines = [
    "| variant | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |",
    "|---|" + "---:|" * seeds,
  ]
  for s in summary:
    loss = {r["seed"]: r["val_loss"] for r in rows if r["key"] == s["key"]}
    lines.append(f"| {s['name']} | " + " | ".join(f"{loss[i]:.4f}" if i in loss else "-" for i in range(seeds)) + " |")
  return lines


def verdicts(rows: list[dict], summary: list[dict]) -> list[str]:
  """Each variant against MHA, and the partial-RoPE control, read from the paired intervals."""
  mha = next((s for s in summary if s["key"] == BASELINE), None)
  out = ["## Verdicts: each variant against MHA, paired by seed", ""]
  if mha is None:
    return out + ["MHA was not trained in this run: no paired differences."]
  out.append(
    "Δ is the mean over seeds of (variant − MHA) validation loss from the same seed (same data order); "
    "negative is better. Significant: the 95% interval excludes 0."
  )
  out.append("")
  for s in summary:
    p = s["vs_mha"]
    if p is None:
      continue
    ratio = mha["cache_bytes_per_token"] / s["cache_bytes_per_token"]
    cache = (
      f"{ratio:.1f}x less cache" if ratio > 1 else "the same cache" if ratio == 1 else f"{1 / ratio:.1f}x more cache"
    )
    out.append(f"- {s['name']}: {describe_diff(p)} vs MHA, {cache}.")
  by_key = {s["key"]: s for s in summary}
  controls = [(a, b) for a, b in ROPE_CONTROLS if a in by_key and b in by_key]
  if controls:
    out += [
      "",
      "## Partial-RoPE control: is MLA's gap the latent or the narrow RoPE part?",
      "",
      "MLA rotates only d_rope dims of each query/key head; MHA with model.rope_dim = d_rope rotates as many "
      "and caches full keys and values. Paired by seed:",
      "",
    ]
    for a, b in controls:
      loss = lambda key: {r["seed"]: r["val_loss"] for r in rows if r["key"] == key}
      gap = paired(loss(a), loss(b))
      out.append(f"- {by_key[a]['name']} − {by_key[b]['name']}: {describe_diff(gap)}.")
      if by_key[b]["vs_mha"]:
        out.append(
          f"  (of which the RoPE width alone, {by_key[b]['name']} − MHA: {describe_diff(by_key[b]['vs_mha'])})"
        )
  return out


def describe_diff(p: dict) -> str:
  if math.isnan(p["half"]):
    return f"{p['mean']:+.4f} nats ({p['n']} seed: no interval)"
  return (
    f"{p['mean']:+.4f} ± {p['half']:.4f} nats (95% [{p['low']:+.4f}, {p['high']:+.4f}], {p['n']} seeds, {verdict(p)})"
  )


def plot(summary: list[dict], path: Path, title: str) -> None:
  """Mean validation loss with its 95% interval against cache bytes: one color per family, one marker per
  variant (named in the legend); the MLA d_c sweep at d_rope 16 joined by a line."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import ScalarFormatter

  colors = {MHA_FAMILY: "tab:red", GQA_FAMILY: "tab:blue", MLA_FAMILY: "tab:green"}
  fig, ax = plt.subplots(figsize=(9, 5))
  seen: dict[int, int] = {}
  sweep = []
  for s in summary:
    cache = s["cache_bytes_per_token"]
    k = seen.get(cache, 0)
    seen[cache] = k + 1
    x = cache * 2 ** (0.04 * k)  # variants with the same cache side by side
    y, half = s["val_loss"]["mean"], s["val_loss"]["half"]
    ax.errorbar(
      x,
      y,
      yerr=None if math.isnan(half) else half,
      fmt=PLOT_MARKERS.get(s["key"], "o"),
      markersize=7,
      color=colors[s["family"]],
      capsize=3,
      label=s["name"],
    )
    if s["key"] in SWEEP:
      sweep.append((x, y))
  if len(sweep) > 1:
    ax.plot(*zip(*sorted(sweep), strict=True), color=colors[MLA_FAMILY], alpha=0.4, zorder=0)
  ax.set_xscale("log", base=2)
  ax.xaxis.set_major_formatter(ScalarFormatter())
  ax.set_xlabel("KV cache per token, all layers (bytes, bfloat16; log2 scale)")
  ax.set_ylabel("validation loss (nats/token): mean, 95% interval")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(
    fontsize=7,
    loc="upper left",
    bbox_to_anchor=(1.01, 1.0),
    title="red: MHA / partial RoPE, blue: GQA, green: MLA",
    title_fontsize=6,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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


def setup_line(args) -> str:
  tokens = args.steps * args.batch * args.seq_len
  return (
    f"Preset {args.preset}: hidden {args.hidden}, {args.layers} layers, {NUM_HEADS} heads of {HEAD_DIM}, SwiGLU "
    f"{args.intermediate}; MLA q_latent_dim {args.q_latent} unless noted; {args.steps} steps of {args.batch} x "
    f"{args.seq_len} tokens ({tokens / 1e6:.2f}M tokens a run), AdamW lr {args.learning_rate} (warmup "
    f"{args.steps // 8}, cosine), float32; byte tokenizer, the embedded corpus (Python standard library, "
    f"data.val_fraction {VAL_FRACTION}: held-out files); {args.seeds} seeds (trainer.seed 0..{args.seeds - 1}: "
    f"initialisation and data order); train loss logged every {args.log_interval} step(s)"
  )


def corpus_hash(corpus) -> str:
  """sha256 of the train then the validation token stream, as little-endian uint32."""
  h = hashlib.sha256()
  for part in (corpus.train, corpus.val):
    h.update(np.ascontiguousarray(part, dtype="<u4").tobytes())
  return h.hexdigest()


def main(argv=None) -> dict:
  args = options(argv)
  command = "python -m benchmarks.latent_study" + "".join(
    " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
  )
  start = time.time()
  load_start = os.getloadavg()
  probe = make_config(VARIANTS[0], args, 0)
  tokenizer = load_tokenizer(probe.data.tokenizer)
  with open(os.devnull, "w") as quiet:
    corpus = load_corpus(probe.data, tokenizer, stream=quiet)
  windows = validation_windows(corpus.val, args.seq_len, args.val_tokens)
  val = {
    "split_tokens": len(corpus.val),
    "windows": len(windows),
    "window_tokens": args.seq_len + 1,
    "target_tokens": len(windows) * args.seq_len,
    "sha256": hashlib.sha256(windows.astype("<i4").tobytes()).hexdigest(),
  }
  batches = [
    {"inputs": w[:, :-1], "targets": w[:, 1:]}
    for w in (windows[i : i + args.eval_batch] for i in range(0, len(windows), args.eval_batch))
  ]
  header = [
    *machine_lines(),
    f"- Python {platform.python_version()}",
    f"- corpus: {corpus.description}; {len(corpus.train):,} train + {len(corpus.val):,} validation tokens; "
    f"sha256 of the train then validation token stream (little-endian uint32): {corpus_hash(corpus)}",
    f"- validation: {val['target_tokens']:,} target tokens in {val['windows']:,} windows of {val['window_tokens']} "
    f"tokens spread evenly over the {val['split_tokens']:,}-token split; sha256 of the windows (int32, "
    f"concatenated): {val['sha256']}",
    f"- command: `{command}`",
  ]
  print("\n".join(header[-3:]), flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    workroot = args.workdir or tmp
    if jax.config.jax_compilation_cache_dir is None:  # the seeds of a variant compile the same programs once
      jax.config.update("jax_compilation_cache_dir", os.path.join(workroot, "xla_cache"))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    for seed in range(args.seeds):  # seeds outermost: an interrupted study still has complete pairs
      for v in args.variant_list:
        r = run(v, seed, args, workroot, batches)
        rows.append(r)
        print(
          f"seed {seed}  {r['name']:32s} cache {r['cache_bytes_per_token']:6,} B/token  val loss {r['val_loss']:.4f}  "
          f"train loss {r['train_loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s  train {r['train_seconds']:.0f}s  "
          f"eval {r['eval_seconds']:.0f}s",
          flush=True,
        )
  wall = time.time() - start
  load_end = os.getloadavg()
  summary = summarize(rows, args.variant_list)
  header += [
    f"- wall time: {wall / 60:.1f} min for {len(rows)} trainings and their evaluations; 1-minute load average "
    f"{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end ({os.cpu_count()} cores)"
  ]
  lines = table(summary)
  print("\n".join(lines))
  print(f"wall time {wall / 60:.1f} min ({wall / max(len(rows), 1):.0f} s a training + evaluation)")
  result = {
    "setup": {**{k: v for k, v in vars(args).items() if k != "variant_list"}, "setup": setup_line(args)},
    "header": header,
    "validation": val,
    "wall_seconds": wall,
    "rows": rows,
    "summary": summary,
  }
  if args.no_write:
    return result
  out = Path(args.results_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "latent_study.json").write_text(json.dumps(result, indent=1) + "\n")
  png = out / "latent_study.png"
  tokens = args.steps * args.batch * args.seq_len
  plot(
    summary,
    png,
    f"{args.layers} layers, hidden {args.hidden}, {tokens / 1e6:.2f}M tokens a run, {args.seeds} seeds; "
    f"validation {val['target_tokens']:,} tokens",
  )
  body = [
    "# Latent study v2: validation loss against KV cache, with seeds and paired intervals",
    "",
    *header,
    "",
    setup_line(args) + ".",
    "",
    "Cache B/token: bytes cached per token for one sequence, all layers, bfloat16; 'vs MHA' is the "
    "compression against MHA. Val loss: mean over seeds ± the 95% t half-width (t_{0.975, n−1} sd/√n). "
    "Δ vs MHA: the mean of the per-seed differences ± its 95% half-width. Train loss: the mean of the logged "
    "train losses over the last 10% of steps, then over seeds. tokens/s and s/run: training only, "
    "compilation included in s/run.",
    "",
    *lines,
    "",
    f"![validation loss against cache bytes]({png.name})",
    "",
    "Validation loss of every run:",
    "",
    *seed_table(rows, summary, args.seeds),
    "",
    *verdicts(rows, summary),
    "",
    *guide_table(16),
  ]
  write_lines(out / "latent_study.md", body)
  print(f"wrote {png} and {out / 'latent_study.json'}")
  return result


if __name__ == "__main__":
  main()
