"""Decode caches as pytrees, preallocated to a maximum length, and a report of what they cost.

One cache per layer, chosen by the layer's mixer:
  MLA     MLACache: c_kv [B, S, kv_latent_dim] and k_rope [B, S, d_rope], nothing else per token
          (DeepSeek-V2 section 2.1.2: (d_c + d_h^R) numbers per token per layer).
  GQA     KVCache: k and v [B, kv_heads, S, head_dim].
  Mamba2  Mamba2Cache: conv [B, K-1, E] and ssm [B, H, P, N] float32: constant size.
Each cache class names the logical axes of its arrays once (`AXES`, field -> names): the layers constrain
their cache writes with them and `sharding.cache_shardings` lays the caches out by them (`logical_axes`).

Key slot s holds the token at position s. A layer writes entry [b, t] of a call at slot positions[b, t]
(`write`: each row has its own positions, so rows of a batch may be at different lengths), and the
attention mask (slot s visible iff s <= query position) hides the slots that are not written yet. Under
jit with the caches donated, XLA updates the buffers in place. A position outside the cache is an error
(CacheOverflowError) wherever the positions are known on the host: eager calls, and the `generate` driver,
which sizes the caches to the prompt plus the new tokens. Inside a jitted program such a write is dropped
(never clamped onto another slot), so a driver that jits its own steps must keep positions < max_len.

A one-token decode step reads the cache before its write and adds the new token itself
(ops.latent_attention.latent_attention_step, ops.attention.attention_step), then writes with `after` set
to the attention output. On XLA:CPU an in-place update whose result is read by a dot (the attention
matmuls) is compiled as two updates of two whole copies of the cache; reading the old buffer while the
update is not ordered after the reads also copies it. With the reads first and the write depending on
them, the step copies no cache (tests/test_decode_copies.py counts the copies in the compiled step).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.config import ModelConfig
from mla_jax.layers.common import compute_dtype

MLA_DECODE_MODES = ("absorbed", "expanded")


class _LogicalAxes:
  """`AXES` maps each array field to its logical axis names (one per dimension, None = not sharded)."""

  AXES: ClassVar[dict[str, tuple]] = {}

  def logical_axes(self):
    """This cache with each array replaced by its tuple of logical axis names."""
    return self.replace(**self.AXES)


@flax.struct.dataclass
class MLACache(_LogicalAxes):
  """Latent MLA cache. `decode` picks how a one-token step reads it: 'absorbed' folds W_UK into the query
  and W_UV into the output (K and V are never formed); 'expanded' rebuilds K and V from the latent, the
  reference twin. It is static (part of the tree structure), so each mode compiles its own program."""

  AXES: ClassVar[dict[str, tuple]] = {
    "c_kv": ("cache_batch", "cache_sequence", "cache_kv"),
    "k_rope": ("cache_batch", "cache_sequence", "cache_kv"),
  }

  c_kv: jax.Array  # [B, S, kv_latent_dim], RMS-normalised latent
  k_rope: jax.Array  # [B, S, d_rope], RoPE already applied at the slot's position
  decode: str = flax.struct.field(pytree_node=False, default="absorbed")

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any, decode: str = "absorbed") -> MLACache:
    if decode not in MLA_DECODE_MODES:
      raise ValueError(f"mla_decode must be one of {MLA_DECODE_MODES}, got {decode!r}")
    return cls(
      c_kv=jnp.zeros((batch, max_len, cfg.kv_latent_dim), dtype),
      k_rope=jnp.zeros((batch, max_len, cfg.d_rope), dtype),
      decode=decode,
    )


@flax.struct.dataclass
class KVCache(_LogicalAxes):
  """GQA cache: RoPE'd keys and values per key/value head, heads before slots ([B, K, S, D]), so that
  each head's keys are one [S, D] block, the layout of the per-head attention matmuls (slots first, they
  would be transposed at every step)."""

  AXES: ClassVar[dict[str, tuple]] = {
    "k": ("cache_batch", "cache_heads", "cache_sequence", "cache_kv"),
    "v": ("cache_batch", "cache_heads", "cache_sequence", "cache_kv"),
  }
  SLOT_AXIS: ClassVar[int] = 2

  k: jax.Array  # [B, kv_heads, S, head_dim]
  v: jax.Array  # [B, kv_heads, S, head_dim]

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
    shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@flax.struct.dataclass
class Mamba2Cache(_LogicalAxes):
  """Mamba2 decode state: the last K-1 conv inputs and the SSM state (always float32)."""

  AXES: ClassVar[dict[str, tuple]] = {
    "conv": ("cache_batch", None, None),
    "ssm": ("cache_batch", "cache_heads", None, None),
  }

  conv: jax.Array  # [B, K-1, E], E = inner + 2 * groups * state_size
  ssm: jax.Array  # [B, H, P, N] float32

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, dtype: Any = jnp.float32) -> Mamba2Cache:
    conv_dim = cfg.mamba2_inner + 2 * cfg.mamba2_n_groups * cfg.mamba2_state_size
    return cls(
      conv=jnp.zeros((batch, cfg.mamba2_conv_kernel - 1, conv_dim), dtype),
      ssm=jnp.zeros((batch, cfg.mamba2_num_heads, cfg.mamba2_head_dim, cfg.mamba2_state_size), jnp.float32),
    )


CACHE_TYPES = (MLACache, KVCache, Mamba2Cache)


def logical_axes(caches):
  """`caches` (a list or any tree of caches) with each array replaced by its tuple of logical axis names:
  a prefix of the caches' tree, so `jax.tree.map(f, caches, logical_axes(caches))` pairs leaf and names."""
  return jax.tree.map(lambda c: c.logical_axes(), caches, is_leaf=lambda x: isinstance(x, CACHE_TYPES))


class CacheOverflowError(ValueError):
  """A cache write at a position outside the cache's slots."""


def check_positions(positions_BT, length: int) -> None:
  """Raises CacheOverflowError unless every position is a slot of a cache with `length` slots."""
  pos = np.asarray(positions_BT)
  if pos.size and (pos.min() < 0 or pos.max() >= length):
    raise CacheOverflowError(
      f"cache write at positions {pos.min()}..{pos.max()} but the cache has {length} "
      f"slots (0..{length - 1}): allocate the caches with max_len >= the last position + 1"
    )


def write(
  cache_BS: jax.Array, new_BT: jax.Array, positions_BT: jax.Array, *, axis: int = 1, after: jax.Array | None = None
) -> jax.Array:
  """Writes new_BT[b, t] into slot positions_BT[b, t] of cache_BS (all other slots unchanged).

  The slots are the cache's dimension `axis` (1: [B, S, ...]; 2: [B, K, S, ...]); new_BT is [B, T, ...],
  its remaining dimensions in the cache's order. Concrete positions outside the cache raise
  CacheOverflowError; traced ones are dropped (see the module docstring). One row with one token (batch-1
  decode) is a dynamic_update_slice, the rest a scatter. `after` ([B, ...], computed from every read of
  the cache before this write, e.g. the attention output of a decode step) makes row b's write depend on
  after[b], so that XLA runs it after those reads, in place, without copying the cache; it does not
  change the result.
  """
  (B, T), S = positions_BT.shape, cache_BS.shape[axis]
  if T > S:
    raise CacheOverflowError(f"cache write of {T} tokens but the cache has {S} slots")
  if not isinstance(positions_BT, jax.core.Tracer):
    check_positions(positions_BT, S)
  new_BT = new_BT.astype(cache_BS.dtype)
  positions_BT = positions_BT.astype(jnp.int32)
  if after is not None:
    # x != x is false for every number but XLA does not fold it: min(position, S or S + 1) keeps the
    # position (slots are < S, and one at S or beyond stays out of range) and now depends on `after`.
    nan_B1 = after.reshape(B, -1)[:, :1]
    positions_BT = jnp.minimum(positions_BT, S + (nan_B1 != nan_B1).astype(jnp.int32))
  if B == 1 and T == 1:
    start = positions_BT[0, 0]
    zero = jnp.zeros((), jnp.int32)
    index = (zero,) * axis + (jnp.clip(start, 0, S - 1),) + (zero,) * (cache_BS.ndim - axis - 1)
    new_BT = jnp.moveaxis(new_BT, 1, axis)  # moves a size-1 dimension: no data moves
    # dynamic_update_slice clamps the index: out of range, the clamped slot gets its own value back.
    old_BT = jax.lax.dynamic_slice(cache_BS, index, new_BT.shape)
    new_BT = jnp.where((start >= 0) & (start < S), new_BT, old_BT)
    return jax.lax.dynamic_update_slice(cache_BS, new_BT, index)
  rows_B1 = jnp.arange(B, dtype=jnp.int32)[:, None]
  # Index arrays split by slices put their [B, T] dimensions first: the update is new_BT as it is.
  index = (rows_B1,) + (slice(None),) * (axis - 1) + (positions_BT,)
  return cache_BS.at[index].set(new_BT, mode="drop", wrap_negative_indices=False)


def init_cache(
  cfg: ModelConfig, layer: int, batch: int, max_len: int, dtype: Any = jnp.float32, mla_decode: str = "absorbed"
):
  """The zero cache of layer `layer`."""
  kind = cfg.mixer_kind(layer)
  if kind == "mla":
    return MLACache.zeros(cfg, batch, max_len, dtype, mla_decode)
  if kind == "gqa":
    return KVCache.zeros(cfg, batch, max_len, dtype)
  return Mamba2Cache.zeros(cfg, batch, dtype)


def init_caches(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None, mla_decode: str = "absorbed") -> list:
  """One zero cache per layer (dtype defaults to the compute dtype; the SSM state is always float32)."""
  dtype = dtype or compute_dtype(cfg.dtype)
  return [init_cache(cfg, i, batch, max_len, dtype, mla_decode) for i in range(cfg.num_layers)]


def cache_nbytes(caches) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(caches)))


# ----------------------------------------------------------------------------------------------- report


def values_per_token(cfg: ModelConfig, layer: int) -> int:
  """Numbers cached per token by layer `layer` (0 for Mamba2, whose state does not grow)."""
  kind = cfg.mixer_kind(layer)
  if kind == "mla":
    return cfg.kv_latent_dim + cfg.d_rope  # DeepSeek-V2 Table 1: (d_c + d_h^R) per layer
  if kind == "gqa":
    return 2 * cfg.kv_heads * cfg.head_dim  # K and V: 2 n_g d_h per layer
  return 0


def fixed_bytes(cfg: ModelConfig, layer: int, itemsize: int) -> int:
  """Bytes per sequence that do not depend on length: the Mamba2 conv window and float32 SSM state."""
  if cfg.mixer_kind(layer) != "mamba2":
    return 0
  conv = (cfg.mamba2_conv_kernel - 1) * (cfg.mamba2_inner + 2 * cfg.mamba2_n_groups * cfg.mamba2_state_size)
  ssm = cfg.mamba2_num_heads * cfg.mamba2_head_dim * cfg.mamba2_state_size
  return conv * itemsize + ssm * 4


def cache_summary(cfg: ModelConfig, length: int, batch: int = 1, dtype: Any = None) -> dict:
  """Cache bytes of this model and of its MHA / GQA equivalents at `length` tokens x `batch` sequences.

  Returns {"rows": [...], "total_bytes", "bytes_per_token"} where each row describes one mixer kind
  (layers, values/token/layer, bytes/token/layer, fixed bytes/layer, bytes at length x batch) and the
  equivalents use every layer: MHA 2 x num_layers x seq_len x (num_heads x head_dim) (the seed's
  formula with hidden_size = num_heads x head_dim), GQA 2 x num_layers x seq_len x kv_heads x head_dim.
  """
  itemsize = jnp.dtype(dtype or compute_dtype(cfg.dtype)).itemsize
  rows = []
  for kind in ("mla", "gqa", "mamba2"):
    layers = [i for i in range(cfg.num_layers) if cfg.mixer_kind(i) == kind]
    if not layers:
      continue
    vpt = values_per_token(cfg, layers[0])
    fixed = fixed_bytes(cfg, layers[0], itemsize)
    rows.append(
      {
        "name": kind,
        "layers": len(layers),
        "values_per_token_layer": vpt,
        "bytes_per_token_layer": vpt * itemsize,
        "fixed_bytes_layer": fixed,
        "bytes": len(layers) * (vpt * itemsize * length + fixed) * batch,
      }
    )
  total = sum(r["bytes"] for r in rows)
  per_token = sum(r["layers"] * r["bytes_per_token_layer"] for r in rows)
  L = cfg.num_layers
  mha = 2 * cfg.num_heads * cfg.head_dim
  gqa = 2 * cfg.kv_heads * cfg.head_dim
  equivalents = [
    {"name": f"MHA ({cfg.num_heads} kv heads)", "layers": L, "values_per_token_layer": mha},
    {"name": f"GQA ({cfg.kv_heads} kv heads)", "layers": L, "values_per_token_layer": gqa},
  ]
  if cfg.use_mla:
    equivalents.append(
      {
        "name": f"MLA (d_c {cfg.kv_latent_dim} + d_rope {cfg.d_rope})",
        "layers": L,
        "values_per_token_layer": cfg.kv_latent_dim + cfg.d_rope,
      }
    )
  for e in equivalents:
    e.update(
      bytes_per_token_layer=e["values_per_token_layer"] * itemsize,
      fixed_bytes_layer=0,
      bytes=L * e["values_per_token_layer"] * itemsize * length * batch,
    )
  return {
    "rows": rows,
    "equivalents": equivalents,
    "total_bytes": total,
    "bytes_per_token": per_token,
    "length": length,
    "batch": batch,
    "itemsize": itemsize,
  }


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
    n /= 1024
  return f"{n:,.2f} GiB"


def cache_report(cfg: ModelConfig, length: int, batch: int = 1, dtype: Any = None) -> str:
  """A markdown table of `cache_summary`: this model's layers, its total, and the all-layer equivalents."""
  s = cache_summary(cfg, length, batch, dtype)
  head = (
    f"Decode cache at length {length:,} x batch {batch} ({s['itemsize']}-byte values; "
    f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim})\n\n"
    "| cache | layers | values/token/layer | bytes/token/layer | fixed bytes/layer | total | vs MHA |\n"
    "|---|---:|---:|---:|---:|---:|---:|\n"
  )
  mha_bytes = s["equivalents"][0]["bytes"]
  num = lambda v: f"{v:,}"

  def line(name, layers, vpt, bpt, fixed, total):
    ratio = f"{total / mha_bytes:.3f}x" if mha_bytes else "-"
    return f"| {name} | {layers} | {vpt} | {bpt} | {fixed} | {_fmt_bytes(total)} | {ratio} |"

  lines = [
    line(
      f"this model: {r['name']}",
      r["layers"],
      num(r["values_per_token_layer"]),
      num(r["bytes_per_token_layer"]),
      num(r["fixed_bytes_layer"]),
      r["bytes"],
    )
    for r in s["rows"]
  ]
  lines.append(line("**this model: total**", cfg.num_layers, "-", "-", "-", s["total_bytes"]))
  lines += [
    line(
      f"equivalent: {e['name']}",
      e["layers"],
      num(e["values_per_token_layer"]),
      num(e["bytes_per_token_layer"]),
      "0",
      e["bytes"],
    )
    for e in s["equivalents"]
  ]
  notes = (
    "\nMHA is the seed's 2 x num_layers x seq_len x hidden_size (hidden_size = num_heads x head_dim); "
    "GQA is 2 x num_layers x seq_len x kv_heads x head_dim; MLA is DeepSeek-V2's (d_c + d_rope) x num_layers "
    "x seq_len (the seed's 2 x kv_latent_dim counts the latent twice and leaves out k_rope). Mamba2 "
    "layers keep a fixed conv window and float32 SSM state whatever the length.\n"
  )
  return head + "\n".join(lines) + "\n" + notes
