"""Decode caches carry their logical axes: one name per dimension of every array, used for sharding."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_model_config
from jax.sharding import Mesh, NamedSharding

from mla_jax import cache as cache_lib
from mla_jax import sharding


@pytest.mark.parametrize("kind", ["gqa", "hybrid"])  # GQA; Mamba2 and MLA
def test_every_cache_array_has_its_logical_axes(kind):
  cfg = tiny_model_config(kind)
  caches = cache_lib.init_caches(cfg, 2, 8)
  assert {type(c) for c in caches} == (
    {cache_lib.KVCache} if kind == "gqa" else {cache_lib.MLACache, cache_lib.Mamba2Cache}
  )
  for c in caches:
    arrays = {f.name for f in dataclasses.fields(c) if f.metadata.get("pytree_node", True)}
    assert set(c.AXES) == arrays, type(c)
    for name in arrays:
      assert len(c.AXES[name]) == getattr(c, name).ndim, (type(c), name)
  ranks_match = jax.tree.map(lambda leaf, axes: len(axes) == leaf.ndim, caches, cache_lib.logical_axes(caches))
  assert all(jax.tree.leaves(ranks_match))
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  shardings = sharding.cache_shardings(caches, mesh, (("cache_batch", "data"),))
  assert jax.tree.structure(shardings) == jax.tree.structure(caches)  # static fields (MLA decode) kept
  assert all(isinstance(s, NamedSharding) and s.spec[0] == "data" for s in jax.tree.leaves(shardings))
