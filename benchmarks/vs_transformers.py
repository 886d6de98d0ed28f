r"""Training and decode tokens/s of mla_jax beside Hugging Face transformers (PyTorch) on the same models.

  pip install torch transformers        # CPU torch; not part of the package's dependencies
  python -m benchmarks.vs_transformers  # tiny models -> benchmarks/results/vs_transformers.md
  python -m benchmarks.vs_transformers --steps 2 --new_tokens 8 --no_write   # a smoke run
  JAX_PLATFORMS=cpu python -m benchmarks.vs_transformers --size seed   # -> results/vs_transformers_seed.md
  python -m benchmarks.vs_transformers --size seed --models mla,gqa --steps 2 --no_write   # a smoke run

Each model is built once in transformers with random weights, saved, and imported with
`mla_jax.convert.from_hf`, so both sides run the same function (the parity tests in
tests/test_convert.py and tests/test_hf_fixtures.py check that the logits agree to 1e-4). Both run float32 on
this CPU with the same number of threads (--threads: torch.set_num_threads, and below the core count the
process is pinned to that many CPUs; XLA's CPU client uses every CPU the process may run on).

- Training: one optimizer step (forward, backward, clip to norm 1, AdamW) on a batch of B x T tokens,
  median of --steps after two warm-up steps. mla_jax runs `make_train_step` (jitted, donated state);
  transformers runs eager PyTorch with the same loss (mean next-token cross-entropy).
- Decode: greedy generation of --new_tokens after a --prompt_len prompt, with each side's KV / SSM cache;
  tokens/s counts the tokens after the first (the prefill is timed apart). mla_jax: `mla_jax.decode.Decoder`
  (absorbed MLA decode, compiled before timing; up to 64 tokens per jitted call, the default of
  `generate` when nothing streams); transformers: `model.generate(do_sample=False)`.

`--size tiny` (the default): four ~2-6M-parameter models (DeepSeek-V2/V3 with MoE, Mamba2, a Granite 4.0-H
hybrid), vocabulary 320, training at 8 x 256, decode at batch 1 and 8 after a 32-token prompt, every core.

`--size seed`: the seed's 8-layer, hidden-512 models with an 8192-token vocabulary and untied embeddings:
MLA (DeepSeek-V3's dense shape), Mamba2, GQA (Llama) and MLA + MoE (DeepSeek-V3 routing), on 2 threads each
(torch.set_num_threads and the process pinned to 2 CPUs, by which XLA's CPU client sizes its thread pool);
training at 4 x 256, decode at batch 1, 128 new tokens after a 1024-token prompt. The same run measures the
machine, so that the rates read against what it can do:
- XLA's float32 matmul rate (best of jitted 1024^2 and 2048^2 `jnp.dot`); each train row's share of it is
  `model.flops_per_token` x tokens/s / that peak.
- the read bandwidth (best of a jitted `jnp.sum` and numpy's over 1 GiB of float32); each decode row's bound is
  bandwidth / bytes read per token, the bytes being the weights one token's step reads (count_params' active
  parameters: every parameter of a dense model, the dense part plus the top-k experts' share of a MoE, a lower
  bound; the untied embedding table counts one row) plus the cache read at the average context length (prompt +
  half the new tokens: MLA's latent and rope key, GQA's keys and values, Mamba2's constant conv and SSM state).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

import jax
import numpy as np

from benchmarks.common import (
  RESULTS,
  machine_lines,
  matmul_gflops,
  median_time,
  read_bandwidth_gbs,
  train_step_seconds,
  write_lines,
)
from mla_jax import convert
from mla_jax.config import ModelConfig, validate
from mla_jax.decode import Decoder
from mla_jax.model import count_params, flops_per_token

VOCAB = 320

DEEPSEEK = dict(
  vocab_size=VOCAB,
  hidden_size=256,
  intermediate_size=512,
  num_hidden_layers=4,
  num_attention_heads=8,
  num_key_value_heads=8,
  q_lora_rank=96,
  kv_lora_rank=64,
  qk_nope_head_dim=32,
  qk_rope_head_dim=16,
  v_head_dim=32,
  first_k_dense_replace=1,
  n_routed_experts=8,
  num_experts_per_tok=2,
  moe_intermediate_size=128,
  n_shared_experts=1,
  norm_topk_prob=False,
  max_position_embeddings=1024,
  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# DeepSeek-V3 routing on the same shape: sigmoid scores with the correction bias, 4 groups of 2 experts
# (the best 2 groups kept), top-2 renormalised and scaled.
DEEPSEEK_V3 = dict(
  DEEPSEEK,
  norm_topk_prob=True,
  n_group=4,
  topk_group=2,
  routed_scaling_factor=2.5,
  rope_interleave=True,
)
# Granite 4.0-H style hybrid: Mamba2 layers 0, 1, 3 and GQA attention (no RoPE) on 2, each followed by a
# MoE of 8 experts top-2 with a shared MLP; the muP multipliers of the published models.
GRANITE = dict(
  vocab_size=VOCAB,
  hidden_size=256,
  num_hidden_layers=4,
  num_attention_heads=8,
  num_key_value_heads=4,
  max_position_embeddings=1024,
  layer_types=["mamba", "mamba", "attention", "mamba"],
  position_embedding_type="nope",
  embedding_multiplier=12.0,
  residual_multiplier=0.22,
  attention_multiplier=0.0078125,
  logits_scaling=8.0,
  num_local_experts=8,
  num_experts_per_tok=2,
  intermediate_size=128,
  shared_intermediate_size=512,
  mamba_n_heads=8,
  mamba_d_head=64,
  mamba_d_state=64,
  mamba_n_groups=1,
  mamba_d_conv=4,
  mamba_expand=2,
  mamba_chunk_size=64,
  tie_word_embeddings=False,
)
MAMBA2 = dict(
  vocab_size=VOCAB,
  hidden_size=256,
  num_hidden_layers=4,
  num_heads=8,
  head_dim=64,
  state_size=64,
  n_groups=1,
  conv_kernel=4,
  expand=2,
  chunk_size=64,
  tie_word_embeddings=False,
)


SEED_VOCAB = 8192
# DeepSeek-V3's dense shape at the seed's size; every layer dense (first_k_dense_replace = the layer count).
SEED_MLA = dict(
  vocab_size=SEED_VOCAB,
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=8,
  num_attention_heads=8,
  num_key_value_heads=8,
  q_lora_rank=192,
  kv_lora_rank=192,
  qk_nope_head_dim=48,
  qk_rope_head_dim=16,
  v_head_dim=64,
  first_k_dense_replace=8,
  n_routed_experts=8,
  num_experts_per_tok=2,
  moe_intermediate_size=512,
  n_shared_experts=1,
  max_position_embeddings=2048,
  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
  tie_word_embeddings=False,
)
# The same with layers 1-7 MoE, DeepSeek-V3 routing without groups: sigmoid scores plus the correction bias,
# top-2 of 8 renormalised and scaled by 2.5, one shared expert.
SEED_MLA_MOE = dict(
  SEED_MLA, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5
)
SEED_MAMBA2 = dict(MAMBA2, vocab_size=SEED_VOCAB, hidden_size=512, num_hidden_layers=8, num_heads=16)
SEED_GQA = dict(
  vocab_size=SEED_VOCAB,
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=8,
  num_attention_heads=8,
  num_key_value_heads=4,
  head_dim=64,
  max_position_embeddings=2048,
  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
  tie_word_embeddings=False,
)

# kind: (transformers class prefix, config values, description)
TINY = {
  "deepseek_v2": (
    "DeepseekV2",
    DEEPSEEK,
    "DeepSeek-V2 style: hidden 256, 4 layers, 8 heads, q_lora 96, kv_lora 64, rope 16, nope 32, "
    "v 32; layer 0 dense (512), layers 1-3 MoE 8 experts top-2 (128) + 1 shared",
  ),
  "deepseek_v3": (
    "DeepseekV3",
    DEEPSEEK_V3,
    "DeepSeek-V3 style: the DeepSeek-V2 shape with sigmoid routing, correction bias, 4 groups of 2 "
    "experts (2 kept), top-2 renormalised, scale 2.5",
  ),
  "mamba2": ("Mamba2", MAMBA2, "Mamba2: hidden 256, 4 layers, 8 heads of 64, state 64, 1 group, chunk 64, conv 4"),
  "granite": (
    "GraniteMoeHybrid",
    GRANITE,
    "Granite 4.0-H style: hidden 256, Mamba2 layers 0, 1, 3 (8 heads of 64, state 64) and GQA 8/4 heads "
    "without RoPE on 2, each with MoE 8 experts top-2 (128) + shared MLP (512), muP multipliers",
  ),
}
_SEED_COMMON = "hidden 512, 8 layers, vocabulary 8192, untied embeddings"
SEED = {
  "mla": (
    "DeepseekV3",
    SEED_MLA,
    f"MLA, DeepSeek-V3 dense: {_SEED_COMMON}; 8 heads, q_lora 192, kv_lora 192, rope 16, nope 48, v 64; "
    "SwiGLU 2048 in every layer",
  ),
  "mamba2": (
    "Mamba2",
    SEED_MAMBA2,
    f"Mamba2: {_SEED_COMMON}; 16 heads of 64 (expand 2), state 64, 1 group, conv 4, chunk 64",
  ),
  "gqa": ("Llama", SEED_GQA, f"GQA, Llama: {_SEED_COMMON}; 8 heads of 64, 4 key/value heads, RoPE, SwiGLU 2048"),
  "mla_moe": (
    "DeepseekV3",
    SEED_MLA_MOE,
    "MLA + MoE, DeepSeek-V3: the MLA model with layers 1-7 MoE, 8 routed experts top-2 (512) + 1 shared; "
    "V3 routing without groups (sigmoid, correction bias, top-2 renormalised, scale 2.5)",
  ),
}
SIZES = {"tiny": TINY, "seed": SEED}
# Each size's values of the flags left unset.
DEFAULTS = {
  "tiny": dict(
    models="deepseek_v2,deepseek_v3,mamba2,granite",
    batch=8,
    seq_len=256,
    steps=5,
    prompt_len=32,
    new_tokens=64,
    decode_batches="1,8",
    threads=0,
  ),
  "seed": dict(
    models="mla,mamba2,gqa,mla_moe",
    batch=4,
    seq_len=256,
    steps=5,
    prompt_len=1024,
    new_tokens=128,
    decode_batches="1",
    threads=2,
  ),
}


def build_hf(kind: str, spec: tuple, path: str):
  import torch
  import transformers

  prefix, values, description = spec
  torch.manual_seed(0)
  model = getattr(transformers, prefix + "ForCausalLM")(getattr(transformers, prefix + "Config")(**values))
  if kind == "deepseek_v3":
    with torch.no_grad():  # a trained-looking correction bias, so that it changes the routing
      for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.2)
  model = model.float()
  model.save_pretrained(path)
  return model, description


def hf_train_tok_s(model, tokens: np.ndarray, steps: int) -> float:
  import torch

  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  inputs = torch.as_tensor(tokens[:, :-1], dtype=torch.long)
  targets = torch.as_tensor(tokens[:, 1:], dtype=torch.long)

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  step(), step()
  return inputs.numel() / median_time(step, steps)


def jax_train_tok_s(config, params, tokens: np.ndarray, steps: int) -> float:
  B, T = tokens.shape[0], tokens.shape[1] - 1
  config.trainer.batch_size, config.trainer.seq_len = B, T
  config.trainer.learning_rate, config.trainer.warmup_steps = 1e-4, 0
  validate(config)
  return B * T / train_step_seconds(config, params, tokens, steps, warmup=2)


def hf_decode(model, prompt: np.ndarray, new_tokens: int, batch: int) -> tuple[float, float]:
  """(decode tokens/s after the first token, prefill seconds), each the median of 3 runs."""
  import torch

  model.eval()
  ids = torch.as_tensor(np.broadcast_to(prompt, (batch, len(prompt))).copy(), dtype=torch.long)
  gen = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
  with torch.no_grad():
    gen(2)
    first = median_time(lambda: gen(1), 3)
    full = median_time(lambda: gen(new_tokens), 3)
  return batch * (new_tokens - 1) / max(full - first, 1e-9), first


def jax_decode(cfg: ModelConfig, params, prompt: np.ndarray, new_tokens: int, batch: int) -> tuple[float, float]:
  decoder = Decoder(cfg, temperature=0.0)
  variables = {"params": jax.tree_util.tree_map(jax.numpy.asarray, params)}
  runs = [decoder.generate(variables, prompt, new_tokens, jax.random.PRNGKey(0), batch=batch)[1] for _ in range(3)]
  rate = sorted(r["decode_tokens_per_s"] for r in runs)[1]
  return rate, sorted(r["prefill_s"] for r in runs)[1]


def decode_bytes_per_token(cfg: ModelConfig, params, context: int) -> tuple[float, float]:
  """(weight bytes, cache bytes) one batch-1 decode step reads in float32 with `context` cached positions:
  count_params' active parameters (a MoE's dense part plus the top-k experts' share: a lower bound) with one
  row of an untied embedding table, and each layer's cache (MLA latent + rope key, GQA keys and values, Mamba2's
  conv and SSM state)."""
  counts = count_params(cfg, params)
  weights = counts["active"]
  if not cfg.tie_embeddings:
    weights -= counts["embedding"] - cfg.hidden_size
  cache = 0
  for layer in range(cfg.num_layers):
    kind = cfg.mixer_kind(layer)
    if kind == "mla":
      cache += (cfg.kv_latent_dim + cfg.d_rope) * context
    elif kind == "gqa":
      cache += 2 * cfg.kv_heads * cfg.head_dim * context
    else:
      conv_width = cfg.mamba2_inner + 2 * cfg.mamba2_n_groups * cfg.mamba2_state_size
      ssm = cfg.mamba2_num_heads * cfg.mamba2_head_dim * cfg.mamba2_state_size
      cache += ssm + (cfg.mamba2_conv_kernel - 1) * conv_width
  return 4.0 * weights, 4.0 * cache


def pin_threads(threads: int) -> list[int]:
  """Keeps the process on its first `threads` allowed CPUs (XLA's CPU client sizes its thread pool by the
  CPUs it may run on; call before jax starts its backend); the CPUs it may use."""
  if not hasattr(os, "sched_setaffinity"):
    return []
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    cpus = cpus[:threads]
    os.sched_setaffinity(0, cpus)
  return cpus


def _mb(n: float) -> str:
  return f"{n / 1e6:,.1f} MB"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.vs_transformers",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="the model set (default: tiny)")
  parser.add_argument(
    "--models",
    help="comma-separated; tiny: deepseek_v2,deepseek_v3,mamba2,granite (default), "
    "seed: mla,mamba2,gqa,mla_moe (default)",
  )
  parser.add_argument("--batch", type=int, help="training batch (tiny 8, seed 4)")
  parser.add_argument("--seq_len", type=int, help="training sequence length (256)")
  parser.add_argument("--steps", type=int, help="timed training steps after two warm-up ones (5)")
  parser.add_argument("--prompt_len", type=int, help="decode prompt (tiny 32, seed 1024)")
  parser.add_argument("--new_tokens", type=int, help="decoded tokens (tiny 64, seed 128)")
  parser.add_argument("--decode_batches", help="comma-separated (tiny 1,8, seed 1)")
  parser.add_argument("--threads", type=int, help="torch threads and CPUs the process may use (tiny: all, seed 2)")
  parser.add_argument("--no_write", action="store_true")
  args = parser.parse_args(argv)
  for key, value in DEFAULTS[args.size].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  specs = SIZES[args.size]
  kinds = args.models.split(",")
  if unknown := [k for k in kinds if k not in specs]:
    parser.error(f"--models: {', '.join(unknown)} not in the {args.size} set ({', '.join(specs)})")
  try:
    import torch
    import transformers
  except ImportError:
    sys.exit("this benchmark needs torch and transformers: pip install torch transformers")
  threads = args.threads or os.cpu_count()
  cpus = pin_threads(threads)
  torch.set_num_threads(threads)
  seed = args.size == "seed"
  vocab = next(iter(specs.values()))[1]["vocab_size"]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (args.batch, args.seq_len + 1))
  prompt = rng.integers(0, vocab, args.prompt_len).astype(np.int32)
  decode_batches = [int(b) for b in args.decode_batches.split(",")]

  machine = {}
  if seed:  # the machine's rates first, before the models fill its memory
    machine["matmul"] = {n: matmul_gflops(n) for n in (1024, 2048)}
    machine["bandwidth"] = read_bandwidth_gbs()
    print(f"matmul GFLOP/s {machine['matmul']}, read GB/s {machine['bandwidth']}", flush=True)
  peak = max(machine.get("matmul", {0: 0.0}).values())
  bandwidth = max(machine.get("bandwidth", {"": 0.0}).values())
  context = args.prompt_len + args.new_tokens / 2  # the average cache length the decode steps read

  rows, notes, train_rows, decode_rows = [], [], [], []
  for kind in kinds:
    with tempfile.TemporaryDirectory() as tmp:
      model, description = build_hf(kind, specs[kind], tmp)
      config, params = convert.from_hf(tmp)
    cfg = ModelConfig.from_config(config)
    p = count_params(cfg, params)
    notes.append(
      f"- **{kind}**: {description}; {p['total'] / 1e6:.2f}M parameters ({p['active'] / 1e6:.2f}M active per token)"
    )
    print(notes[-1], flush=True)
    ours = jax_train_tok_s(config, params, tokens, args.steps)
    theirs = hf_train_tok_s(model, tokens, args.steps)
    rows.append((kind, f"train, batch {args.batch} x {args.seq_len}", ours, theirs))
    train_rows.append((kind, flops_per_token(cfg, params, args.seq_len)["total"], ours, theirs))
    print(rows[-1], flush=True)
    for b in decode_batches:
      (ours, ours_prefill), (theirs, theirs_prefill) = (
        jax_decode(cfg, params, prompt, args.new_tokens, b),
        hf_decode(model, prompt, args.new_tokens, b),
      )
      rows.append((kind, f"decode, batch {b}, prompt {args.prompt_len}, {args.new_tokens} new", ours, theirs))
      print(rows[-1], f"prefill {ours_prefill * 1e3:.0f} ms vs {theirs_prefill * 1e3:.0f} ms", flush=True)
      if b == 1:
        decode_rows.append((kind, *decode_bytes_per_token(cfg, params, context), ours, ours_prefill, theirs_prefill))
    del model

  if not seed:
    lines = [
      "| model | work | mla_jax tokens/s | transformers tokens/s | mla_jax / transformers |",
      "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {work} | {o:,.0f} | {t:,.0f} | {o / t:.2f}x |" for k, work, o, t in rows]
    print("\n".join(lines))
    if args.no_write:
      return
    body = [
      "# mla_jax beside transformers (CPU, float32)",
      "",
      *machine_lines(),
      f"- torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}",
      "",
      "Same weights on both sides (built in transformers, imported with `mla_jax.convert.from_hf`). "
      f"Training: median of {args.steps} optimizer steps (AdamW, clip 1.0) after two warm-up steps. Decode: "
      "greedy, tokens/s after the first new token, median of 3 runs; mla_jax compiles before timing.",
      "",
      *notes,
      "",
      *lines,
    ]
    write_lines(RESULTS / "vs_transformers.md", body)
    return

  lines = [
    "| model | work | transformers tokens/s | mla_jax tokens/s | mla_jax / transformers |",
    "|---|---|---:|---:|---:|",
  ]
  lines += [f"| {k} | {work} | {t:,.0f} | {o:,.0f} | {o / t:.2f}x |" for k, work, o, t in rows]
  share = lambda flops, tok_s: f"{flops * tok_s / 1e9:,.1f} | {flops * tok_s / (peak * 1e9):.1%}"
  train_lines = [
    "| model | model FLOPs / token | transformers GFLOP/s | of peak | mla_jax GFLOP/s | of peak |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  train_lines += [f"| {k} | {f / 1e6:,.1f} M | {share(f, t)} | {share(f, o)} |" for k, f, o, t in train_rows]
  decode_lines = [
    "| model | weights read / token | cache read / token | bound tokens/s | mla_jax tokens/s | of bound "
    "| prefill ms, mla_jax / transformers |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for k, weights, cache, o, o_prefill, t_prefill in decode_rows:
    bound = bandwidth * 1e9 / (weights + cache)
    decode_lines.append(
      f"| {k} | {_mb(weights)} | {_mb(cache)} | {bound:,.0f} | {o:,.0f} | {o / bound:.0%} "
      f"| {o_prefill * 1e3:,.0f} / {t_prefill * 1e3:,.0f} |"
    )
  print("\n".join([*lines, "", *train_lines, "", *decode_lines]))
  if args.no_write:
    return
  env = f"JAX_PLATFORMS={os.environ['JAX_PLATFORMS']} " if os.environ.get("JAX_PLATFORMS") else ""
  command = f"{env}python -m benchmarks.vs_transformers {shlex.join(sys.argv[1:] if argv is None else argv)}"
  matmul = ", ".join(f"{n}^2 {g:,.1f}" for n, g in machine["matmul"].items())
  reads = ", ".join(f"{name} {g:,.1f}" for name, g in machine["bandwidth"].items())
  body = [
    "# mla_jax beside transformers at the seed's size (CPU, float32)",
    "",
    *machine_lines(),
    f"- torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
    f"the process on CPUs {cpus} (XLA's CPU thread pool follows them)",
    f"- command: `{command.strip()}`",
    f"- XLA float32 matmul (jitted jnp.dot, best of 5): {matmul} GFLOP/s; peak taken: {peak:,.1f} GFLOP/s",
    f"- read bandwidth (float32 sum over 1 GiB, best of 5), GB/s: {reads}; taken: {bandwidth:,.1f} GB/s",
    "",
    "Same weights on both sides (built in transformers, imported with `mla_jax.convert.from_hf`). "
    f"Training: median of {args.steps} optimizer steps (AdamW, clip 1.0) after two warm-up steps. Decode: "
    "greedy, tokens/s after the first new token, median of 3 runs; mla_jax compiles before timing; prefill "
    "timed apart.",
    "",
    *notes,
    "",
    *lines,
    "",
    "Training against the matmul peak: model FLOPs per token (`mla_jax.model.flops_per_token`: 6 x active "
    f"matmul parameters + attention over {args.seq_len} tokens + the SSD scan) x tokens/s.",
    "",
    *train_lines,
    "",
    "Batch-1 decode against the read bandwidth: bytes read per token = the weights one step reads (every "
    "parameter of a dense model; for MoE the dense part plus the top-k experts' share, a lower bound; one row "
    "of the untied embedding table) + the cache at the average context length "
    f"({args.prompt_len} + {args.new_tokens} / 2 = {context:,.0f} positions), float32; bound = bandwidth / bytes.",
    "",
    *decode_lines,
  ]
  write_lines(RESULTS / "vs_transformers_seed.md", body)


if __name__ == "__main__":
  main()
