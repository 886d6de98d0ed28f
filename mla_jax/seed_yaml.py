"""Reads a seed-trainer YAML file (`model:` / `trainer:` sections) into a config, checking every key."""

from __future__ import annotations

import os

import ml_collections
import yaml

from mla_jax.config import check_known_keys, default_config
from mla_jax.errors import ConfigError

_SECTIONS = ("model", "trainer", "data", "sample", "mesh")


def read_seed_yaml(path: str) -> dict:
  """The YAML file's top-level mapping, or a ConfigError naming the file."""
  if not os.path.isfile(path):
    raise ConfigError("config", f"YAML file {path} not found")
  try:
    with open(path) as f:
      raw = yaml.safe_load(f) or {}
  except yaml.YAMLError as e:
    raise ConfigError("config", f"{path} is not valid YAML ({str(e).splitlines()[0]})") from e
  if not isinstance(raw, dict):
    raise ConfigError("config", f"{path} must hold a mapping with model: and trainer: sections")
  return raw


def load_seed_yaml(path: str) -> ml_collections.ConfigDict:
  return config_from_mapping(read_seed_yaml(path), path)


def config_from_mapping(raw: dict, path: str) -> ml_collections.ConfigDict:
  """The default config with the sections of a seed YAML mapping (read from `path`) applied."""
  config = default_config()
  overrides = ml_collections.ConfigDict()
  for section, values in raw.items():
    if section not in _SECTIONS:
      raise ConfigError(section, f"unknown section in {path}; expected one of {', '.join(_SECTIONS)}")
    if values is None:
      continue
    if not isinstance(values, dict):
      raise ConfigError(section, f"must be a mapping in {path}")
    overrides[section] = ml_collections.ConfigDict(values)
  check_known_keys(overrides)
  for section in overrides:
    for key, value in overrides[section].items():
      default = config[section][key]
      if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
      elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      elif value is not None and default is not None and type(value) is not type(default):
        raise ConfigError(f"{section}.{key}", f"expected a {type(default).__name__}, got {value!r} in {path}")
      config[section][key] = value
  if "seq_len" not in (raw.get("trainer") or {}):
    config.trainer.seq_len = 0  # the seed trains at max_seq_len
  return config
