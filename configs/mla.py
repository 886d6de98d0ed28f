r"""The seed's "Standalone MLA" example (DeepSeek-V2 multi-head latent attention, SwiGLU MLP).

  python -m mla_jax.train --config=configs/mla.py:quick --workdir=runs/mla_quick   # ~5 min on 2 CPU cores
  python -m mla_jax.train --config=configs/mla.py:quick --workdir=runs/mla_256 --config.model.kv_latent_dim=256
  python -m mla_jax.train --config=configs/mla.py --workdir=runs/mla   # long: 1-2 days on 2 CPU cores

The full run is the seed's: 5000 steps of 2 x 2048 tokens (20.5M tokens); its train step needs about
3.2 GiB (the trainer prints the compiled step's memory before the first step).

hidden 512, 8 layers, 8 heads, kv_latent_dim 192, q_latent_dim 192, d_rope 16, intermediate 2048,
rope_theta 10000, max_seq_len 2048 (the training length, as in the seed); lr 3e-4, batch 2, 5000 steps.
The seed's kv_heads 4 is left out: MLA layers have no separate key/value heads. The seed sets
vocab_size 128354 for its tokenizer; here the vocabulary follows the tokenizer (bytes by default).
`:quick` trains the same model for 60 steps of 4 x 256 tokens at lr 2e-3.
"""

from mla_jax.config import default_config


def get_config(arg=None):
  config = default_config()
  m = config.model
  m.name = "mla"
  m.hidden_size = 512
  m.num_layers = 8
  m.num_heads = 8
  m.max_seq_len = 2048
  m.rope_theta = 10000.0
  m.intermediate_size = 2048
  m.kv_latent_dim = 192
  m.q_latent_dim = 192
  m.d_rope = 16

  t = config.trainer
  t.learning_rate = 3e-4
  t.batch_size = 2
  t.max_steps = 5000
  t.seq_len = 0  # the seed trains at max_seq_len
  t.warmup_steps = 100
  if arg == "quick":
    apply_quick(config, steps=60, learning_rate=2e-3, batch_size=4)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'quick'")
  return config


def apply_quick(config, steps: int = 150, learning_rate: float = 1e-3, batch_size: int = 8, seq_len: int = 256):
  """A short CPU run of the same model: a small batch, higher learning rate, frequent logs."""
  t = config.trainer
  t.learning_rate = learning_rate
  t.batch_size = batch_size
  t.seq_len = seq_len
  t.max_steps = steps
  t.warmup_steps = steps // 8
  t.log_interval = 5
  t.eval_interval = steps // 2
  t.eval_steps = 4
  t.save_interval = steps
