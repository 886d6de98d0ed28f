"""Decoding with caches: a jitted prefill and single-token step (`Decoder`), text streamed as tokens arrive
(`TextStream`), and generation from a training workdir (`generate_text`).

The prompt is prefilled in one call (jitted once per prompt shape); then a jitted single-token step with
fixed shapes (token [B, 1], scalar position, caches preallocated to the final length and donated) produces
each new token. `Decoder.step` runs it once per call; `Decoder.steps` runs it in an on-device loop, up to
`tokens_per_call` tokens per call (stopping early once every row has produced eos), which saves the
per-call dispatch. Both compile once before the loop and give the same tokens; streamed text arrives once
per call. Temperature 0 or top_k 1 is greedy and deterministic; sampling is deterministic per seed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mla_jax import cache as cache_lib
from mla_jax import config as config_lib
from mla_jax.data import load_tokenizer
from mla_jax.errors import UserError
from mla_jax.model import LanguageModel
from mla_jax.sampling import sample_logits
from mla_jax.train_program import resolve_model_config
from mla_jax.workdir import load
from mla_jax.xla_options import compiler_options

STREAM_TOKENS_PER_CALL = 8  # streamed text arrives in bursts of at most this many tokens
BATCH_TOKENS_PER_CALL = 64


class Decoder:
  """Jitted prefill and single-token decode step for one model, sampling settings and batch size."""

  def __init__(
    self,
    cfg: config_lib.ModelConfig,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    mla_decode: str = "absorbed",
    tokens_per_call: int = 0,
    platform: str | None = None,
  ):
    """tokens_per_call: new tokens per jitted call; 0 picks STREAM_TOKENS_PER_CALL when `generate` streams
    (on_token) and BATCH_TOKENS_PER_CALL when it does not; 1 is one call per token. `platform`: the
    compile target when it is not JAX's default backend (mla_jax.xla_options)."""
    if tokens_per_call < 0:
      raise UserError(f"tokens_per_call must be >= 0 (0: automatic), got {tokens_per_call}")
    self.cfg, self.mla_decode, self.tokens_per_call = cfg, mla_decode, tokens_per_call
    model = LanguageModel(cfg)
    sample = lambda logits_BV, rng: sample_logits(logits_BV, rng, temperature, top_k, top_p)

    def prefill(variables, tokens_BT, caches, rng):
      B, T = tokens_BT.shape
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      logits_B1V, _, caches = model.apply(variables, tokens_BT, positions_BT, caches, last_logits_only=True)
      return sample(logits_B1V[:, -1], jax.random.fold_in(rng, T - 1)), caches

    def step(variables, token_B, position, caches, rng):
      B = token_B.shape[0]
      positions_B1 = jnp.full((B, 1), position, jnp.int32)
      logits_B1V, _, caches = model.apply(variables, token_B[:, None], positions_B1, caches)
      return sample(logits_B1V[:, 0], jax.random.fold_in(rng, position)), caches

    def steps(variables, token_B, position, count, caches, rng, eos_id, finished_B, *, n):
      """Up to `count` <= n steps from `position`, stopping after the step where every row has produced
      eos_id (-1: never; `finished_B`: the rows that already have): (tokens [n, B] (the first `done` rows
      valid), done, caches)."""

      def unfinished(carry):
        i, _, _, _, finished_B = carry
        return (i < count) & ~jnp.all(finished_B)

      def body(carry):
        i, token_B, caches, tokens_NB, finished_B = carry
        token_B, caches = step(variables, token_B, position + i, caches, rng)
        return i + 1, token_B, caches, tokens_NB.at[i].set(token_B), finished_B | (token_B == eos_id)

      tokens_NB = jnp.zeros((n,) + token_B.shape, jnp.int32)
      init = (jnp.int32(0), token_B, caches, tokens_NB, finished_B)
      done, _, caches, tokens_NB, _ = jax.lax.while_loop(unfinished, body, init)
      return tokens_NB, done, caches

    forward, decode = (compiler_options(cfg, purpose, platform) for purpose in ("sequence", "decode"))
    self.prefill = jax.jit(prefill, donate_argnums=(2,), compiler_options=forward)
    self.step = jax.jit(step, donate_argnums=(3,), compiler_options=decode)
    self.steps = jax.jit(steps, donate_argnums=(4,), static_argnames=("n",), compiler_options=decode)

  def compile(self, variables, batch: int, prompt_len: int, max_len: int, rng, tokens_per_call: int = 1):
    """Compiles the prefill for this prompt length and the decode for this cache length (no execution):
    `step` (one token per call) when tokens_per_call is 1, else `steps` with room for that many tokens."""
    caches = jax.eval_shape(lambda: cache_lib.init_caches(self.cfg, batch, max_len, mla_decode=self.mla_decode))
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    token, scalar = jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    prefill = self.prefill.lower(variables, tokens, caches, rng).compile()
    if tokens_per_call == 1:
      return prefill, self.step.lower(variables, token, scalar, caches, rng).compile()
    finished = jax.ShapeDtypeStruct((batch,), jnp.bool_)
    steps = self.steps.lower(variables, token, scalar, scalar, caches, rng, scalar, finished, n=tokens_per_call)
    return prefill, steps.compile()

  def generate(
    self,
    variables,
    prompt_ids,
    max_new_tokens: int,
    rng,
    batch: int = 1,
    max_len: int = 0,
    eos_id: int | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
  ):
    """Returns (new tokens [batch, n] int32, stats). `on_token` receives each step's tokens [batch], as
    each call returns them.

    The caches hold len(prompt) + max_new_tokens slots (at most max_len). Generation stops early once
    every row has produced `eos_id` (tokens after a row's eos are dropped from its text, not from the array).
    """
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    P = len(prompt)
    max_len = max_len or self.cfg.max_seq_len
    if P == 0:
      raise UserError("the prompt has no tokens")
    if max_len <= P:
      raise UserError(
        f"the prompt has {P} tokens but the maximum length is {max_len}: nothing can be generated "
        "(shorten the prompt or raise --max_len)"
      )
    new = min(max_new_tokens, max_len - P)
    if new <= 0:
      return np.zeros((batch, 0), np.int32), {}
    S = P + new
    auto = STREAM_TOKENS_PER_CALL if on_token else BATCH_TOKENS_PER_CALL
    per_call = max(1, min(self.tokens_per_call or auto, new - 1))
    t0 = time.perf_counter()
    prefill, step = self.compile(variables, batch, P, S, rng, per_call)
    compile_s = time.perf_counter() - t0
    caches = cache_lib.init_caches(self.cfg, batch, S, mla_decode=self.mla_decode)
    tokens_BT = jnp.asarray(np.broadcast_to(prompt, (batch, P)))
    t0 = time.perf_counter()
    token_B, caches = prefill(variables, tokens_BT, caches, rng)
    token_B = np.asarray(token_B)
    prefill_s = time.perf_counter() - t0
    out = [token_B]
    if on_token:
      on_token(token_B)
    done_B = token_B == eos_id
    t0 = time.perf_counter()
    position, eos = P, jnp.int32(-1 if eos_id is None else eos_id)
    while position < S - 1 and not done_B.all():
      if per_call == 1:
        token_B, caches = step(variables, jnp.asarray(token_B), jnp.int32(position), caches, rng)
        new_NB = np.asarray(token_B)[None]
      else:
        count = jnp.int32(min(per_call, S - 1 - position))
        tokens_NB, made, caches = step(
          variables, jnp.asarray(token_B), jnp.int32(position), count, caches, rng, eos, done_B
        )
        new_NB = np.asarray(tokens_NB)[: int(made)]
      for token_B in new_NB:
        out.append(token_B)
        done_B |= token_B == eos_id
        if on_token:
          on_token(token_B)
      position += len(new_NB)
    decode_s = time.perf_counter() - t0
    steps = len(out) - 1
    stats = {
      "compile_s": compile_s,
      "prefill_s": prefill_s,
      "prefill_tokens_per_s": batch * P / prefill_s,
      "decode_steps": steps,
      "decode_s": decode_s,
      "decode_tokens_per_s": batch * steps / decode_s if steps else float("nan"),
      "cache_len": S,
    }
    return np.stack(out, axis=1), stats


class TextStream:
  """Prints the decoded text of row 0 as tokens arrive (held back while a UTF-8 character is incomplete)."""

  def __init__(self, tokenizer, stream=sys.stdout, eos_id: int | None = None):
    self.tokenizer, self.stream, self.eos_id = tokenizer, stream, eos_id
    self.ids: list[int] = []
    self.printed = 0
    self.stopped = False

  def __call__(self, token_B: np.ndarray) -> None:
    if self.stopped:
      return
    token = int(token_B[0])
    if token == self.eos_id:
      self.stopped = True
      return
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids)
    if text.endswith("\ufffd"):
      return
    self.stream.write(text[self.printed :])
    self.stream.flush()
    self.printed = len(text)

  def finish(self) -> None:
    text = self.tokenizer.decode(self.ids)
    self.stream.write(text[self.printed :] + "\n")
    self.stream.flush()


def _row_text(tokenizer, ids, eos_id) -> str:
  ids = [int(t) for t in ids]
  if eos_id is not None and eos_id in ids:
    ids = ids[: ids.index(eos_id)]
  return tokenizer.decode(ids)


def generate_text(
  workdir: str,
  prompt: str,
  max_new_tokens: int = 200,
  temperature: float = 0.8,
  top_k: int = 40,
  top_p: float = 1.0,
  seed: int = 0,
  batch: int = 1,
  max_len: int = 0,
  mla_decode: str = "absorbed",
  config: ml_collections.ConfigDict | None = None,
  stream=sys.stdout,
  log=sys.stderr,
):
  """Loads `workdir`, streams row 0's continuation of `prompt` to `stream`, and returns every row's text."""
  if batch < 1:
    raise UserError(f"--batch must be positive, got {batch}")
  if max_new_tokens < 0 or max_len < 0:
    raise UserError("--max_new_tokens and --max_len must be >= 0")
  if mla_decode not in cache_lib.MLA_DECODE_MODES:
    raise UserError(f"--mla_decode must be one of {', '.join(cache_lib.MLA_DECODE_MODES)}, got {mla_decode!r}")
  if not 0.0 < top_p <= 1.0:
    raise UserError(f"--top_p must be in (0, 1], got {top_p}")
  _, cfg, variables, tokenizer, step = load(workdir, config)
  eos_id = getattr(tokenizer, "eos_id", None)
  ids = tokenizer.encode(prompt)
  if len(ids) == 0 and eos_id is not None:
    ids = np.asarray([eos_id], np.int32)  # an empty prompt starts a new document
  max_len = max_len or cfg.max_seq_len
  if len(ids) >= max_len:
    raise UserError(
      f"the prompt has {len(ids)} tokens but the maximum length is {max_len}: nothing can be "
      "generated (shorten the prompt or raise --max_len)"
    )
  kinds = ", ".join(sorted({cfg.mixer_kind(i) for i in range(cfg.num_layers)}))
  greedy = temperature <= 0 or top_k == 1
  sampling = "greedy" if greedy else f"temperature {temperature}, top_k {top_k}, top_p {top_p}"
  log.write(
    f"Loaded step {step} from {workdir}: {cfg.num_layers} layers ({kinds}), vocab {cfg.vocab_size}; "
    f"prompt {len(ids)} tokens; {sampling}{f'; MLA {mla_decode} decode' if cfg.use_mla else ''}\n"
  )
  if len(ids) + max_new_tokens > max_len:
    log.write(f"generating {max_len - len(ids)} tokens: the maximum length is {max_len}\n")
  log.flush()
  decoder = Decoder(cfg, temperature, top_k, top_p, mla_decode)
  text_stream = TextStream(tokenizer, stream, eos_id)
  stream.write(prompt)
  stream.flush()
  tokens, stats = decoder.generate(
    variables, ids, max_new_tokens, jax.random.PRNGKey(seed), batch, max_len, eos_id, text_stream
  )
  text_stream.finish()
  texts = [_row_text(tokenizer, row, eos_id) for row in tokens]
  for b in range(1, batch):
    stream.write(f"--- row {b} ---\n{prompt}{texts[b]}\n")
  if stats:
    cache_mib = (
      cache_lib.cache_nbytes(jax.eval_shape(lambda: cache_lib.init_caches(cfg, batch, stats["cache_len"]))) / 2**20
    )
    log.write(
      f"prefill: {batch} x {len(ids)} tokens in {stats['prefill_s'] * 1e3:.1f} ms "
      f"({stats['prefill_tokens_per_s']:,.1f} tokens/s); decode: {batch} x {stats['decode_steps']} tokens "
      f"in {stats['decode_s']:.2f} s ({stats['decode_tokens_per_s']:,.1f} tokens/s); cache "
      f"{stats['cache_len']} slots, {cache_mib:.2f} MiB; compile {stats['compile_s']:.1f} s\n"
    )
    log.flush()
  return texts


def report_cache(config: ml_collections.ConfigDict, length: int, batch: int, stream=sys.stdout) -> str:
  """Writes (and returns) the decode-cache size table of `config`'s model for `batch` x `length` tokens."""
  config_lib.validate(config)
  if length <= 0 or batch <= 0:
    raise UserError("--length and --batch must be positive")
  tokenizer = load_tokenizer(config.data.tokenizer)
  cfg = resolve_model_config(config, tokenizer)
  text = cache_lib.cache_report(cfg, length, batch)
  stream.write(text)
  stream.flush()
  return text
