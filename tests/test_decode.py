"""Decoding with caches: prefill + token steps == full forward, absorbed == expanded MLA, cache sizes,
sampling, and the generate entry point."""

import dataclasses
import functools
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config
from flax import linen as nn

from mla_jax import cache as cache_lib
from mla_jax.decode import Decoder, generate_text
from mla_jax.errors import UserError
from mla_jax.layers.mla import MLA
from mla_jax.model import LanguageModel, init_params
from mla_jax.sampling import sample_logits
from mla_jax.trainer import train_and_evaluate
from mla_jax.workdir import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, S = 2, 10, 13  # batch, tokens compared, cache slots (slots T..S-1 are never written)
P1, P2 = 3, 6  # prefill tokens [0, P1), a second multi-token chunk [P1, P2) on the filled cache, then steps


@functools.cache
def _params(cfg):
  return init_params(cfg, jax.random.PRNGKey(0))[0]


def _tokens(cfg):
  return jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, cfg.vocab_size)


@functools.cache
def _forward_and_decode(cfg, mla_decode):
  """One jitted program: the full forward pass, and prefill + chunk + per-token decode through caches."""
  model = LanguageModel(cfg)

  @jax.jit
  def run(params, tokens_BT):
    v = {"params": params}
    full_BTV = model.apply(v, tokens_BT)[0]
    caches = cache_lib.init_caches(cfg, B, S, jnp.float32, mla_decode)
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    first_BTV, _, caches = model.apply(v, tokens_BT[:, :P1], pos_BT[:, :P1], caches)
    chunk_BTV, _, caches = model.apply(v, tokens_BT[:, P1:P2], pos_BT[:, P1:P2], caches)

    def step(caches, t):
      token_B1 = jax.lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1)
      logits_B1V, _, caches = model.apply(v, token_B1, jnp.full((B, 1), t, jnp.int32), caches)
      return caches, logits_B1V[:, 0]

    caches, steps_TBV = jax.lax.scan(step, caches, jnp.arange(P2, T))
    return full_BTV, jnp.concatenate([first_BTV, chunk_BTV, steps_TBV.swapaxes(0, 1)], axis=1), caches

  return run


# Every mixer and MLA variant once; the expanded MLA decode once (test_absorbed_equals_expanded_on_a_random_cache
# compares the two decode forms directly).
CASES = [
  ("gqa", "absorbed", {}),
  ("mla", "absorbed", {}),
  ("mla", "expanded", {}),
  ("mla", "absorbed", {"mla_latent_norms": False, "mla_q_rope_from_input": True}),
  ("mla_noq", "absorbed", {}),
  ("moe", "absorbed", {}),
  ("mamba2", "absorbed", {}),
  ("hybrid", "absorbed", {}),
]


@pytest.mark.parametrize("kind,mla_decode,overrides", CASES)
def test_cached_decode_equals_full_forward(kind, mla_decode, overrides):
  cfg = tiny_model_config(kind, **overrides)
  full_BTV, decoded_BTV, caches = _forward_and_decode(cfg, mla_decode)(_params(cfg), _tokens(cfg))
  np.testing.assert_allclose(decoded_BTV, full_BTV, atol=1e-4, rtol=0)
  assert float(jnp.std(full_BTV)) > 1e-2  # the logits carry signal, so agreement is not vacuous
  for i, c in enumerate(caches):  # caches keep their preallocated shapes and slots >= T stay empty
    kind_i = cfg.mixer_kind(i)
    if kind_i == "mla":
      assert c.decode == mla_decode and c.c_kv.shape == (B, S, cfg.kv_latent_dim)
      assert float(jnp.abs(c.c_kv[:, T:]).max()) == 0.0 and bool(jnp.all(jnp.any(c.c_kv[:, :T] != 0, axis=-1)))
    elif kind_i == "gqa":
      assert c.k.shape == (B, cfg.kv_heads, S, cfg.head_dim) and float(jnp.abs(c.v[:, :, T:]).max()) == 0.0


def test_cache_write_puts_each_row_at_its_positions_and_refuses_overflow():
  cache_BSKD = jnp.arange(2 * 6 * 2 * 3, dtype=jnp.float32).reshape(2, 6, 2, 3)
  new_BTKD = -1.0 - jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
  write = jax.jit(cache_lib.write)

  def expected(pos_BT):
    out = np.array(cache_BSKD)
    for b in range(2):
      for t in range(2):
        if 0 <= pos_BT[b][t] < 6:
          out[b, pos_BT[b][t]] = new_BTKD[b, t]
    return out

  for pos_BT in ([[1, 2], [4, 5]], [[3, 0], [2, 1]]):  # per-row starts; any order within a row
    np.testing.assert_array_equal(cache_lib.write(cache_BSKD, new_BTKD, jnp.asarray(pos_BT)), expected(pos_BT))
    np.testing.assert_array_equal(write(cache_BSKD, new_BTKD, jnp.asarray(pos_BT)), expected(pos_BT))
  for pos_BT in ([[5, 6], [0, 1]], [[0, 1], [-1, 0]]):  # past the end, before the start: an error ...
    with pytest.raises(cache_lib.CacheOverflowError, match="the cache has 6 slots"):
      cache_lib.write(cache_BSKD, new_BTKD, jnp.asarray(pos_BT))
    # ... and under jit the write is dropped, never clamped onto another slot
    np.testing.assert_array_equal(write(cache_BSKD, new_BTKD, jnp.asarray(pos_BT)), expected(pos_BT))
  for position in (-1, 6, 60):  # one row, one token (batch-1 decode): the same
    out = write(cache_BSKD[:1], new_BTKD[:1, :1], jnp.full((1, 1), position))
    np.testing.assert_array_equal(out, cache_BSKD[:1])
    with pytest.raises(cache_lib.CacheOverflowError):
      cache_lib.write(cache_BSKD[:1], new_BTKD[:1, :1], jnp.full((1, 1), position))
  with pytest.raises(cache_lib.CacheOverflowError, match="7 tokens but the cache has 6 slots"):
    write(cache_BSKD, jnp.zeros((2, 7, 2, 3)), jnp.zeros((2, 7), jnp.int32))


def test_rows_at_different_lengths_decode_like_the_full_forward():
  """Rows prefilled separately to different lengths, then decoded together (per-row positions, one token
  and then two tokens in a call): each row's logits equal the full forward pass of that row."""
  cfg = tiny_model_config("mla")  # absorbed one-token steps, expanded two-token chunks
  model, lengths = LanguageModel(cfg), (4, 7)

  @jax.jit
  def run(params, tokens_BT):
    v = {"params": params}
    full_BTV = model.apply(v, tokens_BT)[0]
    rows = []
    for b, n in enumerate(lengths):
      caches = cache_lib.init_caches(cfg, 1, S, jnp.float32)
      pos_1T = jnp.arange(n, dtype=jnp.int32)[None]
      rows.append(model.apply(v, tokens_BT[b : b + 1, :n], pos_1T, caches))
    caches = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), rows[0][2], rows[1][2])
    start_B = jnp.asarray(lengths, jnp.int32)
    outs = []
    for width in (1, 2):
      pos_BT = start_B[:, None] + jnp.arange(width, dtype=jnp.int32)
      logits_BTV, _, caches = model.apply(v, jnp.take_along_axis(tokens_BT, pos_BT, axis=1), pos_BT, caches)
      outs.append((pos_BT, logits_BTV))
      start_B = start_B + width
    return full_BTV, outs

  tokens = _tokens(cfg)
  full_BTV, outs = run(_params(cfg), tokens)
  for pos_BT, logits_BTV in outs:
    for b in range(B):
      np.testing.assert_allclose(logits_BTV[b], full_BTV[b, pos_BT[b]], atol=1e-4, rtol=0)
  assert int(outs[-1][0][1, -1]) == T - 1  # the longer row reaches the last compared token


def test_absorbed_equals_expanded_on_a_random_cache():
  """One MLA decode step over a cache of random latents (unwritten slots hold garbage too): the
  absorbed form (W_UK into the query, W_UV after the latent sum) equals rebuilding K and V."""
  cfg = tiny_model_config("mla")
  layer = MLA(cfg)
  key = jax.random.PRNGKey(2)
  x_B1D = jax.random.normal(key, (B, 1, cfg.hidden_size))
  params = nn.meta.unbox(jax.jit(layer.init)(key, x_B1D, jnp.zeros((B, 1), jnp.int32)))
  c_kv = 3.0 * jax.random.normal(jax.random.fold_in(key, 1), (B, S, cfg.kv_latent_dim))
  k_rope = 3.0 * jax.random.normal(jax.random.fold_in(key, 2), (B, S, cfg.d_rope))
  apply = jax.jit(layer.apply)
  for position in (0, 7, S - 1):
    pos_B1 = jnp.full((B, 1), position, jnp.int32)
    outs = {}
    for mode in cache_lib.MLA_DECODE_MODES:
      y_B1D, new = apply(params, x_B1D, pos_B1, cache_lib.MLACache(c_kv, k_rope, decode=mode))
      outs[mode] = y_B1D
      np.testing.assert_array_equal(new.c_kv[:, position + 1 :], c_kv[:, position + 1 :])
    np.testing.assert_allclose(outs["absorbed"], outs["expanded"], atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(outs["absorbed"]).mean()) > 1e-3
  # The absorbed step forms no [*, S, H, head_dim] keys: its program has no S x H x head_dim value.
  hlo = {
    mode: apply.lower(params, x_B1D, pos_B1, cache_lib.MLACache(c_kv, k_rope, decode=mode)).as_text()
    for mode in cache_lib.MLA_DECODE_MODES
  }
  k_shape = f"tensor<{B}x{S}x{cfg.num_heads}x{cfg.head_dim}xf32>"
  assert k_shape in hlo["expanded"] and k_shape not in hlo["absorbed"]


@pytest.mark.parametrize("kind", ["mla", "gqa", "mamba2", "hybrid"])
def test_cache_sizes(kind):
  cfg = tiny_model_config(kind)
  for length in (16, 48):
    caches = cache_lib.init_caches(cfg, 3, length, jnp.float32)
    summary = cache_lib.cache_summary(cfg, length, batch=3)
    assert cache_lib.cache_nbytes(caches) == summary["total_bytes"]  # the report counts the real arrays
    for i, c in enumerate(caches):
      if cfg.mixer_kind(i) == "mla":  # c_kv and k_rope only: (d_c + d_rope) values per token per layer
        assert {f.name for f in dataclasses.fields(c)} == {"c_kv", "k_rope", "decode"}
        values = sum(x.size for x in jax.tree_util.tree_leaves(c))
        assert values == 3 * length * (cfg.kv_latent_dim + cfg.d_rope)
  if "mamba2" in {cfg.mixer_kind(i) for i in range(cfg.num_layers)}:
    short, long = (cache_lib.init_caches(cfg, 2, n) for n in (8, 4096))
    for i in range(cfg.num_layers):
      if cfg.mixer_kind(i) == "mamba2":
        assert jax.tree_util.tree_map(jnp.shape, short[i]) == jax.tree_util.tree_map(jnp.shape, long[i])
        assert cache_lib.values_per_token(cfg, i) == 0 and cache_lib.fixed_bytes(cfg, i, 4) > 0


def test_cache_report_numbers():
  cfg = tiny_model_config("mla")  # 2 layers, 4 heads of 16, kv_heads 4 (MHA), d_c 32, d_rope 8
  s = cache_lib.cache_summary(cfg, length=100, batch=2)
  assert s["bytes_per_token"] == 2 * (32 + 8) * 4
  eq = {e["name"].split()[0]: e for e in s["equivalents"]}
  assert eq["MHA"]["bytes"] == 2 * 2 * 100 * 64 * 4 * 2  # seed: 2 x layers x seq x hidden, x 4 bytes x batch
  assert eq["MLA"]["bytes"] == s["total_bytes"] == 2 * 100 * 40 * 4 * 2
  text = cache_lib.cache_report(cfg, 100, 2)
  assert "this model: mla" in text and "equivalent: MHA" in text and "0.312x" in text


def test_top_k_one_is_greedy_and_seeds_are_deterministic():
  logits = jax.random.normal(jax.random.PRNGKey(3), (16, 50)) * 3
  greedy = sample_logits(logits, jax.random.PRNGKey(0), temperature=0.0)
  for seed in range(3):
    np.testing.assert_array_equal(sample_logits(logits, jax.random.PRNGKey(seed), 1.5, top_k=1), greedy)
  cfg = tiny_model_config("hybrid")
  variables = {"params": _params(cfg)}
  prompt = [5, 9, 2, 7]
  run = lambda dec, seed: dec.generate(variables, prompt, 12, jax.random.PRNGKey(seed), batch=2, max_len=32)[0]
  sampler = Decoder(cfg, temperature=1.5, top_k=0)
  first, again, other = run(sampler, 0), run(sampler, 0), run(sampler, 1)
  np.testing.assert_array_equal(first, again)
  assert first.shape == (2, 12) and not np.array_equal(first, other) and not np.array_equal(first[0], first[1])
  greedy_tokens = run(Decoder(cfg, temperature=0.0), 0)
  np.testing.assert_array_equal(greedy_tokens[0], greedy_tokens[1])
  # Greedy decoding with caches picks the argmax of the full forward pass at every step.
  seq = np.concatenate([np.asarray(prompt), greedy_tokens[0]])[None]
  logits = LanguageModel(cfg).apply(variables, jnp.asarray(seq))[0]
  np.testing.assert_array_equal(np.argmax(logits[0, len(prompt) - 1 : -1], -1), greedy_tokens[0])


def test_several_tokens_per_call_equal_one_token_per_call():
  """Decoder.steps (an on-device loop of up to tokens_per_call steps) gives the tokens of one step per call,
  sampled and with rows finishing at eos (the loop stops once every row has produced it), and streams the
  same tokens in order (the hybrid: Mamba2 and MLA caches)."""
  cfg = tiny_model_config("hybrid")
  variables = {"params": _params(cfg)}
  prompt = [5, 9, 2, 7]
  rng = jax.random.PRNGKey(4)

  def run(per_call, eos_id=None):
    streamed = []
    decoder = Decoder(cfg, temperature=1.2, top_k=0, tokens_per_call=per_call)
    tokens, stats = decoder.generate(
      variables, prompt, 21, rng, batch=2, max_len=32, eos_id=eos_id, on_token=streamed.append
    )
    np.testing.assert_array_equal(np.stack(streamed, axis=1), tokens)
    assert stats["decode_steps"] == tokens.shape[1] - 1
    return tokens

  one = run(1)
  assert one.shape == (2, 21) and not np.array_equal(one[0], one[1])
  for per_call in (3, 64):  # 20 decode steps: calls of 3 (the last one short) and one call for all
    np.testing.assert_array_equal(run(per_call), one)
  # eos: of the tokens both rows sample, the one both have produced soonest; generation stops there.
  first = lambda row, t: list(row).index(t)
  eos = min(set(one[0]) & set(one[1]), key=lambda t: max(first(one[0], t), first(one[1], t)))
  stopped = run(1, int(eos))
  assert stopped.shape[1] == 1 + max(first(one[0], eos), first(one[1], eos)) < one.shape[1]
  np.testing.assert_array_equal(stopped, one[:, : stopped.shape[1]])
  for per_call in (4, 64):  # rows that finished in an earlier call stay finished
    np.testing.assert_array_equal(run(per_call, int(eos)), stopped)
  with pytest.raises(UserError, match="tokens_per_call"):
    Decoder(cfg, tokens_per_call=-1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  config = tiny_config("mla")
  config.data.max_bytes = 200_000
  config.trainer.max_steps = config.trainer.save_interval = 2
  config.trainer.eval_steps = config.sample.max_new_tokens = 0
  train_and_evaluate(config, str(path), stream=io.StringIO())
  return str(path)


def test_generate_loads_params_only_and_is_deterministic(workdir):
  _, cfg, variables, tokenizer, step = load(workdir)
  assert step == 2 and set(variables) == {"params"} and cfg.use_mla
  out, log = io.StringIO(), io.StringIO()
  texts = generate_text(
    workdir, "def f", max_new_tokens=10, temperature=0.9, top_k=20, seed=3, batch=2, stream=out, log=log
  )
  again = generate_text(
    workdir,
    "def f",
    max_new_tokens=10,
    temperature=0.9,
    top_k=20,
    seed=3,
    batch=2,
    stream=io.StringIO(),
    log=io.StringIO(),
  )
  assert texts == again and len(texts) == 2
  assert out.getvalue().startswith("def f" + texts[0])
  assert "prefill:" in log.getvalue() and "tokens/s" in log.getvalue()


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "mla_jax.generate", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


def test_generate_cli_streams_greedy_text(workdir):
  out = _cli(f"--workdir={workdir}", "--prompt=import ", "--max_new_tokens=8", "--temperature=0")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("import ") and "decode:" in out.stderr and "tokens/s" in out.stderr
  again = _cli(
    f"--workdir={workdir}", "--prompt=import ", "--max_new_tokens=8", "--top_k=1", "--seed=5", "--mla_decode=expanded"
  )
  assert again.returncode == 0 and again.stdout == out.stdout


def test_report_cache_cli():
  out = _cli("--config=configs/gqa.py", "--report_cache", "--length=1024", "--batch=2")
  assert out.returncode == 0, out.stderr
  assert "this model: gqa | 8 | 512 | 2,048" in out.stdout and "32.00 MiB" in out.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "prompt_too_long", "config_mismatch", "no_config"])
def test_generate_cli_errors_are_one_line(case, workdir, tmp_path):
  args = {
    "missing": [f"--workdir={tmp_path / 'nope'}", "--prompt=x"],
    "empty": [f"--workdir={tmp_path}", "--prompt=x"],
    "prompt_too_long": [f"--workdir={workdir}", "--prompt=" + "x" * 20, "--max_len=16"],
    "config_mismatch": [f"--workdir={workdir}", "--config=configs/mla.py", "--prompt=x"],
    "no_config": ["--report_cache"],
  }[case]
  expected = {
    "missing": "does not exist",
    "empty": "no checkpoints",
    "prompt_too_long": "20 tokens",
    "config_mismatch": "parameters do not match the config",
    "no_config": "needs --config",
  }[case]
  out = _cli(*args)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr
