r"""The seed's hybrid example: Mamba2 (SSD) layers with MLA on layers 3 and 7.

  python -m mla_jax.train --config=configs/hybrid.py:quick --workdir=runs/hybrid_quick   # ~5 min, 2 CPU cores
  python -m mla_jax.train --config=configs/hybrid.py --workdir=runs/hybrid   # long: ~8 hours on 2 CPU cores

8 layers; mamba_layers [0, 1, 2, 4, 5, 6]; MLA (kv_latent_dim 192, q_latent_dim 192, d_rope 16) with a
SwiGLU FFN on layers 3 and 7; Mamba2 with 48 heads of 16 (hidden 384 x expand 2 = 768 = 48 x 16, the
rule the seed's own nano config satisfies), state 64, chunk 64, one B/C group, conv kernel 4, no FFN
after Mamba2 layers (as in the Mamba2 paper; `--config.model.mamba_ffn=True` adds one). Add
`--config.model.num_experts=4` for the seed's MoE variant. The full run is 5000 steps of 4 x 512 tokens
(10.2M); `:quick` trains the same model for 60 steps of 8 x 256 bytes.
"""

from configs import mla
from mla_jax.config import default_config


def get_config(arg=None):
  config = default_config()
  m = config.model
  m.name = "hybrid"
  m.hidden_size = 384
  m.num_layers = 8
  m.num_heads = 6
  m.intermediate_size = 1536
  m.max_seq_len = 2048
  m.kv_latent_dim = 192
  m.q_latent_dim = 192
  m.d_rope = 16
  m.mamba_layers = (0, 1, 2, 4, 5, 6)
  m.mamba2_num_heads = 48
  m.mamba2_head_dim = 16
  m.mamba2_state_size = 64
  m.mamba2_chunk_size = 64
  m.mamba2_n_groups = 1
  m.mamba2_conv_kernel = 4
  m.mamba2_expand = 2

  t = config.trainer
  t.learning_rate = 3e-4
  t.batch_size = 4
  t.seq_len = 512
  t.max_steps = 5000
  if arg == "quick":
    mla.apply_quick(config, steps=60, learning_rate=2e-3)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'quick'")
  return config
