r"""Where the jitted train step spends its time: a jax.profiler trace of the seed-size models, summed per
XLA fusion and per kind of work.

  python -m benchmarks.profile_step                       # -> benchmarks/results/profile_step.md
  python -m benchmarks.profile_step --models mla --steps 2 --no_write

  # the same table for another checkout (e.g. the previous commit), kept beside this one's:
  git worktree add /tmp/before HEAD~1 && cd /tmp/before && \
    PYTHONPATH=/tmp/before python /path/to/benchmarks/profile_step.py --label before

The models are the seed-size shapes of benchmarks/vs_transformers.py --size seed (hidden 512, 8 layers,
8 heads, vocabulary 8192, untied), built from mla_jax configs with random weights, trained at batch
4 x 256 with AdamW. Each XLA:CPU thunk (a fusion, a dot, a copy) is one trace event; the table sums each
over --steps profiled steps. XLA runs independent thunks concurrently, so the summed op time can exceed
the wall time: read the shares, not the absolute sums. Kinds: matmul (ynn/xnn fusions, dot), layout
(copy and transpose fusions, whatever their other ops), and the rest by their fusion name.

The trace times XLA:CPU's own (Eigen) `dot` thunks only while they are handed to the thread pool: their
work runs asynchronously and is not in the sums. In these steps they are the weight gradients (X^T dY,
which YNNPACK does not take), about a third of the matmul FLOPs, so the matmul share is an undercount.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from configs import mla as mla_config
from mla_jax.config import ModelConfig, validate
from mla_jax.model import LanguageModel, init_params
from mla_jax.optim import make_optimizer, make_schedule
from mla_jax.train_state import TrainState, initial_model_state
from mla_jax.train_step import make_train_step

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, BATCH, SEQ = 8192, 4, 256
RUNTIME_EVENTS = ("ThunkExecutor", "$", "Slinky", "PjitFunction", "CommonPjRt", "ParseArguments", "end:")


SEED_KINDS = ("mla", "mla_moe", "gqa", "mamba2")


def seed_config(kind: str):
  """The seed-size model of `kind` (one of SEED_KINDS) with the train settings of the comparison."""
  if kind not in SEED_KINDS:
    raise ValueError(f"unknown seed-size model {kind!r}: one of {', '.join(SEED_KINDS)}")
  config = mla_config.get_config()
  m = config.model
  m.vocab_size, m.tie_embeddings = VOCAB, False
  if kind in ("mla", "mla_moe"):  # DeepSeek-V3 dense shape: nope 48, rope 16, v 64, q/kv latent 192
    m.head_dim, m.v_head_dim = 48, 64
  if kind == "mla_moe":
    m.num_experts, m.experts_per_tok, m.moe_intermediate_size, m.first_dense_layers = 8, 2, 512, 1
  if kind in ("gqa", "mamba2"):
    m.kv_latent_dim = m.q_latent_dim = m.d_rope = 0
    m.kv_heads = 4
  if kind == "mamba2":
    m.layer_pattern, m.mamba2_num_heads, m.mamba2_state_size = "M" * m.num_layers, 16, 64
  t = config.trainer
  t.batch_size, t.seq_len, t.learning_rate, t.warmup_steps = BATCH, SEQ, 1e-4, 0
  validate(config)
  return config


def kind_of(name: str) -> str:
  base = re.sub(r"\.\d+$", "", name)
  if base.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or base in ("dot", "dot_general"):
    return "matmul"
  if "copy" in base or "transpose" in base:
    return "layout (copy / transpose)"
  return base


def hlo_ops(hlo: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (shape, op_name metadata) from optimized HLO text."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) [\w\-]+\(.*?op_name=\"([^\"]+)\"", hlo, re.M):
    out[m.group(1)] = (m.group(2), m.group(3))
  return out


def seed_train_step(kind: str):
  """(jitted train step, initial state, batch) of the seed-size `kind` model: random weights and tokens."""
  config = seed_config(kind)
  cfg = ModelConfig.from_config(config)
  tx = make_optimizer(config.trainer, 1000)
  params, _ = init_params(cfg, jax.random.PRNGKey(0), 8)
  state = TrainState.create(params, tx, jax.random.PRNGKey(1), initial_model_state(cfg, SEQ))
  tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  step = make_train_step(config, LanguageModel(cfg), tx, make_schedule(config.trainer, 1000))
  return step, state, batch


def profile(kind: str, steps: int) -> dict:
  step, state, batch = seed_train_step(kind)
  compiled = step.lower(state, batch).compile()
  ops = hlo_ops(compiled.as_text())
  for _ in range(2):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    (trace,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(RUNTIME_EVENTS):
      per_op[e["name"]] += e["dur"] / steps / 1e3  # ms per step
  per_kind = collections.Counter()
  for name, ms in per_op.items():
    per_kind[kind_of(name)] += ms
  top = [
    {"op": name, "ms": ms, "shape": ops.get(name, ("", ""))[0], "source": ops.get(name, ("", ""))[1]}
    for name, ms in per_op.most_common(40)
  ]
  return {
    "kind": kind,
    "step_ms": 1e3 * sorted(times)[len(times) // 2],
    "op_ms": sum(per_op.values()),
    "per_kind": dict(per_kind),
    "top": top,
  }


def short_source(source: str) -> str:
  """'jit(step)/transpose(jvp(LanguageModel))/layer_3/mlp/jit(silu)' -> 'bwd layer_3/mlp/jit(silu)'."""
  direction = "bwd" if "transpose(" in source else "fwd"
  parts = source.split("/")[1:]
  if parts and parts[0].startswith(("transpose(", "jvp(")):
    parts = parts[1:]
  body = "/".join(parts)
  return f"{direction} {body if body.startswith('layer_') else f'loss, head or optimizer: {body}'}"


def tables(runs: dict[str, dict], top: int) -> list[str]:
  lines = []
  order = sorted(runs, key=lambda label: (label != "before", label == "after", label))  # before ... after
  for kind in runs[order[-1]]:
    lines += [f"## {kind}", ""]
    labels = [label for label in order if kind in runs[label]]
    kinds = collections.Counter()
    for label in labels:
      kinds.update(runs[label][kind]["per_kind"])
    head = " | ".join(f"{label} ms | {label} share" for label in labels)
    lines += [f"| kind of work | {head} |", "|---|" + "---:|---:|" * len(labels)]
    for name, _ in kinds.most_common(8):
      cells = []
      for label in labels:
        r = runs[label][kind]
        ms = r["per_kind"].get(name, 0.0)
        cells.append(f"{ms:,.0f} | {100 * ms / r['op_ms']:.1f}%")
      lines.append(f"| {name} | {' | '.join(cells)} |")
    steps = " | ".join(f"{runs[label][kind]['step_ms']:,.0f} | " for label in labels)
    lines += [f"| **step wall time (median)** | {steps}|", ""]
    for label in labels:
      r = runs[label][kind]
      lines += [
        f"Top {top} ops, {label}:",
        "",
        "| op | ms/step | share | shape | from |",
        "|---|---:|---:|---|---|",
      ]
      for t in r["top"][:top]:
        lines.append(
          f"| {t['op']} | {t['ms']:,.1f} | {100 * t['ms'] / r['op_ms']:.1f}% | `{t['shape']}` | "
          f"{short_source(t['source'])} |"
        )
      lines.append("")
  return lines


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.profile_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--models", default="mla,mla_moe,gqa,mamba2")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=10)
  parser.add_argument("--label", default="after", help="this checkout's column (e.g. before / after)")
  parser.add_argument("--note", default="", help="what this checkout is, recorded beside its column")
  parser.add_argument("--no_write", action="store_true")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.top < 1:
    sys.exit("--steps and --top must be >= 1")
  runs = {}
  for kind in args.models.split(","):
    runs[kind] = profile(kind, args.steps)
    r = runs[kind]
    print(f"{kind}: step {r['step_ms']:,.0f} ms, op time {r['op_ms']:,.0f} ms", flush=True)
    for name, ms in collections.Counter(r["per_kind"]).most_common(6):
      print(f"  {name:28s} {ms:9,.0f} ms {100 * ms / r['op_ms']:5.1f}%")
  if args.no_write:
    return
  RESULTS.mkdir(exist_ok=True)
  store = RESULTS / "profile_step.json"
  saved = json.loads(store.read_text()) if store.exists() else {"runs": {}}
  saved["runs"][args.label] = runs
  saved.setdefault("commands", {})[args.label] = " ".join(["python -m benchmarks.profile_step", *sys.argv[1:]])
  saved.setdefault("notes", {})[args.label] = args.note
  store.write_text(json.dumps(saved, indent=1) + "\n")
  write_markdown(saved, args.top)


def write_markdown(saved: dict, top: int) -> None:
  from benchmarks.common import machine_lines

  columns = [
    f"{k}: `{v}`" + (f" ({saved.get('notes', {}).get(k)})" if saved.get("notes", {}).get(k) else "")
    for k, v in saved["commands"].items()
  ]
  body = [
    "# Where the train step spends its time (XLA:CPU profile, float32)",
    "",
    *machine_lines(),
    "",
    f"Seed-size models (hidden 512, 8 layers, vocabulary 8192), AdamW step at batch {BATCH} x {SEQ}. Op time is "
    "summed per XLA thunk from a jax.profiler trace, per step; XLA runs independent thunks concurrently, "
    "so shares are what to compare. XLA's own `dot` thunks (the weight gradients) are timed only while "
    "they are dispatched, their work runs asynchronously and is not in the sums: the matmul share is an "
    "undercount. Columns: " + "; ".join(columns) + ".",
    "",
    *tables(saved["runs"], top),
  ]
  (RESULTS / "profile_step.md").write_text("\n".join(body) + "\n")
  print(f"wrote {RESULTS / 'profile_step.md'}")


if __name__ == "__main__":
  main()
