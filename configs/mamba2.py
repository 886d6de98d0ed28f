r"""Pure Mamba2 (SSD): every layer a Mamba2 mixer, no attention, no FFN (the Mamba2 paper's stack).

  python -m mla_jax.train --config=configs/mamba2.py:quick --workdir=runs/mamba2_quick   # ~6 min, 2 CPU cores
  python -m mla_jax.train --config=configs/mamba2.py --workdir=runs/mamba2   # long: ~8 hours on 2 CPU cores

The same widths as configs/hybrid.py (hidden 384, 48 heads of 16, state 64, chunk 64), 8 layers, and
the same runs: 5000 steps of 4 x 512 tokens (10.2M), or `:quick`, 60 steps of 8 x 256.
"""

from configs import hybrid


def get_config(arg=None):
  config = hybrid.get_config(arg)
  m = config.model
  m.name = "mamba2"
  m.kv_latent_dim = 0
  m.q_latent_dim = 0
  m.d_rope = 0
  m.mamba_layers = tuple(range(m.num_layers))
  return config
