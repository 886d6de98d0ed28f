"""Safetensors files as float32 numpy arrays: reading one file or a model folder (sharded through
`model.safetensors.index.json` or not; bfloat16 tensors included), taking tensors by name so that missing
and leftover ones are reported, and writing float32 files. `safetensors` comes with the hf and test extras."""

from __future__ import annotations

import glob
import json
import os

import ml_dtypes  # noqa: F401  # registers bfloat16 with numpy for safetensors
import numpy as np

from mla_jax import cli
from mla_jax.errors import DataError


def read_file(name: str) -> dict[str, np.ndarray]:
  """The tensors of one safetensors file as float32 arrays, or a DataError naming the file."""
  from safetensors import SafetensorError, safe_open  # noqa: PLC0415  (optional dependency)

  tensors = {}
  try:
    with safe_open(name, framework="np") as f:
      for key in f.keys():  # noqa: SIM118  # a safe_open handle is not iterable
        tensors[key] = np.asarray(f.get_tensor(key), np.float32)
  except (TypeError, ValueError) as e:  # a dtype numpy cannot hold
    raise DataError(f"{name}: cannot read as float32 numpy arrays ({cli.one_line(e)}); save it in float32") from e
  except (SafetensorError, OSError) as e:
    raise DataError(f"{name}: not a readable safetensors file ({cli.one_line(e)})") from e
  return tensors


def read_folder(path: str) -> dict[str, np.ndarray]:
  """All tensors of a folder: the files model.safetensors.index.json lists, else every *.safetensors file."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise DataError(f"{index}: not an index with a weight_map ({cli.one_line(e)})") from e
    files = [os.path.join(path, name) for name in files]
  else:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise DataError(f"{path}: no *.safetensors files")
  tensors = {}
  for name in files:
    if not os.path.isfile(name):
      raise DataError(f"{name}: listed in the index but missing")
    tensors.update(read_file(name))
  return tensors


def write_file(tensors: dict[str, np.ndarray], name: str) -> None:
  """Writes the tensors as float32, with the metadata transformers expects of a PyTorch checkpoint."""
  from safetensors.numpy import save_file  # noqa: PLC0415  (optional dependency)

  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, name, metadata={"format": "pt"})


class Tensors:
  """Tensors by name, read from `path`; `take` records use so that leftovers can be reported."""

  def __init__(self, tensors: dict[str, np.ndarray], path: str):
    self.tensors, self.path, self.used = tensors, path, set()

  def take(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise DataError(f"{self.path}: tensor {name} is missing")
    self.used.add(name)
    return self.tensors[name]

  def has(self, name: str) -> bool:
    return name in self.tensors

  def check_all_used(self, skip_prefixes: tuple[str, ...] = ()) -> None:
    left = sorted(k for k in self.tensors if k not in self.used and not k.startswith(skip_prefixes))
    if left:
      raise DataError(f"{self.path}: {len(left)} tensors have no place in the model, first {left[0]}")


def linear(w_OI: np.ndarray) -> np.ndarray:
  """A torch/candle Linear weight [out, in] as our kernel [in, out] (and back: the transpose is its own inverse)."""
  return np.ascontiguousarray(w_OI.T)
