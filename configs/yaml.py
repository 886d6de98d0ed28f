r"""A seed-style YAML file (`model:` and `trainer:` sections with the seed trainer's key names).

  python -m mla_jax.train --config=configs/yaml.py:path/to/model.yaml --workdir=runs/from_yaml

Keys missing from the file keep mla_jax's defaults (hidden 384, 8 layers, 6 heads: the seed's nano
model), so the seed guide's partial examples run as written. Unknown keys are refused with the nearest
valid name. See mla_jax/config.py for every key.
"""

from mla_jax.errors import ConfigError
from mla_jax.seed_yaml import load_seed_yaml


def get_config(arg=None):
  if not arg:
    raise ConfigError("config", "configs/yaml.py needs a path: --config=configs/yaml.py:path/to/file.yaml")
  return load_seed_yaml(arg)
