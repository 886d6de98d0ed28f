"""Shared benchmark plumbing: the machine description and the results file."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.config import ModelConfig
from mla_jax.model import LanguageModel
from mla_jax.optim import make_optimizer, make_schedule
from mla_jax.train_state import TrainState, initial_model_state
from mla_jax.train_step import make_train_step
from mla_jax.trainer import train_and_evaluate

RESULTS = Path(__file__).resolve().parent / "results"


def machine_lines() -> list[str]:
  device = jax.devices()[0]
  return [
    f"- date: {time.strftime('%Y-%m-%d')}",
    f"- processor: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    f"- jax {jax.__version__}, device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s)",
  ]


def write_results(name: str, title: str, body: str) -> Path:
  RESULTS.mkdir(exist_ok=True)
  path = RESULTS / f"{name}.md"
  path.write_text(f"# {title}\n\n" + "\n".join(machine_lines()) + "\n\n" + body.rstrip() + "\n")
  return path


def median_time(fn, runs: int) -> float:
  """Median wall time of `fn()` (which must block until done) over `runs` calls."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def matmul_gflops(n: int, runs: int = 5) -> float:
  """XLA's float32 matmul rate on this machine: the best GFLOP/s (2 n^3 per call) of a jitted [n, n] x [n, n]
  `jnp.dot` over `runs` calls after one that compiles."""
  a_NN = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b_NN = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  run = lambda: dot(a_NN, b_NN).block_until_ready()
  run()
  return 2 * n**3 / min(median_time(run, 1) for _ in range(runs)) / 1e9


def read_bandwidth_gbs(nbytes: int = 2**30, runs: int = 5) -> dict[str, float]:
  """The machine's read bandwidth: the best GB/s (1e9 bytes) of a full float32 sum over an `nbytes` array,
  {"xla": a jitted jnp.sum, "numpy": ndarray.sum}, over `runs` calls each."""
  x_np = np.full(nbytes // 4, 1.0, np.float32)
  x = jnp.asarray(x_np)
  total = jax.jit(jnp.sum)
  xla = lambda: total(x).block_until_ready()
  xla()
  best = lambda fn: nbytes / min(median_time(fn, 1) for _ in range(runs)) / 1e9
  return {"xla": best(xla), "numpy": best(x_np.sum)}


def write_lines(path, lines: list[str]) -> Path:
  """Writes a results table (lines already holding the title and machine) to `path` and says so."""
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("\n".join(lines) + "\n")
  print(f"wrote {out}")
  return out


def train_step_seconds(config, params, tokens, steps: int, warmup: int = 1, vocab_size: int = 0) -> float:
  """Median seconds of the real jitted train step (`make_train_step`, donated state) on `tokens`
  [batch, seq_len + 1] for the model of `config` (vocabulary `vocab_size` when the config's is 0), after
  `warmup` untimed steps (the first compiles)."""
  T = tokens.shape[1] - 1
  cfg = ModelConfig.from_config(config, vocab_size or None)
  model = LanguageModel(cfg)
  tx = make_optimizer(config.trainer, 1000)
  state = TrainState.create(
    jax.tree_util.tree_map(jax.numpy.asarray, params), tx, jax.random.PRNGKey(1), initial_model_state(cfg, T)
  )
  train_step = make_train_step(config, model, tx, make_schedule(config.trainer, 1000))
  batch = {"inputs": tokens[:, :-1].astype("int32"), "targets": tokens[:, 1:].astype("int32")}
  holder = {"state": state}

  def step():
    holder["state"], metrics = train_step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  for _ in range(warmup):
    step()
  return median_time(step, steps)


def train_quietly(config, workdir: str) -> tuple[dict, float, float]:
  """Runs the real training loop without its log: (final metrics, wall seconds, mean tokens/s of the logged
  intervals after the first, which includes compilation)."""
  start = time.time()
  with open(os.devnull, "w") as quiet:
    final = train_and_evaluate(config, workdir, stream=quiet)
  seconds = time.time() - start
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logs = [json.loads(line) for line in f]
  tok_s = [r["tokens_per_s"] for r in logs if "tokens_per_s" in r][1:]
  return final, seconds, sum(tok_s) / len(tok_s) if tok_s else float("nan")
