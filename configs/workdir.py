r"""The config stored in an existing workdir: continue training a converted (or earlier) run.

  python -m mla_jax.convert --hf=path/to/model --workdir=runs/imported
  python -m mla_jax.train --config=configs/workdir.py:runs/imported --workdir=runs/imported \
      --config.trainer.max_steps=200 --config.data.corpus=path/to/data.jsonl

Training resumes from the workdir's newest checkpoint (step 0 of a converted one: its weights with a fresh
optimizer state); every key can still be overridden, except that the model section must stay as saved.
"""

from mla_jax.errors import ConfigError
from mla_jax.workdir import saved_config


def get_config(arg=None):
  if not arg:
    raise ConfigError("config", "configs/workdir.py needs a workdir: --config=configs/workdir.py:runs/imported")
  return saved_config(arg)
