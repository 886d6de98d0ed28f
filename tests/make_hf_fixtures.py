"""Writes tests/data/hf_fixtures/: tiny seeded transformers models with the outputs transformers gives for them.

Run with torch, transformers and safetensors installed (mla_jax itself is not needed):

  python tests/make_hf_fixtures.py                 # every fixture, the folder written afresh
  python tests/make_hf_fixtures.py NAME [NAME ...]  # only these (each keeps its seed: its place in FIXTURES)

The stored fixtures were made with torch 2.14.1, transformers 5.24.0, safetensors 0.8.0 and numpy 2.4.6
(versions.json records them). Each fixture is a folder `<name>/` with what `save_pretrained` writes (config.json
and model.safetensors, in float32 or bfloat16) and `expected.npz`:

  input_ids [2, T]   random token ids
  logits    [2, T, V] transformers' float32 logits for input_ids
  prompt    [P]      the first P ids of row 0
  generated [N]      transformers' greedy continuation of prompt (`generate`, do_sample=False, with its cache)
  margin    []       the smallest gap between the best and second-best logit over the N greedy choices

The expected outputs are always computed in float32, by the model reloaded from the saved folder: for a
bfloat16 checkpoint that is a float32 run of the bf16-rounded weights, which `from_hf` upcasts exactly, so
the comparison in tests/test_hf_fixtures.py needs no allowance for bf16 activations.
"""

import json
import os
import shutil
import sys

import numpy as np
import safetensors
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf_fixtures")
VOCAB, T, P, N = 128, 11, 6, 8
MIN_MARGIN = 1e-3  # greedy choices closer than this would make the token comparison depend on rounding

DEEPSEEK = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=4,
  kv_lora_rank=16,
  qk_rope_head_dim=8,
  qk_nope_head_dim=8,
  v_head_dim=12,
  max_position_embeddings=64,
  rope_parameters={"rope_type": "default", "rope_theta": 500.0},
  n_routed_experts=4,
  num_experts_per_tok=2,
  moe_intermediate_size=16,
  first_k_dense_replace=1,
)
V2_MOE = dict(DEEPSEEK, q_lora_rank=24, n_shared_experts=2, routed_scaling_factor=1.5)
V3_GROUPED = dict(
  DEEPSEEK,
  q_lora_rank=24,
  n_routed_experts=8,
  moe_intermediate_size=8,
  n_shared_experts=1,
  n_group=2,
  topk_group=1,
  routed_scaling_factor=2.5,
  norm_topk_prob=True,
  rope_interleave=True,
)
MAMBA2 = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  num_hidden_layers=2,
  num_heads=8,
  head_dim=8,
  state_size=16,
  n_groups=2,
  conv_kernel=4,
  expand=2,
  chunk_size=8,
  layer_norm_epsilon=1e-5,
  tie_word_embeddings=False,
)
# Granite 4.0-H: Mamba2 and GQA layers, MoE plus the shared MLP, the muP multipliers.
GRANITE = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  rms_norm_eps=1e-5,
  layer_types=["mamba", "attention", "mamba", "attention"],
  embedding_multiplier=2.0,
  residual_multiplier=0.5,
  attention_multiplier=0.1,
  logits_scaling=3.0,
  num_local_experts=4,
  num_experts_per_tok=2,
  intermediate_size=16,
  shared_intermediate_size=24,
  mamba_n_heads=8,
  mamba_d_state=16,
  mamba_n_groups=2,
  mamba_d_conv=4,
  mamba_expand=2,
  mamba_chunk_size=8,
)
# Llama: GQA with a head width other than hidden_size / heads.
LLAMA = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=12,
  max_position_embeddings=64,
  rms_norm_eps=1e-5,
  rope_parameters={"rope_type": "default", "rope_theta": 500.0},
  tie_word_embeddings=False,
)

# name: (transformers config class, model class, config.json values, dtype of the saved weights)
V2 = (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)
V3 = (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)
M2 = (transformers.Mamba2Config, transformers.Mamba2ForCausalLM)
GR = (transformers.GraniteMoeHybridConfig, transformers.GraniteMoeHybridForCausalLM)
LL = (transformers.LlamaConfig, transformers.LlamaForCausalLM)
FIXTURES = {
  "deepseek_v2_moe_shared_q_latent": (*V2, V2_MOE, "float32"),
  "deepseek_v2_dense_no_q_latent_tied": (
    *V2,
    dict(DEEPSEEK, q_lora_rank=None, first_k_dense_replace=2, tie_word_embeddings=True),
    "float32",
  ),
  "deepseek_v3_moe_grouped_q_latent": (*V3, V3_GROUPED, "float32"),
  "deepseek_v3_moe_rotate_half_no_q_latent_tied": (
    *V3,
    dict(
      DEEPSEEK,
      q_lora_rank=None,
      n_routed_experts=8,
      num_experts_per_tok=3,
      moe_intermediate_size=8,
      n_shared_experts=1,
      n_group=4,
      topk_group=2,
      routed_scaling_factor=1.0,
      norm_topk_prob=False,
      rope_interleave=False,
      tie_word_embeddings=True,
    ),
    "float32",
  ),
  "mamba2": (*M2, MAMBA2, "float32"),
  # The same configs as float32 fixtures above (the tests' compiled programs are shared), other weights.
  "deepseek_v2_moe_shared_q_latent_bf16": (*V2, V2_MOE, "bfloat16"),
  "deepseek_v3_moe_grouped_q_latent_bf16": (*V3, V3_GROUPED, "bfloat16"),
  "mamba2_bf16": (*M2, MAMBA2, "bfloat16"),
  "granitemoehybrid_moe_rope_tied": (
    *GR,
    dict(
      GRANITE,
      tie_word_embeddings=True,
      position_embedding_type="rope",
      rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "float32",
  ),
  "granitemoehybrid_dense_nope_bf16": (*GR, dict(GRANITE, num_local_experts=0, tie_word_embeddings=False), "bfloat16"),
  "llama_gqa_head_dim_12": (*LL, LLAMA, "float32"),
  "llama_gqa_head_dim_12_bf16": (*LL, LLAMA, "bfloat16"),
}


def randomize(model, seed):
  """Weights large enough that the logits spread over several units: matrices 0.3 N(0, 1), vectors 1 + 0.1 N(0, 1);
  DeepSeek-V3's score-correction bias N(0, 0.5) (it decides the selection), Mamba2's A_log and dt_bias kept
  at their initial values (their working ranges)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("A_log", "dt_bias")):
        continue
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if p.ndim == 1 else 0.3 * noise)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.5 * torch.randn(b.shape, generator=gen))


def greedy_margin(model, ids):
  """The smallest top-1 minus top-2 logit gap over the positions that chose the last N tokens of `ids`."""
  with torch.no_grad():
    logits = model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0, -N - 1 : -1]
  top2 = logits.topk(2, dim=-1).values
  return float((top2[:, 0] - top2[:, 1]).min())


def make(name, config_cls, model_cls, values, dtype, seed):
  torch.manual_seed(seed)
  model = model_cls(config_cls(**values)).float().eval()
  randomize(model, seed)
  path = os.path.join(OUT, name)
  model.to(getattr(torch, dtype)).save_pretrained(path)
  # The outputs of the saved weights, computed in float32.
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  ids = np.random.default_rng(seed).integers(0, VOCAB, (2, T))
  with torch.no_grad():
    logits = model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    out = model.generate(
      torch.as_tensor(ids[:1, :P], dtype=torch.long),
      max_new_tokens=N,
      min_new_tokens=N,
      do_sample=False,
      pad_token_id=0,
    )[0].numpy()
  margin = greedy_margin(model, out)
  if margin < MIN_MARGIN:
    sys.exit(f"{name}: greedy margin {margin:.2e} < {MIN_MARGIN}; change its seed")
  np.savez(
    os.path.join(path, "expected.npz"),
    input_ids=ids.astype(np.int32),
    logits=logits.astype(np.float32),
    prompt=ids[0, :P].astype(np.int32),
    generated=out[P:].astype(np.int32),
    margin=np.float32(margin),
  )
  size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
  print(f"{name:46s} {dtype:8s} {size / 1024:6.0f} KiB  |logits| max {np.abs(logits).max():5.2f}  margin {margin:.3f}")


def main(names):
  unknown = sorted(set(names) - set(FIXTURES))
  if unknown:
    sys.exit(f"no fixture named {', '.join(unknown)} (known: {', '.join(FIXTURES)})")
  transformers.utils.logging.disable_progress_bar()
  if not names:
    shutil.rmtree(OUT, ignore_errors=True)
  os.makedirs(OUT, exist_ok=True)
  for seed, (name, spec) in enumerate(FIXTURES.items()):
    if not names or name in names:
      shutil.rmtree(os.path.join(OUT, name), ignore_errors=True)
      make(name, *spec, seed=seed)
  versions = {m.__name__: m.__version__ for m in (torch, transformers, safetensors, np)}
  with open(os.path.join(OUT, "versions.json"), "w") as f:
    json.dump(versions, f, indent=2)
    f.write("\n")
  print(versions)


if __name__ == "__main__":
  main(sys.argv[1:])
