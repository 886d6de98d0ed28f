"""Bits per byte and the evaluation of a training workdir's newest checkpoint.

`evaluate_workdir` evaluates the run's held-out split in the batches the training loop evaluates (the same
windows or packed documents, batch size and sequence length, so the loss equals the run's last validation
loss), or a given
file or folder whole. Bits per byte = total nats / ln 2 / the UTF-8 bytes the evaluated target tokens
decode to (for the byte tokenizer: the non-EOS targets).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from mla_jax import cli
from mla_jax import config as config_lib
from mla_jax.data import ByteTokenizer, eval_batches, load_corpus
from mla_jax.data.packing import document_offsets
from mla_jax.errors import DataError, UserError, WorkdirError
from mla_jax.model import LanguageModel
from mla_jax.train_step import evaluation_totals, make_eval_step
from mla_jax.workdir import load


def target_bytes(tokenizer, targets_BT: np.ndarray, weights_BT: np.ndarray | None = None) -> int:
  """UTF-8 bytes that the target tokens decode to: non-EOS tokens for bytes, else each row decoded.
  Targets of weight 0 (the padding of packed rows) count nothing."""
  targets_BT = np.asarray(targets_BT)
  scored_BT = np.ones(targets_BT.shape, bool) if weights_BT is None else np.asarray(weights_BT) > 0
  if isinstance(tokenizer, ByteTokenizer):
    return int(np.sum((targets_BT < 256) & scored_BT))
  eos = getattr(tokenizer, "eos_id", None)
  total = 0
  for row, scored in zip(targets_BT, scored_BT, strict=True):
    ids = [int(t) for t, keep in zip(row, scored, strict=True) if keep and (eos is None or int(t) != eos)]
    total += len(tokenizer.decode(ids).encode("utf-8"))
  return total


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
  """Total nats / ln 2 / bytes (nan when there are no bytes)."""
  return nll_nats / math.log(2.0) / num_bytes if num_bytes else float("nan")


def evaluation_data(config, tokenizer, data: str | None):
  """(tokens, documents, description): the run's held-out split, or the whole of `data`; `documents` are
  the document offsets to pack under data.packing=documents (None for stream windows)."""
  data_cfg = config.data
  if data:
    data_cfg = config_lib.default_config().data
    data_cfg.update(dict(config.data))
    data_cfg.corpus, data_cfg.format, data_cfg.val_fraction = data, "auto", 0.0
    data_cfg.max_bytes = sys.maxsize
  corpus = load_corpus(data_cfg, tokenizer, config.model.vocab_size)
  tokens, offsets = (corpus.train, corpus.train_offsets) if data else (corpus.val, corpus.val_offsets)
  documents = None
  if config.data.packing == "documents":
    documents = document_offsets(tokens, offsets, tokenizer.eos_id, corpus.source, require=False)
  if data:
    return tokens, documents, f"{data} (all {len(tokens):,} tokens)"
  return tokens, documents, f"held-out split of {config.data.corpus} ({len(tokens):,} tokens)"


def evaluate_workdir(
  workdir: str, data: str | None = None, batches: int | None = None, json_path: str | None = None, stream=sys.stdout
) -> dict:
  """Evaluates the newest checkpoint in `workdir`, prints a table, and returns the JSON record it writes
  (to `json_path`, default <workdir>/eval.json).

  `batches` caps the number of batches (default: trainer.eval_steps; 0: every window)."""
  if batches is not None and batches < 0:
    raise UserError(f"--batches must be >= 0, got {batches}")
  config, cfg, variables, tokenizer, step = load(workdir)
  tokens, documents, description = evaluation_data(config, tokenizer, data)
  T = config_lib.seq_len(config)
  batch_size = config.trainer.batch_size
  if batches is None:
    batches = config.trainer.eval_steps
  windows = (len(tokens) - 1) // T
  if data and 0 < windows < batch_size:
    batch_size = windows  # a small file still gets one (smaller) batch
  source = data or "the held-out split"
  batch_list = eval_batches(tokens, batch_size, T, batches or sys.maxsize, source, documents=documents)
  if not batch_list:
    raise DataError(f"{source}: no evaluation batch of {batch_size} x {T} tokens")
  model_state = {k: v for k, v in variables.items() if k != "params"}
  eval_step = make_eval_step(LanguageModel(cfg), loss_chunk_size=config.trainer.get("loss_chunk_size", 0))
  nll, count = evaluation_totals(eval_step, variables["params"], model_state, batch_list)
  num_bytes = sum(target_bytes(tokenizer, b["targets"], b.get("weights")) for b in batch_list)
  loss = nll / max(count, 1.0)
  record = {
    "workdir": os.path.abspath(workdir),
    "step": int(step),
    "data": description,
    "batches": len(batch_list),
    "batch_size": batch_size,
    "seq_len": T,
    "tokens": int(count),
    "bytes": num_bytes,
    "nll_nats": nll,
    "loss": loss,
    "perplexity": math.exp(min(loss, 50.0)),
    "bits_per_byte": bits_per_byte(nll, num_bytes),
  }
  rows = [
    ("checkpoint", f"{record['workdir']} step {step}"),
    ("data", description),
    ("evaluated", f"{len(batch_list)} batches x {batch_size} x {T} = {int(count):,} tokens, {num_bytes:,} bytes"),
    ("loss (nats/token)", f"{loss:.6f}"),
    ("perplexity", f"{record['perplexity']:.4f}"),
    ("bits per byte", f"{record['bits_per_byte']:.6f}"),
  ]
  width = max(len(name) for name, _ in rows)
  stream.write("".join(f"{name:<{width}}  {value}\n" for name, value in rows))
  json_path = json_path or os.path.join(workdir, "eval.json")
  try:
    with open(json_path, "w") as f:
      json.dump(record, f, indent=2)
      f.write("\n")
  except OSError as e:
    raise WorkdirError(f"{json_path}: cannot write the results ({cli.one_line(e)})") from e
  stream.write(f"wrote {json_path}\n")
  stream.flush()
  return record
