"""Causal softmax attention with grouped key/value heads: a plain einsum reference and its fast twins.

Shapes: q_BTHD (H query heads), k_BSKD and v_BSKE (K key/value heads, H divisible by K; head h reads
kv head h // (H // K)). The mask comes from positions: query t may see key slot s iff s <= q_pos[t].
Keys sit at slot = position, so unwritten cache slots beyond the current position are masked too.

`flash` (Pallas TPU splash attention) masks plainly causally (slot s visible from query t iff s <= t):
that is the position mask whenever the keys are the call's own tokens (S == T), which the model only
does at positions 0..T-1 (training, evaluation, uncached forward; a cache of T slots filled from
position 0). With a cache (S != T) it falls back to the exact chunked form.

`attention_step` is the one-token decode step over a cache laid out [B, K, S, D] (mla_jax.cache.KVCache):
the reference's attention over the cache as it was before the token's write plus the token's own key and
value, so that the write can follow the reads in place. Its slow twin is the reference over the written
cache.

Packed rows (several documents per row) pass `segment_ids_BT` [B, T], one id per token, keys being the
call's own tokens (S == T; a cache holds one document per row, so cached calls take none). Positions then
restart at each document (they feed RoPE), so the mask is by slot: key s is visible from query t iff
s <= t and segment_ids[s] == segment_ids[t]. A token always sees itself, so no query row is fully
masked. Without segment ids every form computes exactly what it computes unsegmented.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

_NEG_INF = -1e30


def causal_mask(q_positions_BT: jax.Array, kv_len: int) -> jax.Array:
  """[B, T, S] boolean: key slot s is visible from query t."""
  return jnp.arange(kv_len)[None, None, :] <= q_positions_BT[:, :, None]


def _check_segments(segment_ids_BT: jax.Array, q_BTHD: jax.Array, kv_len: int) -> None:
  B, T = q_BTHD.shape[:2]
  if kv_len != T:
    raise ValueError(f"segment ids need keys that are the queries' own tokens, got {kv_len} keys for {T} queries")
  if segment_ids_BT.shape != (B, T):
    raise ValueError(f"segment ids {segment_ids_BT.shape} must be [batch, time] = {(B, T)}")


def segment_causal_mask(q_slots_BT: jax.Array, q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array) -> jax.Array:
  """[B, T, S] boolean: key slot s is visible from the query at slot q_slots[t] iff s <= q_slots[t] and
  both have the same segment id."""
  S = kv_segment_ids_BS.shape[1]
  same_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  return causal_mask(q_slots_BT, S) & same_BTS


def attention_mask(q_positions_BT: jax.Array, kv_len: int, segment_ids_BT=None) -> jax.Array:
  """[B, T, S] boolean: the position mask without segment ids, else the slot-causal segment mask (S == T)."""
  if segment_ids_BT is None:
    return causal_mask(q_positions_BT, kv_len)
  slots_BT = jnp.broadcast_to(jnp.arange(segment_ids_BT.shape[1]), segment_ids_BT.shape)
  return segment_causal_mask(slots_BT, segment_ids_BT, segment_ids_BT)


def _masked_attention(q_BTHD, k_BSKD, v_BSKE, mask_BTS, scale: float) -> jax.Array:
  B, T, H, D = q_BTHD.shape
  K = k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32) * scale
  mask_B11TS = mask_BTS[:, None, None]
  s_BKGTS = jnp.where(mask_B11TS, s_BKGTS, _NEG_INF)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKE.dtype)
  o_BTKGE = jnp.einsum("bkgts,bske->btkge", p_BKGTS, v_BSKE)
  return o_BTKGE.reshape(B, T, H, v_BSKE.shape[-1])


def attention_reference(q_BTHD, k_BSKD, v_BSKE, q_positions_BT, scale: float, segment_ids_BT=None) -> jax.Array:
  """softmax(q k^T * scale + mask) v in float32, grouping the H query heads over K kv heads."""
  if segment_ids_BT is not None:
    _check_segments(segment_ids_BT, q_BTHD, k_BSKD.shape[1])
  mask_BTS = attention_mask(q_positions_BT, k_BSKD.shape[1], segment_ids_BT)
  return _masked_attention(q_BTHD, k_BSKD, v_BSKE, mask_BTS, scale)


def attention_step(q_BHD, k_BKSD, v_BKSE, k_BKD, v_BKE, positions_B, *, scale: float, dtype=jnp.float32) -> jax.Array:
  """One query token per row (at positions_B, with its own key k_BKD and value v_BKE) over the cache
  before the token's write: the reference over the cache with the token written at slot `position`
  (slots s < position from the cache; a position outside the cache, whose write is dropped, leaves the
  token out). Matmuls in `dtype` with float32 accumulation, softmax in float32; [B, H, E].

  Each head's keys and values are one [S, D] block of the cache, read as stored: the keys as the left
  operand of their matmul (slots as rows), the values as the right one. The (small) scores are turned
  slots-last for the softmax.
  """
  B, H, D = q_BHD.shape
  K, S = k_BKSD.shape[1], k_BKSD.shape[2]
  f32 = jnp.float32
  q_BKGD = q_BHD.reshape(B, K, H // K, D).astype(dtype)
  k_BKSD, v_BKSE = k_BKSD.astype(dtype), v_BKSE.astype(dtype)
  s_BKGS = jnp.einsum("bksd,bkgd->bksg", k_BKSD, q_BKGD, preferred_element_type=f32).swapaxes(2, 3)
  s_new_BKG = jnp.einsum("bkd,bkgd->bkg", k_BKD.astype(dtype), q_BKGD, preferred_element_type=f32)
  before_B11S = (jnp.arange(S)[None, :] < positions_B[:, None])[:, None, None, :]
  written_B11 = ((positions_B >= 0) & (positions_B < S))[:, None, None]
  s_BKGS = jnp.where(before_B11S, s_BKGS * scale, _NEG_INF)
  s_new_BKG = jnp.where(written_B11, s_new_BKG * scale, _NEG_INF)
  m_BKG = jnp.maximum(jnp.max(s_BKGS, axis=-1), s_new_BKG)  # softmax over the S slots and the new token
  e_BKGS = jnp.exp(s_BKGS - m_BKG[..., None])
  e_new_BKG = jnp.where(written_B11, jnp.exp(s_new_BKG - m_BKG), 0.0)
  inv_BKG = 1.0 / (jnp.sum(e_BKGS, axis=-1) + e_new_BKG)
  p_BKGS = (e_BKGS * inv_BKG[..., None]).astype(dtype)
  p_new_BKG = (e_new_BKG * inv_BKG).astype(dtype)
  o_BKGE = jnp.einsum("bkgs,bkse->bkge", p_BKGS, v_BKSE, preferred_element_type=f32)
  o_BKGE = o_BKGE + p_new_BKG.astype(f32)[..., None] * v_BKE.astype(dtype).astype(f32)[:, :, None]
  return o_BKGE.reshape(B, H, -1).astype(dtype)


def attention_xla(
  q_BTHD, k_BSKD, v_BSKE, q_positions_BT, scale: float, implementation=None, segment_ids_BT=None
) -> jax.Array:
  """jax.nn.dot_product_attention (XLA or cuDNN). Values narrower than keys are zero-padded, then cropped.

  The mask (position or segment) goes in as `mask`; cuDNN turns it into an additive bias, so its run
  time does not depend on the segments.
  """
  D, E = q_BTHD.shape[-1], v_BSKE.shape[-1]
  if segment_ids_BT is not None:
    _check_segments(segment_ids_BT, q_BTHD, k_BSKD.shape[1])
  if E < D:
    v_BSKE = jnp.pad(v_BSKE, ((0, 0), (0, 0), (0, 0), (0, D - E)))
  mask_B1TS = attention_mask(q_positions_BT, k_BSKD.shape[1], segment_ids_BT)[:, None]
  o_BTHD = jax.nn.dot_product_attention(
    q_BTHD, k_BSKD, v_BSKE, mask=mask_B1TS, scale=scale, implementation=implementation
  )
  return o_BTHD[..., :E]


def attention_chunked(
  q_BTHD, k_BSKD, v_BSKE, q_positions_BT, scale: float, chunk_size: int, segment_ids_BT=None
) -> jax.Array:
  """The reference applied to blocks of `chunk_size` queries, each rematerialised in the backward pass.

  Peak memory is O(chunk_size * S) per head instead of O(T * S); the result is the reference's exactly.
  With segment ids each block carries its queries' slots (in place of positions) and segment ids.
  """
  B, T, H, D = q_BTHD.shape
  if chunk_size >= T:
    return attention_reference(q_BTHD, k_BSKD, v_BSKE, q_positions_BT, scale, segment_ids_BT)
  if segment_ids_BT is not None:
    _check_segments(segment_ids_BT, q_BTHD, k_BSKD.shape[1])
    q_positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))  # slots: the segment mask is by slot
  n = -(-T // chunk_size)
  pad = n * chunk_size - T
  q_pad = jnp.pad(q_BTHD, ((0, 0), (0, pad), (0, 0), (0, 0)))
  pos_pad = jnp.pad(q_positions_BT, ((0, 0), (0, pad)))
  q_NBCHD = q_pad.reshape(B, n, chunk_size, H, D).swapaxes(0, 1)
  pos_NBC = pos_pad.reshape(B, n, chunk_size).swapaxes(0, 1)
  seg_NBC = None
  if segment_ids_BT is not None:  # padded query rows (cropped below) get segment 0
    seg_NBC = jnp.pad(segment_ids_BT, ((0, 0), (0, pad))).reshape(B, n, chunk_size).swapaxes(0, 1)

  @jax.checkpoint
  def block(args):
    q_BCHD, pos_BC, seg_BC = args
    if seg_BC is None:
      mask_BCS = causal_mask(pos_BC, k_BSKD.shape[1])
    else:
      mask_BCS = segment_causal_mask(pos_BC, seg_BC, segment_ids_BT)
    return _masked_attention(q_BCHD, k_BSKD, v_BSKE, mask_BCS, scale)

  o_NBCHE = jax.lax.map(block, (q_NBCHD, pos_NBC, seg_NBC))
  return o_NBCHE.swapaxes(0, 1).reshape(B, n * chunk_size, H, -1)[:, :T]


def _flash_blocks(T: int) -> int:
  """The query and key block: the largest of 512, 256, 128 dividing T (T is padded to a multiple of 128)."""
  return next(b for b in (512, 256, 128) if T % b == 0)


def _splash_kernel(heads: int, T: int, interpret: bool):
  """A causal splash attention kernel for [heads, T, D] queries (its block tables become constants)."""
  b = _flash_blocks(T)
  sizes = splash.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  mask = splash.MultiHeadMask([splash.CausalMask((T, T)) for _ in range(heads)])
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def attention_flash_local(q_BTHD, k_BTKD, v_BTKE, scale: float, interpret: bool, segment_ids_BT=None) -> jax.Array:
  """Causal splash attention on one device's arrays: B is vmapped, heads are grouped inside the kernel.

  The kernel takes [heads, T, width] per sequence, any head widths (value width may differ from key
  width; a block spans the whole head width), and T a multiple of 128 (its lane width): T is zero-padded
  at the end, which causality keeps invisible to the real queries, and the padded rows are cropped.
  It has no softmax scale, so q is scaled first. Segment ids go to the kernel's own `SegmentIds`
  (and-ed with its causal mask); the padding gets segment -1.
  """
  B, T, H, _ = q_BTHD.shape
  Tp = -(-T // 128) * 128
  pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
  q_BHTD = jnp.pad(q_BTHD * jnp.asarray(scale, q_BTHD.dtype), pad).transpose(0, 2, 1, 3)
  k_BKTD = jnp.pad(k_BTKD, pad).transpose(0, 2, 1, 3)
  v_BKTE = jnp.pad(v_BTKE, pad).transpose(0, 2, 1, 3)
  kernel = _splash_kernel(H, Tp, interpret)
  if segment_ids_BT is None:
    o_BHTE = jax.vmap(kernel)(q_BHTD, k_BKTD, v_BKTE)
  else:
    seg_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
    o_BHTE = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg)))(
      q_BHTD, k_BKTD, v_BKTE, seg_BT
    )
  return o_BHTE.transpose(0, 2, 1, 3)[:, :T]


def attention_flash(q_BTHD, k_BTKD, v_BTKE, scale: float, platform: str, segment_ids_BT=None) -> jax.Array:
  """Causal splash attention (keys = the queries' own tokens, positions 0..T-1, or slots with segment
  ids); Pallas interpret mode off TPU. Under a mesh the kernel runs per shard (shard_map): batch over
  the `batch` rule's axes, heads over `activation_heads`'s, the sequence whole."""
  interpret = platform != "tpu"
  if segment_ids_BT is not None:
    _check_segments(segment_ids_BT, q_BTHD, k_BTKD.shape[1])
  fn = functools.partial(attention_flash_local, scale=scale, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q_BTHD, k_BTKD, v_BTKE, segment_ids_BT=segment_ids_BT)
  batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "activation_length", "activation_heads", None))
  spec = P(batch, None, heads, None)
  if segment_ids_BT is None:
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
      q_BTHD, k_BTKD, v_BTKE
    )
  return jax.shard_map(
    lambda q, k, v, seg: fn(q, k, v, segment_ids_BT=seg),
    mesh=mesh,
    in_specs=(spec, spec, spec, P(batch, None)),
    out_specs=spec,
    check_vma=False,
  )(q_BTHD, k_BTKD, v_BTKE, segment_ids_BT)


def current_platform() -> str:
  """The platform being compiled for: the devices of the mesh in context (which may be an abstract TPU
  topology compiled ahead of time from a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


# Longest sequence for which CPU `auto` uses the einsum form; longer ones use the query-chunked form.
CPU_CHUNKED_ABOVE = 1024


def resolve_impl(impl: str, dtype, seq_len: int = 0, platform: str | None = None) -> str:
  """'auto' picks splash attention (`flash`) on TPU, cuDNN for half precision on GPU (XLA otherwise), and
  on CPU the einsum form up to CPU_CHUNKED_ABOVE query tokens (faster there than dot_product_attention's
  XLA path: 19 vs 24 ms fwd+bwd at B 4, T 256, H 8) and the chunked form beyond."""
  if impl != "auto":
    return impl
  platform = platform or current_platform()
  if platform == "gpu":
    return "cudnn" if jnp.dtype(dtype).itemsize == 2 else "xla"
  if platform == "tpu":
    return "flash"
  return "chunked" if seq_len > CPU_CHUNKED_ABOVE else "reference"


def attention(
  q_BTHD,
  k_BSKD,
  v_BSKE,
  q_positions_BT,
  *,
  scale: float,
  impl: str = "auto",
  chunk_size: int = 512,
  segment_ids_BT=None,
) -> jax.Array:
  """Dispatches to one implementation; all of them compute attention_reference's result.

  `segment_ids_BT` [B, T] (optional; keys must be the call's own tokens, S == T) keeps each query inside
  its own segment, on top of causality by slot.
  """
  platform = current_platform()
  impl = resolve_impl(impl, q_BTHD.dtype, q_BTHD.shape[1], platform)
  if segment_ids_BT is not None:
    _check_segments(segment_ids_BT, q_BTHD, k_BSKD.shape[1])
  if impl == "flash" and k_BSKD.shape[1] != q_BTHD.shape[1]:
    impl = "chunked"  # keys from a cache: the position mask is not the plain causal one
  if impl == "reference":
    return attention_reference(q_BTHD, k_BSKD, v_BSKE, q_positions_BT, scale, segment_ids_BT)
  if impl == "chunked":
    return attention_chunked(q_BTHD, k_BSKD, v_BSKE, q_positions_BT, scale, chunk_size, segment_ids_BT)
  if impl in ("xla", "cudnn"):
    return attention_xla(
      q_BTHD, k_BSKD, v_BSKE, q_positions_BT, scale, implementation=impl, segment_ids_BT=segment_ids_BT
    )
  if impl == "flash":
    return attention_flash(q_BTHD, k_BSKD, v_BSKE, scale, platform, segment_ids_BT)
  raise ValueError(f"unknown attention implementation {impl!r}")
