r"""Training and decode tokens/s of mla_jax beside Hugging Face transformers (PyTorch) on the same models.

  pip install torch transformers        # CPU torch; not part of the package's dependencies
  python -m benchmarks.vs_transformers  # -> benchmarks/results/vs_transformers.md
  python -m benchmarks.vs_transformers --steps 2 --new_tokens 8 --no_write   # a smoke run

Each model is built once in transformers with random weights, saved, and imported with
`mla_jax.convert.from_hf`, so both sides run the same function (the parity tests in
tests/test_convert.py check that the logits agree to 1e-4). Both run float32 on this CPU with the same
number of threads (torch.set_num_threads = the core count; XLA's CPU client uses every core).

- Training: one optimizer step (forward, backward, clip to norm 1, AdamW) on a batch of B x T tokens,
  median of --steps after two warm-up steps. mla_jax runs `make_train_step` (jitted, donated state);
  transformers runs eager PyTorch with the same loss (mean next-token cross-entropy).
- Decode: greedy generation of --new_tokens after a --prompt_len prompt, with each side's KV / SSM cache;
  tokens/s counts the tokens after the first (the prefill is timed apart). mla_jax: `mla_jax.decode.Decoder`
  (absorbed MLA decode, compiled before timing); transformers: `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import numpy as np

from benchmarks.common import RESULTS, machine_lines, median_time, train_step_seconds, write_lines
from mla_jax import convert
from mla_jax.config import ModelConfig, validate
from mla_jax.decode import Decoder
from mla_jax.model import count_params

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


def build_hf(kind: str, path: str):
  import torch
  import transformers

  torch.manual_seed(0)
  if kind == "deepseek_v2":
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**DEEPSEEK))
    description = (
      "DeepSeek-V2 style: hidden 256, 4 layers, 8 heads, q_lora 96, kv_lora 64, rope 16, nope 32, "
      "v 32; layer 0 dense (512), layers 1-3 MoE 8 experts top-2 (128) + 1 shared"
    )
  elif kind == "deepseek_v3":
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**DEEPSEEK_V3))
    with torch.no_grad():  # a trained-looking correction bias, so that it changes the routing
      for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.2)
    description = (
      "DeepSeek-V3 style: the DeepSeek-V2 shape with sigmoid routing, correction bias, 4 groups of 2 "
      "experts (2 kept), top-2 renormalised, scale 2.5"
    )
  elif kind == "granite":
    model = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**GRANITE))
    description = (
      "Granite 4.0-H style: hidden 256, Mamba2 layers 0, 1, 3 (8 heads of 64, state 64) and GQA 8/4 heads "
      "without RoPE on 2, each with MoE 8 experts top-2 (128) + shared MLP (512), muP multipliers"
    )
  else:
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**MAMBA2))
    description = "Mamba2: hidden 256, 4 layers, 8 heads of 64, state 64, 1 group, chunk 64, conv 4"
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.vs_transformers",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--models", default="deepseek_v2,deepseek_v3,mamba2,granite")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--decode_batches", default="1,8")
  parser.add_argument("--no_write", action="store_true")
  args = parser.parse_args(argv)
  try:
    import torch
    import transformers
  except ImportError:
    sys.exit("this benchmark needs torch and transformers: pip install torch transformers")
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (args.batch, args.seq_len + 1))
  prompt = rng.integers(0, VOCAB, args.prompt_len).astype(np.int32)
  decode_batches = [int(b) for b in args.decode_batches.split(",")]

  rows, notes = [], []
  for kind in args.models.split(","):
    with tempfile.TemporaryDirectory() as tmp:
      model, description = build_hf(kind, tmp)
      config, params = convert.from_hf(tmp)
    cfg = ModelConfig.from_config(config)
    p = count_params(cfg, params)
    notes.append(
      f"- **{kind}**: {description}; {p['total'] / 1e6:.2f}M parameters ({p['active'] / 1e6:.2f}M active per token)"
    )
    ours = jax_train_tok_s(config, params, tokens, args.steps)
    theirs = hf_train_tok_s(model, tokens, args.steps)
    rows.append((kind, f"train, batch {args.batch} x {args.seq_len}", ours, theirs))
    print(rows[-1], flush=True)
    for b in decode_batches:
      (ours, ours_prefill), (theirs, theirs_prefill) = (
        jax_decode(cfg, params, prompt, args.new_tokens, b),
        hf_decode(model, prompt, args.new_tokens, b),
      )
      rows.append((kind, f"decode, batch {b}, prompt {args.prompt_len}, {args.new_tokens} new", ours, theirs))
      print(rows[-1], f"prefill {ours_prefill * 1e3:.0f} ms vs {theirs_prefill * 1e3:.0f} ms", flush=True)

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


if __name__ == "__main__":
  main()
