r"""Training entry point.

  python -m mla_jax.train --config=configs/hybrid.py --workdir=runs/hybrid \
      [--config.trainer.max_steps=200 --config.model.kv_latent_dim=256 ...]

Prints the resolved config, the parameter count and the FLOPs per step, compiles the step once, shows
progress (loss, tokens/s, ETA), writes metrics.jsonl, evaluates periodically, saves orbax checkpoints
every `trainer.save_interval` steps and at the end, and finishes with a loss-curve PNG and sample text.
A workdir that already holds checkpoints resumes from the latest one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mla_jax import checkpoint as ckpt_lib
from mla_jax import cli
from mla_jax import config as config_lib
from mla_jax.data import BatchIterator, eval_batches, load_corpus, load_tokenizer
from mla_jax.data.tokenizer import padded_vocab_size
from mla_jax.errors import ConfigError
from mla_jax.model import LanguageModel, count_params, flops_per_token, init_params
from mla_jax.optim import make_optimizer, make_schedule
from mla_jax.sampling import sample_without_cache
from mla_jax.train_step import TrainState, make_eval_step, make_train_step


def resolve_model_config(config: ml_collections.ConfigDict, tokenizer) -> config_lib.ModelConfig:
  if config.model.vocab_size and config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller than the tokenizer's "
                      f"vocabulary ({tokenizer.vocab_size})")
  return config_lib.ModelConfig.from_config(config, padded_vocab_size(tokenizer.vocab_size))


def total_steps(config, iterator: BatchIterator) -> int:
  steps = config.trainer.max_steps
  if config.trainer.num_epochs:
    steps = min(steps, math.ceil(config.trainer.num_epochs * iterator.num_windows / config.trainer.batch_size))
  return steps


class Progress:
  """A one-line progress bar on a terminal, plain log lines otherwise."""

  def __init__(self, total: int, stream=sys.stdout):
    self.total, self.stream = total, stream
    self.tty = stream.isatty()

  def update(self, step: int, metrics: dict, tokens_per_s: float, eta_s: float) -> None:
    text = (f"step {step:>6}/{self.total}  loss {metrics['loss']:.4f}  grad {metrics['grad_norm']:.3f}  "
            f"lr {metrics['learning_rate']:.2e}  {tokens_per_s:,.0f} tok/s  ETA {_fmt_time(eta_s)}")
    if self.tty:
      width = 24
      filled = int(width * step / max(self.total, 1))
      self.stream.write("\r[" + "#" * filled + "." * (width - filled) + "] " + text + "\033[K")
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
    self.stream.flush()


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def evaluate(eval_step, state: TrainState, batches) -> dict:
  nll, count = 0.0, 0.0
  for batch in batches:
    b_nll, b_count = eval_step(state.params, state.model_state, batch)
    nll += float(b_nll)
    count += float(b_count)
  loss = nll / max(count, 1.0)
  return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def save_loss_curve(path: str, history: list[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  train = [(h["step"], h["loss"]) for h in history if "loss" in h]
  val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
  if train:
    ax.plot(*zip(*train), label="train loss")
  if val:
    ax.plot(*zip(*val), "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stream=sys.stdout) -> dict:
  """Runs (or resumes) training in `workdir`; returns the final metrics."""
  config_lib.validate(config)
  t = config.trainer
  os.makedirs(workdir, exist_ok=True)
  say = lambda text: (stream.write(text + "\n"), stream.flush())

  tokenizer = load_tokenizer(config.data.tokenizer)
  cfg = resolve_model_config(config, tokenizer)
  corpus = load_corpus(config.data, tokenizer, config.model.vocab_size)
  T = config_lib.seq_len(config)
  iterator = BatchIterator(corpus.train, t.batch_size, T, t.seed, corpus.source)
  val_batches = eval_batches(corpus.val, t.batch_size, T, t.eval_steps, corpus.source) if t.eval_steps else []
  steps = total_steps(config, iterator)

  model = LanguageModel(cfg)
  rng = jax.random.PRNGKey(t.seed)
  init_rng, state_rng = jax.random.split(rng)
  params, _ = init_params(cfg, init_rng, T)
  schedule = make_schedule(t, steps)
  tx = make_optimizer(t, steps)
  model_state = initial_model_state(model, cfg, T)
  state = TrainState.create(params, tx, state_rng, model_state)

  checkpointer = ckpt_lib.Checkpointer(workdir, t.max_checkpoints)
  start_step = 0
  latest = checkpointer.latest_step()
  if latest is not None:
    state, meta = checkpointer.restore(latest, ckpt_lib.abstract(state))
    iterator.set_state(meta["data"])
    start_step = int(state.step)
    say(f"Resuming from {checkpointer.directory} step {start_step}")

  counts = count_params(cfg, params)
  flops = flops_per_token(cfg, params, T)
  tokens_per_step = t.batch_size * T
  say("Config:\n" + config_lib.format_config(config))
  say(f"Data: {corpus.description}; {len(corpus.train):,} train / {len(corpus.val):,} validation tokens; "
      f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size}, model vocab {cfg.vocab_size})")
  say("Parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "vectors"))
  say(f"FLOPs per step: {flops['total'] * tokens_per_step:.3e} ({flops['total']:.3e} per token: matmul "
      f"{flops['matmul']:.3e}, attention {flops['attention']:.3e}, ssd {flops['ssd']:.3e})")
  say(f"Training {steps} steps of {t.batch_size} x {T} tokens on {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s)")

  train_step = make_train_step(config, model, tx, schedule)
  eval_step = make_eval_step(model)
  compile_start = time.time()
  first_batch = iterator.batch_at(iterator.step)
  train_step = train_step.lower(state, first_batch).compile()
  say(f"Compiled the train step in {time.time() - compile_start:.1f}s")

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  history = _read_history(metrics_path, start_step)
  progress = Progress(steps, stream)
  last_log_time, last_log_step = time.time(), start_step
  pending = None
  final = {}
  with open(metrics_path, "a") as metrics_file:
    for step in range(start_step, steps):
      state, metrics = train_step(state, next(iterator))
      done = step + 1
      if done % t.log_interval == 0 or done == steps:
        pending = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        now = time.time()
        tok_s = (done - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
        eta = (steps - done) * tokens_per_step / max(tok_s, 1e-9)
        last_log_time, last_log_step = now, done
        record = {"step": done, **pending, "tokens_per_s": tok_s}
        if "load" in metrics:
          load = np.asarray(jax.device_get(metrics["load"]))
          record.update(load_min=float(load.min()), load_max=float(load.max()),
                        load_cv=float(np.mean(load.std(-1) / np.maximum(load.mean(-1), 1e-9))))
        progress.update(done, pending, tok_s, eta)
        _write(metrics_file, record, history)
      if val_batches and (done % t.eval_interval == 0 or done == steps):
        ev = evaluate(eval_step, state, val_batches)
        progress.message(f"step {done}: validation loss {ev['val_loss']:.4f}, "
                         f"perplexity {ev['val_perplexity']:.2f}")
        _write(metrics_file, {"step": done, **ev}, history)
        final.update(ev)
      if done % t.save_interval == 0 or done == steps:
        checkpointer.save(done, state, iterator.get_state(), config)
  checkpointer.close()
  final.update(pending or {})

  if history:
    save_loss_curve(os.path.join(workdir, "loss.png"), history)
    say(f"Loss curve: {os.path.join(workdir, 'loss.png')}")
  first = next((h["loss"] for h in history if "loss" in h), None)
  if first is not None and pending:
    say(f"Loss: {first:.4f} at the first log -> {pending['loss']:.4f} at step {steps}")
  if config.sample.max_new_tokens > 0:
    text = sample_text(config, model, state, tokenizer, cfg)
    say(f"Sample (prompt {config.sample.prompt!r}, temperature {config.sample.temperature}):\n"
        f"{config.sample.prompt}{text}")
    final["sample"] = text
  return final


def initial_model_state(model: LanguageModel, cfg: config_lib.ModelConfig, seq_len: int) -> dict:
  """Non-trainable model variables (collections other than params), e.g. the MoE aux-free bias."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, min(seq_len, 8)), jnp.int32))
  return {name: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
          for name, tree in shapes.items() if name != "params"}


def sample_text(config, model, state, tokenizer, cfg) -> str:
  s = config.sample
  prompt = tokenizer.encode(s.prompt)
  ids = sample_without_cache(model, {"params": state.params, **state.model_state}, prompt, s.max_new_tokens,
                             jax.random.PRNGKey(config.trainer.seed + 1), s.temperature, s.top_k,
                             min(cfg.max_seq_len, len(prompt) + s.max_new_tokens))
  return tokenizer.decode(ids)


def _write(f, record: dict, history: list) -> None:
  f.write(json.dumps(record) + "\n")
  f.flush()
  history.append(record)


def _read_history(path: str, start_step: int) -> list[dict]:
  if not os.path.exists(path) or start_step == 0:
    if os.path.exists(path):
      os.remove(path)
    return []
  history = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get("step", 0) <= start_step:
        history.append(record)
  with open(path, "w") as f:
    for record in history:
      f.write(json.dumps(record) + "\n")
  return history


def main(argv: Optional[list[str]] = None) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/hybrid.py[:arg].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.parse_flags(argv)
  cli.run(lambda: train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir))


if __name__ == "__main__":
  main()
