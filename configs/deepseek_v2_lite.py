r"""A DeepSeek-V2-Lite-shaped MLA + MoE model for fit checks: 15.7B parameters, 2.4B active per token
(2.7B with the embedding).

  python -m mla_jax.compile --config=configs/deepseek_v2_lite.py --topology=v5p:2x2x2 \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --config.mesh.expert=8 --config.trainer.batch_size=32
  python -m mla_jax.compile --config=configs/deepseek_v2_lite.py --topology=v5p:2x2x2 --decode_batch=0 \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --config.mesh.expert=8 --config.model.remat=full

27 layers, hidden 2048, 16 heads; MLA without query compression: per-head query/key width 128 (nope)
+ 64 (RoPE), value width 128, kv_latent_dim 512. Layer 0 has a dense SwiGLU FFN of 10944; layers 1-26
have 64 routed experts of 1408 (top-6, weights not renormalised, as DeepSeek-V2-Lite) plus 2 shared
experts. Vocabulary 102400, bfloat16 compute, sequences of 4096 tokens. The defaults are for compiling
(mla_jax.compile) against a TPU slice: FSDP over every chip, the experts split over mesh.expert.
"""

from mla_jax.config import default_config


def get_config(arg=None):
  if arg:
    raise ValueError(f"unknown config argument {arg!r}; expected nothing")
  config = default_config()
  m = config.model
  m.name = "deepseek_v2_lite"
  m.vocab_size = 102400
  m.hidden_size = 2048
  m.num_layers = 27
  m.num_heads = 16
  m.head_dim = 128
  m.v_head_dim = 128
  m.d_rope = 64
  m.kv_latent_dim = 512
  m.q_latent_dim = 0
  m.intermediate_size = 10944
  m.max_seq_len = 4096
  m.rope_theta = 10000.0
  m.num_experts = 64
  m.experts_per_tok = 6
  m.moe_intermediate_size = 1408
  m.shared_expert_enabled = True
  m.num_shared_experts = 2
  m.first_dense_layers = 1
  m.norm_topk_prob = False
  m.dtype = "bfloat16"

  t = config.trainer
  t.batch_size = 32
  t.seq_len = 4096
  t.learning_rate = 4.2e-4
  t.warmup_steps = 2000
  t.max_steps = 100_000
  t.load_balance_alpha = 0.001

  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.expert = 8
  return config
