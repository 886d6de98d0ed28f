r"""The seed's "MLA + MoE" example: configs/mla.py with a DeepSeek-MoE feed-forward in every layer.

  python -m mla_jax.train --config=configs/moe.py:quick --workdir=runs/moe_quick   # ~5 min on 2 CPU cores
  python -m mla_jax.train --config=configs/moe.py --workdir=runs/moe   # long: 3-4 days on 2 CPU cores

4 routed experts, top-2, one shared expert (added unweighted), load_balance_alpha 0.01. As in the seed,
every expert (routed and shared) has the dense model's intermediate_size (2048); set
model.moe_intermediate_size to make experts narrower. Dispatch is dropless (sort + grouped matmul);
`--config.model.moe_dispatch=capacity` drops tokens over `capacity_factor` and can shard experts: with
`--config.mesh.expert=4` each of 4 devices holds one expert (expert parallelism, mla_jax/sharding.py).
The full run is configs/mla.py's (20.5M tokens) at about 3x its FLOPs per token; `:quick` trains the same
model for 40 steps of 4 x 128 tokens at lr 2e-3.
"""

from configs import mla


def get_config(arg=None):
  config = mla.get_config(arg)
  m = config.model
  m.name = "moe"
  m.num_experts = 4
  m.experts_per_tok = 2
  m.shared_expert_enabled = True
  m.num_shared_experts = 1
  config.trainer.load_balance_alpha = 0.01
  config.trainer.router_z_loss_alpha = 0.001
  if arg == "quick":  # 3x the dense model's FLOPs per token: a smaller batch keeps it to a few minutes
    mla.apply_quick(config, steps=40, learning_rate=2e-3, batch_size=4, seq_len=128)
  return config
