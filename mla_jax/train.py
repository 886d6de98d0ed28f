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

import json
import math
import os
import shlex
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
from mla_jax import distributed
from mla_jax import memory
from mla_jax import sharding as sharding_lib
from mla_jax import preemption
from mla_jax import train_program
from mla_jax.data import BatchIterator, eval_batches, load_corpus, load_tokenizer
from mla_jax.errors import ConfigError
from mla_jax.model import LanguageModel, count_params, flops_per_token
from mla_jax.sampling import sample_without_cache
from mla_jax.train_program import resolve_model_config  # noqa: F401 (also imported from here)
from mla_jax.train_step import TrainState, make_eval_step


PROGRESS_SECONDS = 30.0  # a progress line at least this often, whatever trainer.log_interval is


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


def evaluation_totals(eval_step, params, model_state, batches) -> tuple[float, float]:
  """(sum of token losses in nats, number of target tokens) over `batches`."""
  nll, count = 0.0, 0.0
  for batch in batches:
    b_nll, b_count = eval_step(params, model_state, batch)
    nll += float(b_nll)
    count += float(b_count)
  return nll, count


def evaluate(eval_step, state: TrainState, batches) -> dict:
  nll, count = evaluation_totals(eval_step, state.params, state.model_state, batches)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stream=sys.stdout,
                       argv: Optional[list[str]] = None) -> dict:
  """Runs (or resumes) training in `workdir`; returns the final metrics.

  `argv` (the command-line flags) makes the resume hint printed after SIGTERM/SIGINT exact. A stopped
  run returns {"stopped_by": signal name, "step": last saved step}; a workdir that already holds the
  final checkpoint returns {"already_complete": True, "step": that step} without compiling anything.
  A run that fails leaves no empty files or folders behind (nor the workdir, if it created it).
  """
  created_root = ckpt_lib.missing_root(workdir)
  new_config = not os.path.exists(os.path.join(workdir, "config.json"))
  try:
    return _train_and_evaluate(config, workdir, stream, argv)
  except BaseException:
    ckpt_lib.remove_empty_outputs(workdir, created_root, remove_config=new_config)
    raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stream, argv) -> dict:
  config_lib.validate(config)
  t = config.trainer
  if t.keep_best and not t.eval_steps:
    raise ConfigError("trainer.keep_best", "needs trainer.eval_steps > 0 (checkpoints are ranked by "
                      "validation loss)")
  ckpt_lib.prepare_workdir(workdir)
  mesh = sharding_lib.make_mesh(config)  # checks the mesh, batch, heads and experts against the devices
  if not distributed.is_main():
    stream = open(os.devnull, "w")  # only process 0 prints
  say = lambda text: (stream.write(text + "\n"), stream.flush())

  tokenizer = load_tokenizer(config.data.tokenizer)
  config_lib.warn_unused_vocab(config, tokenizer.vocab_size)
  cfg = resolve_model_config(config, tokenizer)
  corpus = load_corpus(config.data, tokenizer, config.model.vocab_size)
  T = config_lib.seq_len(config)
  iterator = BatchIterator(corpus.train, t.batch_size, T, t.seed, corpus.source,
                           *sharding_lib.data_shard(config, mesh))
  val_batches = eval_batches(corpus.val, t.batch_size, T, t.eval_steps, corpus.source) if t.eval_steps else []
  steps = total_steps(config, iterator)
  saved = ckpt_lib.saved_steps(workdir)
  if saved and saved[-1] >= steps and ckpt_lib.saved_with_model(workdir, saved[-1], config):
    say(f"Already complete: {os.path.join(ckpt_lib.checkpoint_dir(workdir), str(saved[-1]))} is the final "
        f"checkpoint of this {steps}-step run; nothing to do (raise trainer.max_steps to train further)")
    return {"already_complete": True, "step": saved[-1]}
  if t.warmup_steps >= steps:
    warn(f"trainer.warmup_steps={t.warmup_steps} is not below the {steps} training steps: the learning rate "
         f"climbs for the whole run and reaches trainer.learning_rate={t.learning_rate:g} only at the last "
         "step, with no decay")

  # Compiled (and checked against the device's memory) before the state exists, so on CPU the host
  # memory it is checked against is still free; with model.remat=auto this picks the policy.
  compile_start = time.time()
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  capacity, where = memory.device_capacity_bytes(device), memory.capacity_source(device)
  say(f"Compiling the train step (model.remat={config.model.get('remat', 'auto')}; "
      f"{memory.fmt_bytes(capacity)} per device: {where})")
  program, train_step, remat, remat_table = train_program.compile_to_fit(
      config, None, cfg.vocab_size, steps, capacity, mesh=mesh, where=where)
  compile_s = time.time() - compile_start
  model, plan = program.model, program.plan
  state = program.init_state(jax.random.PRNGKey(t.seed))  # each device builds only its own shards
  params = state.params
  val_batches = [plan.put_full(b) for b in val_batches]

  space = ckpt_lib.check_free_space(workdir, ckpt_lib.state_bytes(state), t.max_checkpoints + int(t.keep_best))
  if space:
    warn(space)
  checkpointer = ckpt_lib.Checkpointer(workdir, t.max_checkpoints, keep_best=t.keep_best)
  try:
    resume_lines = []  # printed last before the first step, where they stay in view
    state, start_step = restore_checkpoint(checkpointer, state, iterator, resume_lines.append)
  except BaseException:
    close_after_error(checkpointer)  # stop orbax's background threads before the error exits the process
    raise

  counts = count_params(cfg, params)
  flops = flops_per_token(cfg, params, T)
  tokens_per_step = t.batch_size * T
  say(f"Data: {corpus.description}; {len(corpus.train):,} train / {len(corpus.val):,} validation tokens; "
      f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size}, model vocab {cfg.vocab_size})")
  say("Parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "vectors"))
  say(f"FLOPs per step: {flops['total'] * tokens_per_step:.3e} ({flops['total']:.3e} per token: matmul "
      f"{flops['matmul']:.3e}, attention {flops['attention']:.3e}, ssd {flops['ssd']:.3e})")
  say(f"Training {steps} steps of {t.batch_size} x {T} tokens on {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s)")
  say(plan.describe())

  eval_step = make_eval_step(model, plan.state, plan.batch, plan.rules, t.loss_chunk_size)
  say(f"Compiled the train step in {compile_s:.1f}s")
  say(memory.memory_report(train_step))
  say(memory.choice_line(remat, remat_table, capacity, config.model.get("remat", "auto") == "auto", where))

  say(f"Config: {config_lib.summary(config, cfg)}; every key in {write_config(config, workdir)}")
  for line in resume_lines:
    say(line)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  history = _read_history(metrics_path, start_step) if distributed.is_main() else []
  progress = Progress(steps, stream)
  last_log_time, last_log_step = time.time(), start_step
  pending = None
  final = {}
  guard = preemption.NonFiniteGuard(t.max_skipped_steps, int(state.skipped), report=progress.message)
  last_saved = start_step
  with open(metrics_path if distributed.is_main() else os.devnull, "a") as metrics_file, \
      preemption.StopSignals() as stop:
    try:
      for step in range(start_step, steps):
        state, metrics = train_step(state, plan.put(next(iterator)))
        done = step + 1
        guard.push(done, metrics["skipped"])
        log = done % t.log_interval == 0 or done == steps
        if log or time.time() - last_log_time >= PROGRESS_SECONDS:  # progress by time too; records by step
          guard.flush()
          pending = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
          now = time.time()
          tok_s = (done - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
          eta = (steps - done) * tokens_per_step / max(tok_s, 1e-9)
          last_log_time, last_log_step = now, done
          progress.update(done, pending, tok_s, eta)
          if log:
            record = {"step": done, **pending, "skipped_total": guard.total, "tokens_per_s": tok_s}
            if "load" in metrics:
              load = np.asarray(jax.device_get(metrics["load"]))
              record.update(load_min=float(load.min()), load_max=float(load.max()),
                            load_cv=float(np.mean(load.std(-1) / np.maximum(load.mean(-1), 1e-9))))
            _write(metrics_file, record, history)
        scheduled_save = done % t.save_interval == 0 or done == steps
        ev = None
        if val_batches and (done % t.eval_interval == 0 or done == steps or (t.keep_best and scheduled_save)):
          ev = evaluate(eval_step, state, val_batches)
          progress.message(f"step {done}: validation loss {ev['val_loss']:.4f}, "
                           f"perplexity {ev['val_perplexity']:.2f}")
          _write(metrics_file, {"step": done, **ev}, history)
          final.update(ev)
        if (scheduled_save or stop.received) and done != last_saved:
          guard.flush()  # never save over the last good checkpoint once the skip limit is reached
          checkpointer.save(done, state, iterator.get_state(), config, ev["val_loss"] if ev else None)
          last_saved = done
        if stop.received:
          break
      checkpointer.close()
    except BaseException:
      close_after_error(checkpointer)
      raise
  final.update(pending or {})
  final["skipped_updates"] = guard.total
  if stop.received and last_saved < steps:
    progress.message(f"Stopped by {stop.received} after step {last_saved}; saved "
                     f"{os.path.join(checkpointer.directory, str(last_saved))}. To resume, run:\n"
                     f"  cd {shlex.quote(os.getcwd())} && {preemption.resume_command(workdir, argv)}")
    return {**final, "stopped_by": stop.received, "step": last_saved}
  best = checkpointer.best_step() if t.keep_best else None
  if best:
    say(f"Best checkpoint: {os.path.join(checkpointer.directory, str(best[0]))} (validation loss {best[1]:.4f})")

  if history and distributed.is_main():
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


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config to <workdir>/config.json (process 0) and returns the path."""
  path = os.path.join(workdir, "config.json")
  if distributed.is_main():
    with open(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  return path


def warn(text: str) -> None:
  print(f"warning: {text}", file=sys.stderr, flush=True)


def restore_checkpoint(checkpointer: ckpt_lib.Checkpointer, state: TrainState, iterator: BatchIterator, say):
  """Restores the newest readable checkpoint into the structure and shardings of `state`.

  Returns (state, start step) and moves the iterator to the saved position; (state, 0) when there is none.
  """
  restored = checkpointer.restore_latest(ckpt_lib.abstract(state), warn=warn)
  if restored is None:
    return state, 0
  _, state, meta = restored
  saved, current = meta["data"], iterator.get_state()
  changed = [f"{k} {saved[k]} -> {current[k]}" for k in ("seed", "batch_size", "seq_len")
             if k in saved and saved[k] != current[k]]
  if changed:
    warn(f"the data order differs from the checkpoint's ({', '.join(changed)}): resumed batches are not the "
         "ones an unbroken run would see")
  iterator.set_state(saved)
  say(f"Resuming from {checkpointer.directory} step {int(state.step)}")
  return state, int(state.step)


def close_after_error(checkpointer: ckpt_lib.Checkpointer) -> None:
  """Lets a background save of an earlier step finish; its own failure is reported, not raised."""
  try:
    checkpointer.close()
  except Exception as e:  # pylint: disable=broad-except
    warn(cli.one_line(e))


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
  distributed.define_flags()
  cli.parse_flags(argv)
  argv = list(sys.argv[1:] if argv is None else argv[1:])
  result = {}
  cli.run(lambda: (distributed.initialize_from_flags(),
                   result.update(train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, argv=argv))))
  if result.get("stopped_by"):
    sys.exit(preemption.exit_code(result["stopped_by"]))


if __name__ == "__main__":
  main()
