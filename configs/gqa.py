r"""The seed's standard-attention model: grouped-query attention (kv_heads) with a SwiGLU MLP.

  python -m mla_jax.train --config=configs/gqa.py:quick --workdir=runs/gqa_quick   # ~5 min on 2 CPU cores
  python -m mla_jax.train --config=configs/gqa.py --workdir=runs/gqa   # long: 1-2 days on 2 CPU cores

The baseline for configs/mla.py: same width, depth, heads and FFN; 4 key/value heads instead of a
latent cache. The full run is configs/mla.py's (20.5M tokens); `:quick` is its quick run (60 steps of
4 x 256 tokens) on the same model.
"""

from configs import mla


def get_config(arg=None):
  config = mla.get_config(arg)
  config.model.name = "gqa"
  config.model.kv_latent_dim = 0
  config.model.q_latent_dim = 0
  config.model.d_rope = 0
  config.model.kv_heads = 4
  return config
