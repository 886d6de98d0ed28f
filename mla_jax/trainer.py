r"""The training library: `train_and_evaluate(config, workdir)` runs (or resumes) one training run.

It prints a one-line config summary (every key goes to <workdir>/config.json), the parameter count and the
FLOPs per step, compiles the step once (`mla_jax.train_program`, checked against the device's memory),
shows progress (loss, tokens/s, ETA; every log_interval steps and at least every 30 s), writes
metrics.jsonl, evaluates periodically, saves orbax checkpoints every `trainer.save_interval` steps and at
the end, and finishes with a loss-curve PNG and sample text. A workdir that already holds checkpoints
resumes from the newest readable one (see checkpoint.py); one that holds the final checkpoint says the run
is complete and returns without compiling. SIGTERM or SIGINT says at once that it finishes the current step
and saves, then does so and returns {"stopped_by": ...} (see preemption.py). `python -m mla_jax.train` is
the command line.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time

import jax
import ml_collections
import numpy as np

from mla_jax import checkpoint as ckpt_lib
from mla_jax import cli, distributed, memory, metric_writers, preemption, profiling, reports, tpu_chips, train_program
from mla_jax import config as config_lib
from mla_jax import sharding as sharding_lib
from mla_jax.data import BatchIterator, eval_batches, load_corpus, load_tokenizer
from mla_jax.data.packing import corpus_documents
from mla_jax.errors import ConfigError
from mla_jax.model import count_params, flops_per_token
from mla_jax.sampling import sample_without_cache
from mla_jax.train_program import resolve_model_config
from mla_jax.train_state import TrainState
from mla_jax.train_step import evaluation_totals, make_eval_step

PROGRESS_SECONDS = 30.0  # a progress line at least this often, whatever trainer.log_interval is


def total_steps(config, iterator: BatchIterator) -> int:
  steps = config.trainer.max_steps
  if config.trainer.num_epochs:
    steps = min(steps, math.ceil(config.trainer.num_epochs * iterator.num_windows / config.trainer.batch_size))
  return steps


def evaluate(eval_step, state: TrainState, batches) -> dict:
  nll, count = evaluation_totals(eval_step, state.params, state.model_state, batches)
  loss = nll / max(count, 1.0)
  return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, stream=sys.stdout, argv: list[str] | None = None
) -> dict:
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
    raise ConfigError("trainer.keep_best", "needs trainer.eval_steps > 0 (checkpoints are ranked by validation loss)")
  ckpt_lib.prepare_workdir(workdir)
  mesh = sharding_lib.make_mesh(config)  # checks the mesh, batch, heads and experts against the devices
  if not distributed.is_main():
    stream = open(os.devnull, "w")  # noqa: SIM115  (only process 0 prints; lives as long as the process)
  say = lambda text: (stream.write(text + "\n"), stream.flush())

  tokenizer = load_tokenizer(config.data.tokenizer)
  config_lib.warn_unused_vocab(config, tokenizer.vocab_size)
  cfg = resolve_model_config(config, tokenizer)
  corpus = load_corpus(config.data, tokenizer, config.model.vocab_size, stream=stream)
  T = config_lib.seq_len(config)
  train_docs, val_docs = corpus_documents(corpus, config.data.get("packing", "stream"), tokenizer.eos_id)
  iterator = BatchIterator(
    corpus.train, t.batch_size, T, t.seed, corpus.source, *sharding_lib.data_shard(config, mesh), documents=train_docs
  )
  val_batches = (
    eval_batches(corpus.val, t.batch_size, T, t.eval_steps, corpus.source, documents=val_docs) if t.eval_steps else []
  )
  steps = total_steps(config, iterator)
  saved = ckpt_lib.saved_steps(workdir)
  if saved and saved[-1] >= steps and ckpt_lib.saved_with_model(workdir, saved[-1], config):
    say(
      f"Already complete: {os.path.join(ckpt_lib.checkpoint_dir(workdir), str(saved[-1]))} is the final "
      f"checkpoint of this {steps}-step run; nothing to do (raise trainer.max_steps to train further)"
    )
    return {"already_complete": True, "step": saved[-1]}
  if t.warmup_steps >= steps:
    warn(
      f"trainer.warmup_steps={t.warmup_steps} is not below the {steps} training steps: the learning rate "
      f"climbs for the whole run and reaches trainer.learning_rate={t.learning_rate:g} only at the last "
      "step, with no decay"
    )

  # Compiled (and checked against the device's memory) before the state exists, so on CPU the host
  # memory it is checked against is still free; with model.remat=auto this picks the policy.
  compile_start = time.time()
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  capacity, where = memory.device_capacity_bytes(device), memory.capacity_source(device)
  say(
    f"Compiling the train step (model.remat={config.model.get('remat', 'auto')}; "
    f"{reports.fmt_bytes(capacity)} per device: {where})"
  )
  program, train_step, remat, remat_table = train_program.compile_to_fit(
    config, None, cfg.vocab_size, steps, capacity, mesh=mesh, where=where
  )
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
  say(
    f"Data: {corpus.description}; {len(corpus.train):,} train / {len(corpus.val):,} validation tokens; "
    f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size}, model vocab {cfg.vocab_size})"
  )
  say("Parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "vectors"))
  say(
    f"FLOPs per step: {flops['total'] * tokens_per_step:.3e} ({flops['total']:.3e} per token: matmul "
    f"{flops['matmul']:.3e}, attention {flops['attention']:.3e}, ssd {flops['ssd']:.3e})"
  )
  say(
    f"Training {steps} steps of {t.batch_size} x {T} tokens on {jax.device_count()} "
    f"{jax.devices()[0].platform} device(s)"
  )
  say(plan.describe())

  eval_step = make_eval_step(model, plan.state, plan.batch, plan.rules, t.loss_chunk_size)
  say(f"Compiled the train step in {compile_s:.1f}s")
  say(reports.memory_line(memory.memory_stats(train_step)))
  say(reports.remat_line(remat, remat_table, capacity, config.model.get("remat", "auto") == "auto", where))

  say(f"Config: {config_lib.summary(config, cfg)}; every key in {write_config(config, workdir)}")
  for line in resume_lines:
    say(line)
  writer = metric_writers.MetricWriter(workdir, start_step, distributed.is_main(), t.tensorboard)
  history = writer.history
  progress = reports.Progress(steps, stream)
  profiler = profiling.StepProfiler(config_lib.profile_window(t.profile_steps), workdir, progress.message)
  peak = tpu_chips.peak_bf16_flops(device)  # None on CPUs: no MFU
  last_log_time, last_log_step = time.time(), start_step
  pending = None
  final = {}
  guard = preemption.NonFiniteGuard(t.max_skipped_steps, int(state.skipped), report=progress.message)
  last_saved = start_step
  with preemption.StopSignals() as stop:
    try:
      for step in range(start_step, steps):
        profiler.before(step + 1)
        state, metrics = train_step(state, plan.put(next(iterator)))
        done = step + 1
        profiler.after(done, state)
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
            record["model_tflops_per_s"] = flops["total"] * tok_s / jax.device_count() / 1e12  # per device
            if peak:
              record["mfu"] = record["model_tflops_per_s"] * 1e12 / peak
            if "load" in metrics:
              load = np.asarray(jax.device_get(metrics["load"]))  # [MoE layers, experts]: share of tokens
              record.update(
                load_min=float(load.min()),
                load_max=float(load.max()),
                load_cv=float(np.mean(load.std(-1) / np.maximum(load.mean(-1), 1e-9))),
              )
              for layer, layer_load in enumerate(load.reshape(-1, load.shape[-1])):
                writer.histogram(done, f"moe/expert_load/{layer}", layer_load)
            writer.write(record)
        scheduled_save = done % t.save_interval == 0 or done == steps
        ev = None
        if val_batches and (done % t.eval_interval == 0 or done == steps or (t.keep_best and scheduled_save)):
          ev = evaluate(eval_step, state, val_batches)
          progress.message(f"step {done}: validation loss {ev['val_loss']:.4f}, perplexity {ev['val_perplexity']:.2f}")
          writer.write({"step": done, **ev})
          final.update(ev)
        if (scheduled_save or stop.received) and done != last_saved:
          guard.flush()  # never save over the last good checkpoint once the skip limit is reached
          checkpointer.save(done, state, iterator.get_state(), config, ev["val_loss"] if ev else None)
          last_saved = done
        if stop.received:
          break
      profiler.stop(state)
      checkpointer.close()
    except BaseException:
      profiler.stop()
      writer.close()
      close_after_error(checkpointer)
      raise
  final.update(pending or {})
  final["skipped_updates"] = guard.total
  if stop.received and last_saved < steps:
    progress.message(
      f"Stopped by {stop.received} after step {last_saved}; saved "
      f"{os.path.join(checkpointer.directory, str(last_saved))}. To resume, run:\n"
      f"  cd {shlex.quote(os.getcwd())} && {preemption.resume_command(workdir, argv)}"
    )
    writer.close()
    return {**final, "stopped_by": stop.received, "step": last_saved}
  best = checkpointer.best_step() if t.keep_best else None
  if best:
    say(f"Best checkpoint: {os.path.join(checkpointer.directory, str(best[0]))} (validation loss {best[1]:.4f})")

  if history and distributed.is_main():
    metric_writers.save_loss_curve(os.path.join(workdir, "loss.png"), history)
    say(f"Loss curve: {os.path.join(workdir, 'loss.png')}")
  first = next((h["loss"] for h in history if "loss" in h), None)
  if first is not None and pending:
    say(f"Loss: {first:.4f} at the first log -> {pending['loss']:.4f} at step {steps}")
  if config.sample.max_new_tokens > 0:
    text = sample_text(config, model, state, tokenizer, cfg)
    say(
      f"Sample (prompt {config.sample.prompt!r}, temperature {config.sample.temperature}):\n"
      f"{config.sample.prompt}{text}"
    )
    final["sample"] = text
    writer.text(steps, "sample", config.sample.prompt + text)
  writer.close()
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
  changed = [
    f"{k} {saved[k]} -> {current[k]}"
    for k in ("seed", "batch_size", "seq_len", "packing")
    if k in saved and saved[k] != current[k]
  ]
  if changed:
    warn(
      f"the data order differs from the checkpoint's ({', '.join(changed)}): resumed batches are not the "
      "ones an unbroken run would see"
    )
  iterator.set_state(saved)
  say(f"Resuming from {checkpointer.directory} step {int(state.step)}")
  return state, int(state.step)


def close_after_error(checkpointer: ckpt_lib.Checkpointer) -> None:
  """Lets a background save of an earlier step finish; its own failure is reported, not raised."""
  try:
    checkpointer.close()
  except Exception as e:
    warn(cli.one_line(e))


def sample_text(config, model, state, tokenizer, cfg) -> str:
  s = config.sample
  prompt = tokenizer.encode(s.prompt)
  ids = sample_without_cache(
    model,
    {"params": state.params, **state.model_state},
    prompt,
    s.max_new_tokens,
    jax.random.PRNGKey(config.trainer.seed + 1),
    s.temperature,
    s.top_k,
    min(cfg.max_seq_len, len(prompt) + s.max_new_tokens),
  )
  return tokenizer.decode(ids)
