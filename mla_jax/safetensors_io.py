"""Safetensors files as numpy arrays: a model folder (sharded through `model.safetensors.index.json` or
not; bfloat16 tensors included) read lazily, tensor by tensor or slice by slice, in the stored dtype
(`Folder`); the whole-folder float32 read it replaces (`read_file`, `read_folder`); taking tensors by name
so that missing and leftover ones are reported (`Tensors`); and writing float32 or bfloat16, split into
index-sharded files above a size (`write_folder`). `safetensors` comes with the hf and test extras."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Mapping

import ml_dtypes  # registers bfloat16 with numpy for safetensors
import numpy as np

from mla_jax import cli
from mla_jax.errors import DataError, UserError

INDEX = "model.safetensors.index.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def dtype_of(name) -> np.dtype:
  """float32 or bfloat16, by name or numpy dtype; anything else is a UserError."""
  key = name if isinstance(name, str) else np.dtype(name).name
  if key not in DTYPES:
    raise UserError(f"dtype {key!r} is not supported (choose one of {', '.join(DTYPES)})")
  return DTYPES[key]


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


def _index_map(path: str) -> dict[str, str] | None:
  """{tensor: file path} from the folder's index, or None without one."""
  index = os.path.join(path, INDEX)
  if not os.path.isfile(index):
    return None
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    where = {str(k): os.path.join(path, v) for k, v in weight_map.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DataError(f"{index}: not an index with a weight_map ({cli.one_line(e)})") from e
  for name in sorted(set(where.values())):
    if not os.path.isfile(name):
      raise DataError(f"{name}: listed in the index but missing")
  return where


def _folder_files(path: str) -> list[str]:
  """The files of a folder: those its index lists, else every *.safetensors file."""
  where = _index_map(path)
  files = sorted(set(where.values())) if where is not None else sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise DataError(f"{path}: no *.safetensors files")
  return files


def read_folder(path: str) -> dict[str, np.ndarray]:
  """All tensors of a folder as float32 at once (`Folder` reads them one at a time instead)."""
  tensors = {}
  for name in _folder_files(path):
    tensors.update(read_file(name))
  return tensors


class Folder(Mapping):
  """The tensors of a model folder by name, read when asked for in their stored dtype. Names map to files
  through the index (or each file's header); one file is open (memory-mapped) at a time."""

  def __init__(self, path: str):
    self.path = path
    self._file, self._handle = None, None
    where = _index_map(path)
    if where is None:
      where = {}
      for file in _folder_files(path):
        where.update(dict.fromkeys(self._open(file).keys(), file))
    elif not where:
      raise DataError(f"{path}: no *.safetensors files")
    self.where = where

  def _open(self, file: str):
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415  (optional dependency)

    if file != self._file:
      self._file, self._handle = None, None  # unmaps the previous file
      try:
        self._handle = safe_open(file, framework="numpy")
      except (SafetensorError, OSError) as e:
        raise DataError(f"{file}: not a readable safetensors file ({cli.one_line(e)})") from e
      self._file = file
    return self._handle

  def _read(self, name: str, read):
    from safetensors import SafetensorError  # noqa: PLC0415  (optional dependency)

    file = self.where[name]
    try:
      return read(self._open(file))
    except (TypeError, ValueError) as e:  # a dtype numpy cannot hold
      raise DataError(f"{file}: cannot read tensor {name} as a numpy array ({cli.one_line(e)})") from e
    except SafetensorError as e:
      raise DataError(f"{file}: cannot read tensor {name} ({cli.one_line(e)})") from e

  def __getitem__(self, name: str) -> np.ndarray:
    return self._read(name, lambda f: f.get_tensor(name))

  def slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index] (one slice per axis), reading only those bytes."""
    return self._read(name, lambda f: f.get_slice(name)[index])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._read(name, lambda f: f.get_slice(name).get_shape()))

  def __iter__(self) -> Iterator[str]:
    return iter(self.where)

  def __len__(self) -> int:
    return len(self.where)

  def __contains__(self, name) -> bool:
    return name in self.where


def write_file(tensors: dict[str, np.ndarray], name: str, dtype="float32") -> None:
  """Writes the tensors in `dtype` (float32 or bfloat16), with the metadata transformers expects of a
  PyTorch checkpoint."""
  from safetensors.numpy import save_file  # noqa: PLC0415  (optional dependency)

  dt = dtype_of(dtype)
  save_file({k: np.ascontiguousarray(v, dt) for k, v in tensors.items()}, name, metadata={"format": "pt"})


def write_folder(
  tensors: Iterable[tuple[str, np.ndarray]], path: str, dtype="float32", max_shard_bytes: int = 5 * 10**9
) -> list[str]:
  """Writes (name, array) pairs in `dtype` as `model.safetensors`, or, when they hold more than
  `max_shard_bytes`, as `model-0000k-of-0000n.safetensors` files of at most that size (a larger tensor
  gets a file of its own) with `model.safetensors.index.json`, as transformers does. Holds one file's
  tensors at a time; replaces the model files of an earlier write. Returns the file names."""
  dt = dtype_of(dtype)
  os.makedirs(path, exist_ok=True)
  stale = [os.path.join(path, n) for n in ("model.safetensors", INDEX)]
  for name in stale + glob.glob(os.path.join(path, "model-?????-of-?????.safetensors")):
    if os.path.isfile(name):
      os.remove(name)
  parts, shard, size, total = [], {}, 0, 0

  def flush(shard):
    part = os.path.join(path, f"part-{len(parts):05d}.tmp")
    write_file(shard, part, dt)
    parts.append((part, list(shard)))

  for name, value in tensors:
    value = np.ascontiguousarray(value, dt)
    if shard and size + value.nbytes > max_shard_bytes:
      flush(shard)
      shard, size = {}, 0
    shard[name], size, total = value, size + value.nbytes, total + value.nbytes
  if shard or not parts:
    flush(shard)
  shard = {}
  if len(parts) == 1:
    os.replace(parts[0][0], os.path.join(path, "model.safetensors"))
    return ["model.safetensors"]
  names, weight_map = [], {}
  for k, (part, keys) in enumerate(parts):
    names.append(f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors")
    os.replace(part, os.path.join(path, names[-1]))
    weight_map.update(dict.fromkeys(keys, names[-1]))
  with open(os.path.join(path, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    f.write("\n")
  return names


class Tensors:
  """Tensors by name from `tensors` (a dict, or a `Folder` that reads them when taken), found in `path`;
  `take` records use so that leftovers can be reported."""

  def __init__(self, tensors: Mapping[str, np.ndarray], path: str):
    self.tensors, self.path, self.used = tensors, path, set()

  def _check(self, name: str) -> None:
    if name not in self.tensors:
      raise DataError(f"{self.path}: tensor {name} is missing")

  def take(self, name: str) -> np.ndarray:
    self._check(name)
    self.used.add(name)
    return self.tensors[name]

  def take_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index], reading only the slice from a `Folder`."""
    self._check(name)
    self.used.add(name)
    if isinstance(self.tensors, Folder):
      return self.tensors.slice(name, index)
    return self.tensors[name][index]

  def shape(self, name: str) -> tuple[int, ...]:
    self._check(name)
    return self.tensors.shape(name) if isinstance(self.tensors, Folder) else tuple(self.tensors[name].shape)

  def has(self, name: str) -> bool:
    return name in self.tensors

  def check_all_used(self, skip_prefixes: tuple[str, ...] = ()) -> None:
    left = sorted(k for k in self.tensors if k not in self.used and not k.startswith(skip_prefixes))
    if left:
      raise DataError(f"{self.path}: {len(left)} tensors have no place in the model, first {left[0]}")


def linear(w_OI: np.ndarray) -> np.ndarray:
  """A torch/candle Linear weight [out, in] as our kernel [in, out] (and back: the transpose is its own inverse)."""
  return np.ascontiguousarray(w_OI.T)
