"""Names of pytree leaves and shape comparison of two trees: the one place that turns a key path into a
string, used by checkpoints, conversion, sharding checks and parameter roles."""

from collections.abc import Callable
from typing import Any

import jax


def key_name(key) -> str:
  """One path entry as text: a dict key, attribute name or sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path) -> list[str]:
  return [key_name(k) for k in path]


def path_str(path) -> str:
  """'layers/0/mla/wq' for a pytree key path."""
  return "/".join(path_names(path))


def flatten(tree, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """{path string: leaf} in tree order."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def shape_mismatches(found, wanted, found_in: str = "the checkpoint", wanted_in: str = "the config") -> list[str]:
  """Every leaf that is differently shaped, missing from `found`, or only in `found`, as sentences;
  differently shaped first, then missing, then unexpected, each sorted by name."""
  has_shape = lambda tree: {n: tuple(x.shape) for n, x in flatten(tree).items() if hasattr(x, "shape")}
  got, want = has_shape(found), has_shape(wanted)
  return (
    [
      f"{n} has shape {got[n]} in {found_in} but {want[n]} in {wanted_in}"
      for n in sorted(set(got) & set(want))
      if got[n] != want[n]
    ]
    + [f"{n} {want[n]} is in {wanted_in} but not in {found_in}" for n in sorted(set(want) - set(got))]
    + [f"{n} {got[n]} is in {found_in} but not in {wanted_in}" for n in sorted(set(got) - set(want))]
  )


def check_shapes(
  found,
  wanted,
  where: str,
  error: Callable[[str], Exception],
  found_in: str = "the checkpoint",
  wanted_in: str = "the config",
) -> None:
  """Raises `error` naming the first mismatch (and how many there are) between two trees' shapes."""
  problems = shape_mismatches(found, wanted, found_in, wanted_in)
  if problems:
    more = f" ({len(problems) - 1} more)" if len(problems) > 1 else ""
    raise error(f"{where}: {problems[0]}{more}")
