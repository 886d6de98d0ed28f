r"""Hugging Face DeepSeek-V2/V3, Mamba2, Granite 4.0-H and Llama checkpoints to and from mla_jax config and parameters.

`from_hf(path)` reads a folder with `config.json` and `*.safetensors` (sharded with
`model.safetensors.index.json` or not) and returns (config, params): a validated ConfigDict and the
parameter tree of `mla_jax.model.LanguageModel`. `to_hf(config, params, path)` writes the inverse: MLA models as
`deepseek_v2` (softmax routing) or, with the sigmoid router, `deepseek_v3`; Mamba2-only models as `mamba2`;
GQA models with RoPE and a SwiGLU MLP in every layer and none of Granite's multipliers as `llama`; other GQA and
Mamba2 models whose layers all have an FFN as `granitemoehybrid`.
Each format has one name table (HF tensors <-> our parameters, with the transform between them) that both
directions use, and one table of config.json keys with a model key of the same meaning.

Reading is streamed: tensors are read one at a time from the memory-mapped files in the checkpoint's dtype
and become parameters in float32 (or bfloat16 on request); `load_sharded` places each parameter straight into
its sharded layout on a mesh. Writing is float32 or bfloat16, split into index-sharded files above a size.

Routing: deepseek_v2 is softmax scores with greedy top-k, times `routed_scaling_factor`; deepseek_v3 is
sigmoid scores with noaux_tc top-k (group-limited: n_group / topk_group), `norm_topk_prob` and
`routed_scaling_factor` (model.router = sigmoid, n_group, topk_group, norm_topk_prob, routed_scaling_factor).
Each MoE layer's `gate.e_score_correction_bias` is the parameter `layer_i/moe/score_bias`, so
`model.forward(config, params, ids)` routes as the checkpoint does; training's aux-free bias
(model.aux_free_bias) adds to it from the 'moe_bias' collection.

Exact, or refused with a ConfigError naming the feature: RoPE scaling (YaRN and every other rope_type),
`scoring_func` other than softmax (deepseek_v2) or sigmoid (deepseek_v3), `topk_method` other than greedy
(deepseek_v2) or noaux_tc (deepseek_v3), deepseek_v2 top-k renormalisation (transformers' DeepSeek-V2
router ignores `norm_topk_prob`; the reference code applies it), attention or MLP biases, activations other
than SiLU, `rms_norm_eps` != 1e-6 (transformers fixes the q/kv latent norms at 1e-6 while ours share the
model's eps), and `num_key_value_heads` != heads. DeepSeek-V3 multi-token-prediction layers (indices >=
num_hidden_layers) are skipped.

Mamba2: in_proj splits as [z | xBC | dt] in both, the gated norm is RMSNorm(y * silu(z)) over n_groups
groups of intermediate / n_groups, and one eps (`layer_norm_epsilon`) serves every norm, as ours does.
Refused: `use_conv_bias=False`, `use_bias=True`, `time_step_limit` other than (0, inf), activations other
than SiLU, and an in_proj wider than 2 I + 2 G N + H (extra MLP channels). `residual_in_fp32` changes
nothing in float32, where the comparison runs.

Granite 4.0-H (granitemoehybrid): each layer is a Mamba2 mixer (named as in transformers' Mamba2, under
`mamba.`) or GQA attention, then Granite's MoE plus its shared MLP (`shared_intermediate_size`), or the shared MLP
alone as the dense FFN (num_local_experts = 0). Its router takes the softmax of the top-k logits, which is our
softmax, top-k and renormalisation (norm_topk_prob); one expert per token is refused (Granite's weight is then 1,
ours the routing probability). The multipliers map to the model keys of the same names: embeddings times
`embedding_multiplier`, each mixer and FFN output times `residual_multiplier` before it joins the residual, the
attention scores times `attention_multiplier` (in place of 1/sqrt(head_dim)), the logits divided by
`logits_scaling`. `position_embedding_type` other than "rope" is attention without RoPE (model.use_rope=False).
Layer types are read as the checkpoints write them (mamba / attention) or as transformers 5 does (linear_attention /
full_attention); MoE tensors under either the checkpoints' names (router.layer, input_linear, output_linear) or
transformers 5's in-memory ones. Refused: attention or Mamba projection biases, `mamba_conv_bias=False`,
activations other than SiLU, RoPE scaling, `time_step_limit` other than (0, inf), a `head_dim` other than
hidden_size / heads. transformers' granitemoehybrid ignores `partial_rotary_factor` (it rotates the whole head), so
import does too, and export refuses a partial rotary (model.rope_dim below head_dim).

Llama: q/k/v/o and gate/up/down as in Granite's attention layers and DeepSeek's dense MLP, `head_dim` as
written (hidden_size / heads when absent), `rope_theta` from rope_parameters or the top level. Refused: RoPE
scaling (llama3, YaRN, any rope_type other than default), a partial_rotary_factor, attention or MLP biases,
activations other than SiLU. transformers' Llama rotates halves (x_i, x_i+d/2), as ours does.

RoPE: DeepSeek rotates interleaved pairs (x_2i, x_2i+1) by frequency i (transformers' DeepSeek-V2 always;
V3 when `rope_interleave`), ours rotates (x_i, x_i+d/2). Importing permutes the rope columns of the query
projection (per head) and of the k_rope part of `kv_a_proj_with_mqa` to [even | odd]; q.k is unchanged
because both sides move together. Exporting applies the inverse.

The tests against transformers (tests/test_convert.py) need torch and transformers, which are not in the
test extra; install them (CPU torch) to run those tests, which are skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from mla_jax import cli, pytree
from mla_jax import config as config_lib
from mla_jax.errors import ConfigError, DataError, UserError
from mla_jax.model import abstract_variables
from mla_jax.safetensors_io import Folder, Tensors, dtype_of, linear, write_folder

_DEEPSEEK = ("deepseek_v2", "deepseek_v3")
_GRANITE = "granitemoehybrid"
_LLAMA = "llama"
_SUPPORTED = _DEEPSEEK + ("mamba2", _GRANITE, _LLAMA)
_MTP_LAYERS = 8  # DeepSeek-V3 multi-token-prediction layers follow the model's; at most this many are skipped


def interleaved_to_half(d: int) -> np.ndarray:
  """Column order that takes an interleaved-pair rope vector to the rotate-half layout: [0,2,..,1,3,..]."""
  return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])


# ------------------------------------------------------------------------------------------ name tables


@dataclasses.dataclass(frozen=True)
class Entry:
  """HF tensors <-> our parameters (paths as `pytree.path_str` writes them): `load` takes the HF arrays to
  ours, `save` is its exact inverse. `transpose` says the same where slices can be read without `load`:
  False, ours[0] is hf[0]; True, ours[0] is hf[0].T (2-D); None, only `load` knows. `stacked`: ours[0][j]
  comes from hf[j] alone (through `transpose`, which is then set)."""

  hf: tuple[str, ...]
  ours: tuple[str, ...]
  load: Callable[..., tuple[np.ndarray, ...]]
  save: Callable[..., tuple[np.ndarray, ...]]
  transpose: bool | None = None
  stacked: bool = False


def _same(hf: str, ours: str) -> Entry:
  return Entry((hf,), (ours,), lambda x: (x,), lambda x: (x,), transpose=False)


def _kernel(
  hf: str, ours: str, shape: tuple[int, ...] | None = None, n_in: int = 1, cols: np.ndarray | None = None
) -> Entry:
  """A Linear weight [out, in] as our kernel [in, out], reshaped to `shape` (its first `n_in` axes make
  `in`) and its last axis permuted by `cols`."""
  inv = None if cols is None else np.argsort(cols)

  def load(w_OI):
    k = linear(w_OI)
    k = k if shape is None else k.reshape(shape)
    return (k if cols is None else k[..., cols],)

  def save(k):
    k = k if inv is None else k[..., inv]
    return (linear(k.reshape(math.prod(k.shape[:n_in]), -1)),)

  return Entry((hf,), (ours,), load, save, transpose=True if shape is None and cols is None else None)


def _stacked(hf: list[str], ours: str) -> Entry:
  """One Linear weight per expert as our stacked [E, in, out] kernel."""
  return Entry(
    tuple(hf),
    (ours,),
    lambda *ws: (np.stack([linear(w) for w in ws]),),
    lambda k_EIO: tuple(linear(k) for k in k_EIO),
    transpose=True,
    stacked=True,
  )


def _fused_experts(gate_up: str, down: str, ours: tuple[str, str, str]) -> Entry:
  """transformers' fused experts: gate_up_proj [E, 2F, D] = [gate | up] and down_proj [E, D, F]."""

  def load(gate_up_EFD, down_EDF):
    F = gate_up_EFD.shape[1] // 2
    t = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1))
    return t(gate_up_EFD[:, :F]), t(gate_up_EFD[:, F:]), t(down_EDF)

  def save(gate_EDF, up_EDF, down_EFD):
    return np.concatenate([gate_EDF, up_EDF], -1).transpose(0, 2, 1), down_EFD.transpose(0, 2, 1)

  return Entry((gate_up, down), ours, load, save)


def _kv_b(hf: str, ours: tuple[str, str], C: int, H: int, Dn: int) -> Entry:
  """kv_b_proj [H (Dn + Dv), C] as w_uk [C, H, Dn] and w_uv [C, H, Dv]."""

  def load(w):
    kv_b_CHK = linear(w).reshape(C, H, -1)
    return np.ascontiguousarray(kv_b_CHK[..., :Dn]), np.ascontiguousarray(kv_b_CHK[..., Dn:])

  def save(uk_CHK, uv_CHV):
    return (linear(np.concatenate([uk_CHK, uv_CHV], axis=-1).reshape(C, -1)),)

  return Entry((hf,), ours, load, save)


def _swiglu(hf: str, ours: str, experts: int | None = None) -> list[Entry]:
  """gate/up/down projections under prefix `hf` (`hf`experts.j.* when stacked over `experts`)."""
  if experts is None:
    return [_kernel(f"{hf}{name}_proj.weight", f"{ours}{name}/kernel") for name in ("gate", "up", "down")]
  return [
    _stacked([f"{hf}experts.{j}.{theirs}.weight" for j in range(experts)], ours + name)
    for name, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))
  ]


def _head(cfg: config_lib.ModelConfig, embedding: str, norm: str) -> list[Entry]:
  table = [_same(embedding, "embedding"), _same(norm, "final_norm/scale")]
  if not cfg.tie_embeddings:
    table.append(_kernel("lm_head.weight", "lm_head/kernel"))
  return table


def deepseek_table(
  cfg: config_lib.ModelConfig, interleaved: bool = True, fused: Callable[[str], bool] = lambda prefix: False
) -> list[Entry]:
  """The DeepSeek-V2/V3 name table. `interleaved`: the checkpoint rotates interleaved rope pairs;
  `fused(prefix)`: the MoE layer under `prefix` holds fused experts (as newer transformers save them)."""
  H, Dn, Dr, Dv, C, D = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.v_head_dim, cfg.kv_latent_dim, cfg.hidden_size
  perm = interleaved_to_half(Dr) if interleaved else np.arange(Dr)
  q_cols = np.concatenate([np.arange(Dn), Dn + perm])
  kv_cols = np.concatenate([np.arange(C), C + perm])
  table = _head(cfg, "model.embed_tokens.weight", "model.norm.weight")
  for i in range(cfg.num_layers):
    p, o = f"model.layers.{i}.", f"layer_{i}/"
    a, m = p + "self_attn.", o + "mla/"
    if cfg.q_latent_dim:
      table += [
        _kernel(a + "q_a_proj.weight", m + "w_dq/kernel"),
        _same(a + "q_a_layernorm.weight", m + "q_norm/scale"),
        _kernel(a + "q_b_proj.weight", m + "w_uq/kernel", (cfg.q_latent_dim, H, Dn + Dr), cols=q_cols),
      ]
    else:
      table.append(_kernel(a + "q_proj.weight", m + "w_q/kernel", (D, H, Dn + Dr), cols=q_cols))
    table += [
      _kernel(a + "kv_a_proj_with_mqa.weight", m + "w_dkv/kernel", cols=kv_cols),
      _same(a + "kv_a_layernorm.weight", m + "kv_norm/scale"),
      _kv_b(a + "kv_b_proj.weight", (m + "w_uk/kernel", m + "w_uv/kernel"), C, H, Dn),
      _kernel(a + "o_proj.weight", m + "w_o/kernel", (H, Dv, D), n_in=2),
      _same(p + "input_layernorm.weight", o + "mixer_norm/scale"),
      _same(p + "post_attention_layernorm.weight", o + "ffn_norm/scale"),
    ]
    f = p + "mlp."
    if cfg.ffn_kind(i) != "moe":
      table += _swiglu(f, o + "mlp/")
      continue
    table.append(_kernel(f + "gate.weight", o + "moe/router/kernel"))
    if cfg.router == "sigmoid":
      table.append(_same(f + "gate.e_score_correction_bias", o + "moe/score_bias"))
    if fused(f):
      table.append(
        _fused_experts(
          f + "experts.gate_up_proj", f + "experts.down_proj", (o + "moe/w_gate", o + "moe/w_up", o + "moe/w_down")
        )
      )
    else:
      table += _swiglu(f, o + "moe/", cfg.num_experts)
    if cfg.shared_expert_enabled and cfg.num_shared_experts:
      table += [
        _kernel(f"{f}shared_experts.{theirs}.weight", f"{o}moe/shared_{name}/kernel")
        for name, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
      ]
  return table


def _mamba2_mixer(cfg: config_lib.ModelConfig, x: str, m: str, i: int) -> list[Entry]:
  """The Mamba2 mixer of layer `i` under HF prefix `x` (transformers' Mamba2 and Granite's Mamba layers name
  it alike) and our prefix `m`; loading refuses an in_proj with extra MLP channels."""
  inner, g, n, h = cfg.mamba2_inner, cfg.mamba2_n_groups, cfg.mamba2_state_size, cfg.mamba2_num_heads
  width = 2 * inner + 2 * g * n + h

  def in_proj(w):
    if w.shape[0] != width:
      _refuse(
        "in_proj",
        f"layer {i} in_proj has {w.shape[0]} outputs, not 2I + 2GN + H = {width} (extra MLP channels are "
        "not supported)",
      )
    return (linear(w),)

  return [
    Entry((x + "in_proj.weight",), (m + "in_proj/kernel",), in_proj, lambda k: (linear(k),)),
    Entry(
      (x + "conv1d.weight",),
      (m + "conv_kernel",),
      lambda w: (np.ascontiguousarray(w[:, 0, :].T),),
      lambda k: (k.T[:, None, :],),
    ),
    _same(x + "conv1d.bias", m + "conv_bias"),
    *[_same(x + name, m + name) for name in ("dt_bias", "A_log", "D")],
    _same(x + "norm.weight", m + "norm_scale"),
    _kernel(x + "out_proj.weight", m + "out_proj/kernel"),
  ]


def mamba2_table(cfg: config_lib.ModelConfig) -> list[Entry]:
  """The transformers Mamba2 name table."""
  table = _head(cfg, "backbone.embeddings.weight", "backbone.norm_f.weight")
  for i in range(cfg.num_layers):
    p, o = f"backbone.layers.{i}.", f"layer_{i}/"
    table += [_same(p + "norm.weight", o + "mixer_norm/scale"), *_mamba2_mixer(cfg, p + "mixer.", o + "mamba2/", i)]
  return table


def _gate_up(hf: str, ours: tuple[str, str]) -> Entry:
  """A fused Linear [2F, D] = [gate | up] (Granite's shared MLP input_linear) as gate and up kernels [D, F]."""

  def load(w):
    F = w.shape[0] // 2
    return linear(w[:F]), linear(w[F:])

  return Entry((hf,), ours, load, lambda gate, up: (linear(np.concatenate([gate, up], -1)),))


def _gqa(cfg: config_lib.ModelConfig, a: str, g: str) -> list[Entry]:
  """q/k/v/o projections under HF prefix `a` (Llama and Granite name them alike) as our GQA kernels under `g`."""
  H, K, Dh, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden_size
  return [
    _kernel(a + "q_proj.weight", g + "w_q/kernel", (D, H, Dh)),
    _kernel(a + "k_proj.weight", g + "w_k/kernel", (D, K, Dh)),
    _kernel(a + "v_proj.weight", g + "w_v/kernel", (D, K, Dh)),
    _kernel(a + "o_proj.weight", g + "w_o/kernel", (H, Dh, D), n_in=2),
  ]


def _norms(p: str, o: str) -> list[Entry]:
  return [
    _same(p + "input_layernorm.weight", o + "mixer_norm/scale"),
    _same(p + "post_attention_layernorm.weight", o + "ffn_norm/scale"),
  ]


def llama_table(cfg: config_lib.ModelConfig) -> list[Entry]:
  """The transformers Llama name table: GQA with RoPE and a SwiGLU MLP in every layer."""
  table = _head(cfg, "model.embed_tokens.weight", "model.norm.weight")
  for i in range(cfg.num_layers):
    p, o = f"model.layers.{i}.", f"layer_{i}/"
    table += [*_norms(p, o), *_gqa(cfg, p + "self_attn.", o + "gqa/"), *_swiglu(p + "mlp.", o + "mlp/")]
  return table


def granite_table(cfg: config_lib.ModelConfig, new_names: Callable[[str], bool] = lambda prefix: False) -> list[Entry]:
  """The Granite 4.0-H (granitemoehybrid) name table: Mamba2 or GQA mixers, then Granite's MoE (router, fused
  experts) plus its shared MLP, or the shared MLP alone as the dense FFN. `new_names(prefix)`: the MoE layer
  under `prefix` uses the names transformers 5 gives it in memory (router.weight, experts.gate_up_proj,
  experts.down_proj) rather than the checkpoints' (router.layer.weight, input_linear, output_linear)."""
  table = _head(cfg, "model.embed_tokens.weight", "model.norm.weight")
  for i in range(cfg.num_layers):
    p, o = f"model.layers.{i}.", f"layer_{i}/"
    table += _norms(p, o)
    if cfg.mixer_kind(i) == "mamba2":
      table += _mamba2_mixer(cfg, p + "mamba.", o + "mamba2/", i)
    else:
      table += _gqa(cfg, p + "self_attn.", o + "gqa/")
    s = p + "shared_mlp."
    if cfg.ffn_kind(i) == "mlp":
      table += [
        _gate_up(s + "input_linear.weight", (o + "mlp/gate/kernel", o + "mlp/up/kernel")),
        _kernel(s + "output_linear.weight", o + "mlp/down/kernel"),
      ]
      continue
    f, e = p + "block_sparse_moe.", o + "moe/"
    new = new_names(f)
    table += [
      _kernel(f + ("router.weight" if new else "router.layer.weight"), e + "router/kernel"),
      _fused_experts(
        f + ("experts.gate_up_proj" if new else "input_linear.weight"),
        f + ("experts.down_proj" if new else "output_linear.weight"),
        (e + "w_gate", e + "w_up", e + "w_down"),
      ),
    ]
    if cfg.shared_width:
      table += [
        _gate_up(s + "input_linear.weight", (e + "shared_gate/kernel", e + "shared_up/kernel")),
        _kernel(s + "output_linear.weight", e + "shared_down/kernel"),
      ]
  return table


def _misfit(entry: Entry, t: Tensors, e: Exception) -> DataError:
  shapes = sorted({t.shape(name) for name in entry.hf})
  names = entry.hf[0] if len(entry.hf) == 1 else f"{entry.hf[0]} .. {entry.hf[-1]}"
  return DataError(
    f"{t.path}: tensor {names} has shape {', '.join(map(str, shapes))}, which does not fit "
    f"{entry.ours[0]} ({cli.one_line(e)})"
  )


def _load_entry(entry: Entry, t: Tensors, dtype: np.dtype) -> tuple[np.ndarray, ...]:
  """The entry's parameters in `dtype`. Its tensors are read when needed and stay in the checkpoint's
  dtype until converted; a stack is filled in place, one tensor at a time."""
  try:
    if entry.stacked:
      out = None
      for j, name in enumerate(entry.hf):
        w = t.take(name)
        w = w.T if entry.transpose else w
        if out is None:
          out = np.empty((len(entry.hf), *w.shape), dtype)
        out[j] = w
        del w
      return (out,)
    values = entry.load(*(t.take(name) for name in entry.hf))
    return tuple(np.asarray(v, dtype) for v in values)
  except UserError:
    raise
  except ValueError as e:  # a reshape or stack that the tensors' shapes do not fit
    raise _misfit(entry, t, e) from e


def _unflatten(flat: dict) -> dict:
  params = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return params


def _load(table: list[Entry], t: Tensors, dtype="float32") -> dict:
  """Our parameter tree (in `dtype`) from the tensors the table names, one entry at a time."""
  dt = dtype_of(dtype)
  flat = {}
  for entry in table:
    flat.update(zip(entry.ours, _load_entry(entry, t, dt), strict=True))
  return _unflatten(flat)


def _read_slice(entry: Entry, t: Tensors, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
  """ours[0][index] in `dtype` for an entry with `transpose` set, reading only that slice of the tensors."""
  if entry.stacked:
    first, index = index[0], index[1:]
    names = entry.hf[first]
  else:
    names = entry.hf[:1]
  part = lambda name: t.take_slice(name, index[::-1]).T if entry.transpose else t.take_slice(name, index)
  if not entry.stacked:
    return np.asarray(part(names[0]), dtype)
  out = None
  for j, name in enumerate(names):
    w = part(name)
    if out is None:
      out = np.empty((len(names), *w.shape), dtype)
    out[j] = w
  return out


def _dump(table: list[Entry], params: dict) -> Iterator[tuple[str, np.ndarray]]:
  """The HF tensors the table names, entry by entry, from our parameter tree (numpy or jax arrays)."""
  flat = pytree.flatten(params)
  for entry in table:
    values = entry.save(*(np.asarray(flat[name], np.float32) for name in entry.ours))
    yield from zip(entry.hf, values, strict=True)


# ------------------------------------------------------------------------------------------ config.json


class _Key(NamedTuple):
  """A config.json key with a model key of the same meaning; `default` None: required."""

  hf: str
  ours: str
  default: Any = None
  cast: Callable[[Any], Any] = lambda v: v


_DEEPSEEK_KEYS = (
  _Key("vocab_size", "vocab_size"),
  _Key("hidden_size", "hidden_size"),
  _Key("num_hidden_layers", "num_layers"),
  _Key("num_attention_heads", "num_heads"),
  _Key("qk_nope_head_dim", "head_dim"),
  _Key("v_head_dim", "v_head_dim"),
  _Key("qk_rope_head_dim", "d_rope"),
  _Key("kv_lora_rank", "kv_latent_dim"),
  _Key("intermediate_size", "intermediate_size"),
  _Key("max_position_embeddings", "max_seq_len", 2048),
  _Key("rms_norm_eps", "rms_norm_eps", 1e-6, float),
  _Key("tie_word_embeddings", "tie_embeddings", False, bool),
)
_MAMBA2_KEYS = (
  _Key("vocab_size", "vocab_size"),
  _Key("hidden_size", "hidden_size"),
  _Key("num_hidden_layers", "num_layers"),
  _Key("num_heads", "mamba2_num_heads"),
  _Key("head_dim", "mamba2_head_dim"),
  _Key("state_size", "mamba2_state_size"),
  _Key("n_groups", "mamba2_n_groups"),
  _Key("conv_kernel", "mamba2_conv_kernel"),
  _Key("expand", "mamba2_expand", 2),
  _Key("chunk_size", "mamba2_chunk_size", 256),
  _Key("layer_norm_epsilon", "rms_norm_eps", 1e-5, float),
  _Key("tie_word_embeddings", "tie_embeddings", False, bool),
)


# transformers' GraniteMoeHybridConfig defaults, which a config.json without these keys gets there.
_GRANITE_KEYS = (
  _Key("vocab_size", "vocab_size"),
  _Key("hidden_size", "hidden_size"),
  _Key("num_hidden_layers", "num_layers"),
  _Key("num_attention_heads", "num_heads"),
  _Key("max_position_embeddings", "max_seq_len", 2048),
  _Key("rms_norm_eps", "rms_norm_eps", 1e-6, float),
  _Key("tie_word_embeddings", "tie_embeddings", False, bool),
  _Key("embedding_multiplier", "embedding_multiplier", 1.0, float),
  _Key("residual_multiplier", "residual_multiplier", 1.0, float),
  _Key("logits_scaling", "logits_scaling", 1.0, float),
  _Key("mamba_n_heads", "mamba2_num_heads", 128),
  _Key("mamba_d_state", "mamba2_state_size", 256),
  _Key("mamba_n_groups", "mamba2_n_groups", 1),
  _Key("mamba_d_conv", "mamba2_conv_kernel", 4),
  _Key("mamba_expand", "mamba2_expand", 2),
  _Key("mamba_chunk_size", "mamba2_chunk_size", 256),
)
_GRANITE_MAMBA = ("mamba", "linear_attention")  # layer types: the checkpoints' names and transformers 5's
_GRANITE_ATTENTION = ("attention", "full_attention")


def _refuse(key: str, why: str) -> None:
  raise ConfigError(f"hf.{key}", why)


def _require(hf: dict, keys: tuple[_Key, ...], where: str) -> None:
  for k in keys:
    if k.default is None and k.hf not in hf:
      _refuse(k.hf, f"is required and missing from {where}")


def _read_keys(hf: dict, keys: tuple[_Key, ...], m: ml_collections.ConfigDict) -> None:
  for k in keys:
    m[k.ours] = k.cast(hf.get(k.hf, k.default))


def _write_keys(cfg: config_lib.ModelConfig, keys: tuple[_Key, ...]) -> dict:
  return {k.hf: getattr(cfg, k.ours) for k in keys}


def _check_deepseek(hf: dict) -> None:
  """Raises ConfigError for every feature our model would only approximate."""
  model_type = hf.get("model_type")
  rope = hf.get("rope_parameters") or {}
  if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
    _refuse("rope_scaling", "RoPE scaling (YaRN or any rope_type other than default) is not supported")
  if hf.get("attention_bias"):
    _refuse("attention_bias", "attention biases are not supported")
  if hf.get("mlp_bias"):
    _refuse("mlp_bias", "MLP biases are not supported")
  if hf.get("hidden_act", "silu") != "silu":
    _refuse("hidden_act", f"only silu is supported, got {hf['hidden_act']!r}")
  if float(hf.get("rms_norm_eps", 1e-6)) != 1e-6:
    _refuse("rms_norm_eps", "must be 1e-6: the q/kv latent norms use 1e-6 in the reference, ours share the model's eps")
  heads = hf["num_attention_heads"]
  if hf.get("num_key_value_heads") not in (None, heads):
    _refuse("num_key_value_heads", f"must equal num_attention_heads={heads} for MLA")
  if not hf.get("kv_lora_rank"):
    _refuse("kv_lora_rank", "must be positive (MLA)")
  layers = hf["num_hidden_layers"]
  experts = hf.get("n_routed_experts") or 0
  first_dense = min(hf.get("first_k_dense_replace") or 0, layers)
  if not experts or first_dense >= layers:
    return
  if hf.get("moe_layer_freq", 1) != 1:
    _refuse("moe_layer_freq", "must be 1 (every layer after first_k_dense_replace is MoE)")
  if model_type == "deepseek_v3":
    _check_v3_routing(hf, experts)
    return
  if hf.get("scoring_func", "softmax") != "softmax":
    _refuse("scoring_func", f"deepseek_v2 routing is softmax, got {hf['scoring_func']!r}")
  if hf.get("topk_method", "greedy") != "greedy":
    _refuse(
      "topk_method",
      f"only greedy top-k is supported for deepseek_v2 (group_limited_greedy scores a group by its best "
      f"expert, the router here by its best two), got {hf['topk_method']!r}",
    )
  if not float(_v2_scaling(hf)) > 0:
    _refuse("routed_scaling_factor", f"must be positive, got {hf['routed_scaling_factor']!r}")
  if hf.get("norm_topk_prob"):
    _refuse(
      "norm_topk_prob",
      "top-k renormalisation is not supported for deepseek_v2 (transformers' router "
      "ignores it while the reference code applies it)",
    )


# transformers' DeepseekV3Config defaults, which a config.json without these keys gets there.
_V3_ROUTING = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True}


def _v2_scaling(hf: dict):
  value = hf.get("routed_scaling_factor")
  return 1.0 if value is None else value


def _v3(hf: dict, key: str):
  value = hf.get(key)
  return _V3_ROUTING[key] if value is None else value


def _check_v3_routing(hf: dict, experts: int) -> None:
  """DeepSeek-V3 routing: sigmoid scores, noaux_tc top-k over the topk_group best of n_group groups."""
  if hf.get("scoring_func", "sigmoid") != "sigmoid":
    _refuse("scoring_func", f"deepseek_v3 routing is sigmoid, got {hf['scoring_func']!r}")
  if hf.get("topk_method", "noaux_tc") != "noaux_tc":
    _refuse("topk_method", f"only noaux_tc top-k is supported for deepseek_v3, got {hf['topk_method']!r}")
  n_group, topk_group, k = _v3(hf, "n_group"), _v3(hf, "topk_group"), hf["num_experts_per_tok"]
  if n_group < 1 or experts % n_group:
    _refuse("n_group", f"must be positive and divide n_routed_experts={experts}, got {n_group}")
  if not 1 <= topk_group <= n_group:
    _refuse("topk_group", f"must satisfy 1 <= topk_group <= n_group={n_group}, got {topk_group}")
  if k > topk_group * experts // n_group:
    _refuse("num_experts_per_tok", f"{k} exceeds the experts of topk_group={topk_group} of n_group={n_group} groups")
  if not float(_v3(hf, "routed_scaling_factor")) > 0:
    _refuse("routed_scaling_factor", f"must be positive, got {hf['routed_scaling_factor']!r}")


def deepseek_config(hf: dict) -> ml_collections.ConfigDict:
  """Our config for a DeepSeek-V2/V3 config.json (after `_check_deepseek`)."""
  c = config_lib.default_config()
  m = c.model
  _read_keys(hf, _DEEPSEEK_KEYS, m)
  layers = hf["num_hidden_layers"]
  experts = hf.get("n_routed_experts") or 0
  first_dense = min(hf.get("first_k_dense_replace") or 0, layers)
  rope = hf.get("rope_parameters") or {}
  m.name = hf.get("model_type", "deepseek")
  m.q_latent_dim = hf.get("q_lora_rank") or 0
  m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if experts and first_dense < layers:
    m.num_experts = experts
    m.experts_per_tok = hf["num_experts_per_tok"]
    m.moe_intermediate_size = hf["moe_intermediate_size"]
    m.first_dense_layers = first_dense
    m.num_shared_experts = hf.get("n_shared_experts") or 0
    m.shared_expert_enabled = m.num_shared_experts > 0
    if not m.shared_expert_enabled:
      m.num_shared_experts = 1  # unused; keeps validation's positivity rule
    m.norm_topk_prob = False
    m.routed_scaling_factor = float(_v2_scaling(hf))
    if m.name == "deepseek_v3":
      m.router = "sigmoid"
      m.n_group, m.topk_group = int(_v3(hf, "n_group")), int(_v3(hf, "topk_group"))
      m.routed_scaling_factor = float(_v3(hf, "routed_scaling_factor"))
      m.norm_topk_prob = bool(_v3(hf, "norm_topk_prob"))
  c.trainer.seq_len = min(c.trainer.seq_len, m.max_seq_len)
  return c


def _deepseek_hf_config(cfg: config_lib.ModelConfig) -> dict:
  """The config.json of an MLA model (after `to_hf`'s refusals): deepseek_v3 for the sigmoid router's MoE,
  else deepseek_v2."""
  if cfg.num_experts > 0 and cfg.router == "sigmoid":
    return {
      **_deepseek_v2_hf_config(cfg),
      "architectures": ["DeepseekV3ForCausalLM"],
      "model_type": "deepseek_v3",
      "rope_interleave": True,
      "scoring_func": "sigmoid",
      "topk_method": "noaux_tc",
      "n_group": cfg.n_group,
      "topk_group": cfg.topk_group,
      "routed_scaling_factor": cfg.routed_scaling_factor,
      "norm_topk_prob": cfg.norm_topk_prob,
    }
  return _deepseek_v2_hf_config(cfg)


def _deepseek_v2_hf_config(cfg: config_lib.ModelConfig) -> dict:
  moe = cfg.num_experts > 0
  return {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    **_write_keys(cfg, _DEEPSEEK_KEYS),
    "num_key_value_heads": cfg.num_heads,
    "q_lora_rank": cfg.q_latent_dim or None,
    "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
    "n_routed_experts": cfg.num_experts if moe else 0,
    "num_experts_per_tok": cfg.experts_per_tok if moe else None,
    "moe_intermediate_size": cfg.moe_intermediate_size,
    "first_k_dense_replace": cfg.first_dense_layers if moe else cfg.num_layers,
    "n_shared_experts": cfg.num_shared_experts if cfg.shared_expert_enabled else 0,
    "topk_method": "greedy",
    "n_group": None,
    "topk_group": None,
    "routed_scaling_factor": cfg.routed_scaling_factor,
    "norm_topk_prob": False,
  }


def _json_float(value) -> float:
  """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
  return float(value["__float__"] if isinstance(value, dict) else value)


def _check_mamba2(hf: dict) -> None:
  if not hf.get("use_conv_bias", True):
    _refuse("use_conv_bias", "must be true (the mixer here always has a conv bias)")
  if hf.get("use_bias", False):
    _refuse("use_bias", "in_proj/out_proj biases are not supported")
  if hf.get("hidden_act", "silu") != "silu":
    _refuse("hidden_act", f"only silu is supported, got {hf['hidden_act']!r}")
  limit = [_json_float(v) for v in hf.get("time_step_limit") or (0.0, float("inf"))]
  if limit != [0.0, float("inf")]:
    _refuse("time_step_limit", f"must be (0, inf), got {limit}")
  if hf["hidden_size"] * hf.get("expand", 2) != hf["num_heads"] * hf["head_dim"]:
    _refuse("head_dim", "num_heads * head_dim must equal hidden_size * expand")


def mamba2_config(hf: dict) -> ml_collections.ConfigDict:
  """Our config for a transformers Mamba2 config.json (after `_check_mamba2`)."""
  c = config_lib.default_config()
  m = c.model
  _read_keys(hf, _MAMBA2_KEYS, m)
  m.name = "mamba2"
  m.num_heads = 1  # attention settings are unused: every layer is Mamba2
  m.layer_pattern = "M" * m.num_layers
  m.max_seq_len = 2048
  c.trainer.seq_len = min(c.trainer.seq_len, m.max_seq_len)
  return c


def _mamba2_hf_config(cfg: config_lib.ModelConfig) -> dict:
  return {
    "architectures": ["Mamba2ForCausalLM"],
    "model_type": "mamba2",
    **_write_keys(cfg, _MAMBA2_KEYS),
    "use_bias": False,
    "use_conv_bias": True,
    "hidden_act": "silu",
    "residual_in_fp32": True,
    "torch_dtype": "float32",
    "time_step_min": cfg.mamba2_dt_min,
    "time_step_max": cfg.mamba2_dt_max,
    "time_step_floor": cfg.mamba2_dt_init_floor,
  }


def _granite_layer_types(hf: dict) -> list:
  types = hf.get("layer_types") or hf.get("layers_block_type")
  return list(types) if types is not None else ["mamba"] * hf["num_hidden_layers"]


def _granite_rope(hf: dict) -> dict | None:
  """The rope parameters of a Granite config.json, None without RoPE."""
  if hf.get("position_embedding_type") != "rope":
    return None
  return {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_parameters") or {})}


def _check_granite(hf: dict) -> None:
  """Raises ConfigError for every Granite 4.0-H feature our model would only approximate."""
  for key, value in (("hidden_act", "silu"), ("attention_bias", False), ("mamba_conv_bias", True)):
    if hf.get(key, value) != value:
      _refuse(key, f"must be {value!r}, got {hf[key]!r}")
  if hf.get("mamba_proj_bias"):
    _refuse("mamba_proj_bias", "in_proj/out_proj biases are not supported")
  limit = [_json_float(v) for v in hf.get("time_step_limit") or (0.0, float("inf"))]
  if limit != [0.0, float("inf")]:
    _refuse("time_step_limit", f"must be (0, inf), got {limit}")
  if hf.get("position_embedding_type") not in (None, "rope", "nope"):
    _refuse("position_embedding_type", f"must be 'rope' or none, got {hf['position_embedding_type']!r}")
  rope = _granite_rope(hf)
  if rope is not None and (hf.get("rope_scaling") or rope.get("rope_type", "default") != "default"):
    _refuse("rope_parameters", "RoPE scaling (any rope_type other than default) is not supported")
  layers, heads, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
  if hf.get("head_dim") not in (None, hidden // heads):
    _refuse("head_dim", f"must be hidden_size // num_attention_heads = {hidden // heads}")
  types = _granite_layer_types(hf)
  bad = sorted(set(types) - set(_GRANITE_MAMBA + _GRANITE_ATTENTION))
  if bad or len(types) != layers:
    _refuse("layer_types", f"must list num_hidden_layers={layers} of 'mamba' / 'attention', got {types}")
  if not float(hf.get("attention_multiplier", 1.0)) > 0:
    _refuse("attention_multiplier", f"must be positive, got {hf['attention_multiplier']!r}")
  d_head = hf.get("mamba_d_head", "auto")
  expand, mamba_heads = hf.get("mamba_expand", 2), hf.get("mamba_n_heads", 128)
  if any(t in _GRANITE_MAMBA for t in types) and d_head != "auto" and d_head * mamba_heads != hidden * expand:
    _refuse("mamba_d_head", "mamba_n_heads * mamba_d_head must equal hidden_size * mamba_expand")
  experts, k = hf.get("num_local_experts", 8) or 0, hf.get("num_experts_per_tok", 2)
  if experts and not 2 <= k <= experts:
    _refuse(
      "num_experts_per_tok",
      f"must satisfy 2 <= num_experts_per_tok <= num_local_experts={experts}, got {k} (with one expert Granite's "
      "weight is softmax over one logit = 1, where the router here keeps the routing probability)",
    )
  if not experts and not hf.get("shared_intermediate_size", 1024) > 0:
    _refuse("shared_intermediate_size", "must be positive without experts (the shared MLP is the whole FFN)")


def granite_config(hf: dict) -> ml_collections.ConfigDict:
  """Our config for a Granite 4.0-H (granitemoehybrid) config.json (after `_check_granite`)."""
  c = config_lib.default_config()
  m = c.model
  _read_keys(hf, _GRANITE_KEYS, m)
  m.name = _GRANITE
  m.kv_heads = hf.get("num_key_value_heads") or m.num_heads
  d_head = hf.get("mamba_d_head", "auto")
  m.mamba2_head_dim = 0 if d_head == "auto" else d_head
  m.layer_pattern = "".join("M" if t in _GRANITE_MAMBA else "A" for t in _granite_layer_types(hf))
  if "M" not in m.layer_pattern:
    m.mamba2_num_heads = 0  # unused without Mamba2 layers
  m.mamba_ffn = "M" in m.layer_pattern  # every Granite layer has an FFN
  m.attention_multiplier = float(hf.get("attention_multiplier", 1.0))
  rope = _granite_rope(hf)
  m.use_rope = rope is not None
  if rope is not None:
    m.rope_theta = float(rope["rope_theta"])
  experts, shared = hf.get("num_local_experts", 8) or 0, hf.get("shared_intermediate_size", 1024)
  m.intermediate_size = shared  # the dense FFN is the shared MLP
  if experts:
    m.num_experts = experts
    m.experts_per_tok = hf.get("num_experts_per_tok", 2)
    m.moe_intermediate_size = hf.get("intermediate_size", 11008)
    m.shared_expert_enabled = shared > 0
    m.shared_intermediate_size = shared
    m.norm_topk_prob = True  # softmax over the top-k logits = softmax, top-k, renormalised
  c.trainer.seq_len = min(c.trainer.seq_len, m.max_seq_len)
  return c


def _check_granite_export(cfg: config_lib.ModelConfig) -> None:
  """Refuses the models that granitemoehybrid cannot express (after to_hf has ruled out MLA)."""
  if "mamba" in cfg.layer_kinds and not cfg.mamba_ffn:
    raise ConfigError("model.mamba_ffn", "granitemoehybrid gives every layer an FFN (or write all-Mamba2 as mamba2)")
  if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
    raise ConfigError("model.head_dim", "granitemoehybrid's head width is hidden_size // num_heads")
  if cfg.use_rope and "attention" in cfg.layer_kinds and cfg.rope_dim != cfg.head_dim:
    raise ConfigError("model.rope_dim", "granitemoehybrid rotates the whole head (transformers ignores a partial one)")
  if not cfg.use_moe:
    return
  rules = (
    ("first_dense_layers", cfg.first_dense_layers == 0, "must be 0: every granitemoehybrid layer is MoE"),
    ("router", cfg.router == "softmax", "granitemoehybrid routes by softmax"),
    ("norm_topk_prob", cfg.norm_topk_prob, "granitemoehybrid renormalises the top-k weights"),
    ("experts_per_tok", cfg.experts_per_tok > 1, "must be > 1 (one renormalised weight is 1 in granitemoehybrid)"),
    ("n_group", cfg.n_group == 1, "granitemoehybrid has no group-limited routing"),
    ("routed_scaling_factor", cfg.routed_scaling_factor == 1.0, "granitemoehybrid does not scale routed weights"),
    ("aux_free_bias", not cfg.aux_free_bias, "granitemoehybrid has no selection bias"),
    ("shared_expert_enabled", cfg.shared_width > 0, "granitemoehybrid's MoE layers have a shared MLP"),
  )
  for key, ok, why in rules:
    if not ok:
      raise ConfigError(f"model.{key}", why)


def _granite_hf_config(cfg: config_lib.ModelConfig) -> dict:
  moe, mamba = cfg.use_moe, "mamba" in cfg.layer_kinds
  return {
    "architectures": ["GraniteMoeHybridForCausalLM"],
    "model_type": _GRANITE,
    **_write_keys(cfg, _GRANITE_KEYS),
    "num_key_value_heads": cfg.kv_heads,
    "mamba_n_heads": cfg.mamba2_num_heads if mamba else 1,  # any valid value without Mamba2 layers
    "mamba_d_head": cfg.mamba2_head_dim if mamba else "auto",
    "layer_types": list(cfg.layer_kinds),
    "attention_multiplier": cfg.attention_multiplier or cfg.head_dim**-0.5,
    "position_embedding_type": "rope" if cfg.use_rope else None,
    "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    "num_local_experts": cfg.num_experts if moe else 0,
    "num_experts_per_tok": cfg.experts_per_tok,
    "intermediate_size": cfg.moe_intermediate_size if moe else cfg.intermediate_size,
    "shared_intermediate_size": cfg.shared_width if moe else cfg.intermediate_size,
    "hidden_act": "silu",
    "attention_bias": False,
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
    "torch_dtype": "float32",
  }


_LLAMA_KEYS = (
  _Key("vocab_size", "vocab_size"),
  _Key("hidden_size", "hidden_size"),
  _Key("intermediate_size", "intermediate_size"),
  _Key("num_hidden_layers", "num_layers"),
  _Key("num_attention_heads", "num_heads"),
  _Key("max_position_embeddings", "max_seq_len", 2048),
  _Key("rms_norm_eps", "rms_norm_eps", 1e-6, float),
  _Key("tie_word_embeddings", "tie_embeddings", False, bool),
)


def _check_llama(hf: dict) -> None:
  for key, value in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if hf.get(key, value) != value:
      _refuse(key, f"must be {value!r}, got {hf[key]!r}")
  rope = hf.get("rope_parameters") or {}
  if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
    _refuse("rope_parameters", "RoPE scaling (llama3, YaRN or any rope_type other than default) is not supported")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    _refuse("partial_rotary_factor", "Llama rotates whole heads")


def llama_config(hf: dict) -> ml_collections.ConfigDict:
  """Our config for a transformers Llama config.json (after `_check_llama`)."""
  c = config_lib.default_config()
  m = c.model
  _read_keys(hf, _LLAMA_KEYS, m)
  m.name = _LLAMA
  m.kv_heads = hf.get("num_key_value_heads") or m.num_heads
  m.head_dim = 0 if hf.get("head_dim") in (None, m.hidden_size // m.num_heads) else hf["head_dim"]
  m.rope_theta = float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))
  c.trainer.seq_len = min(c.trainer.seq_len, m.max_seq_len)
  return c


def _llama_can_hold(cfg: config_lib.ModelConfig) -> bool:
  """Every layer GQA with RoPE over whole heads and a SwiGLU MLP, with the default scales."""
  defaults = {k.name: k.default for k in config_lib.MODEL}
  plain = all(getattr(cfg, k) == defaults[k] for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling"))
  return (
    plain
    and all(cfg.mixer_kind(i) == "gqa" and cfg.ffn_kind(i) == "mlp" for i in range(cfg.num_layers))
    and cfg.use_rope
    and cfg.rope_dim == cfg.head_dim
    and cfg.attention_multiplier in (0.0, cfg.head_dim**-0.5)
  )


def _llama_hf_config(cfg: config_lib.ModelConfig) -> dict:
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": _LLAMA,
    **_write_keys(cfg, _LLAMA_KEYS),
    "num_key_value_heads": cfg.kv_heads,
    "head_dim": cfg.head_dim,
    "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
  }


def _check_plain(cfg: config_lib.ModelConfig, model_type: str) -> None:
  """deepseek and mamba2 have none of Granite's multipliers, a RoPE-less attention or a free shared width."""
  defaults = {k.name: k.default for k in config_lib.MODEL}
  keys = ("embedding_multiplier", "residual_multiplier", "logits_scaling")
  if "attention" in cfg.layer_kinds:
    keys += ("attention_multiplier", "use_rope")
  for key in keys:
    if getattr(cfg, key) != defaults[key]:
      raise ConfigError(f"model.{key}", f"must be {defaults[key]} for {model_type} (granitemoehybrid has it)")
  if cfg.use_moe and cfg.shared_width != cfg.num_shared_experts * cfg.moe_intermediate_size:
    raise ConfigError(
      "model.shared_intermediate_size", f"{model_type} shared experts are num_shared_experts * moe_intermediate_size"
    )


# ------------------------------------------------------------------------------------------ the two directions


class _Source(NamedTuple):
  """A Hugging Face folder opened for reading: our config, the tensors (read when taken) and the name table."""

  config: ml_collections.ConfigDict
  cfg: config_lib.ModelConfig
  t: Tensors
  table: list[Entry]
  skip: tuple[str, ...]  # prefixes of tensors that have no place in the model by design


def _open(path: str) -> _Source:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise DataError(f"{path}: no config.json")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{config_path}: not readable JSON ({cli.one_line(e)})") from e
  model_type = hf.get("model_type") if isinstance(hf, dict) else None
  if model_type not in _SUPPORTED:
    raise UserError(f"{config_path}: model_type {model_type!r} is not supported (supported: {', '.join(_SUPPORTED)})")
  mamba2 = model_type == "mamba2"
  if model_type == _LLAMA:
    _require(hf, _LLAMA_KEYS, config_path)
    _check_llama(hf)
    config = llama_config(hf)
  elif model_type == _GRANITE:
    _require(hf, _GRANITE_KEYS, config_path)
    _check_granite(hf)
    config = granite_config(hf)
  elif mamba2:
    _require(hf, _MAMBA2_KEYS, config_path)
    _check_mamba2(hf)
    config = mamba2_config(hf)
  else:
    _require(hf, _DEEPSEEK_KEYS, config_path)
    _check_deepseek(hf)
    config = deepseek_config(hf)
  config_lib.validate(config)
  cfg = config_lib.ModelConfig.from_config(config)
  t = Tensors(Folder(path), path)
  if model_type == _LLAMA:
    table, skip = llama_table(cfg), ()
  elif model_type == _GRANITE:
    table, skip = granite_table(cfg, new_names=lambda prefix: t.has(prefix + "experts.gate_up_proj")), ()
  elif mamba2:
    table, skip = mamba2_table(cfg), ()
  else:
    interleaved = model_type == "deepseek_v2" or hf.get("rope_interleave", True)
    table = deepseek_table(cfg, interleaved, fused=lambda prefix: t.has(prefix + "experts.gate_up_proj"))
    skip = tuple(f"model.layers.{i}." for i in range(cfg.num_layers, cfg.num_layers + _MTP_LAYERS))
  return _Source(config, cfg, t, table, skip)


def _check_rest(src: _Source) -> None:
  """A tied model's lm_head.weight (when present) equals the embeddings; every tensor was used."""
  t = src.t
  if src.cfg.tie_embeddings and t.has("lm_head.weight"):
    (embedding,) = [e.hf[0] for e in src.table if e.ours == ("embedding",)]
    if not np.array_equal(t.take("lm_head.weight"), t.take(embedding)):
      raise DataError(f"{t.path}: tie_word_embeddings is set but lm_head.weight differs from the embeddings")
  t.check_all_used(src.skip)


def from_hf(path: str, dtype="float32"):
  """(config, params) from a Hugging Face folder (config.json + safetensors), params as numpy arrays in
  `dtype` (float32, what training uses, or bfloat16). Reads one tensor at a time in the checkpoint's dtype:
  the host holds one file's mapping and the parameter being assembled, besides the params."""
  src = _open(path)
  params = _load(src.table, src.t, dtype)
  _check_rest(src)
  pytree.check_shapes(
    params, abstract_variables(src.cfg)[0], path, DataError, found_in="the safetensors", wanted_in="config.json"
  )
  return src.config, params


def load_sharded(path: str, mesh: jax.sharding.Mesh, rules: tuple | None = None, dtype="float32"):
  """(config, params) like `from_hf`, each parameter a jax.Array placed straight into its sharded layout on
  `mesh` (logical axis `rules`; default: the converted config's). Parameters with a plain layout (norms,
  embeddings, untransformed kernels, stacked experts) read only the slices this process's devices hold;
  reshaped or permuted ones (query, kv and output projections, fused experts, Mamba2's in_proj and conv)
  are assembled whole once per process and sliced."""
  from mla_jax import sharding  # noqa: PLC0415  (sharding imports the model stack)

  src = _open(path)
  abstract, specs, _ = abstract_variables(src.cfg)
  rules = sharding.axis_rules(src.config) if rules is None else rules
  shardings = pytree.flatten(sharding.param_shardings(specs, mesh, rules))
  wanted = {name: tuple(x.shape) for name, x in pytree.flatten(abstract).items()}
  dt = dtype_of(dtype)
  t, flat = src.t, {}

  def place(name, shape, read):
    if shape != wanted[name]:
      raise DataError(f"{path}: {name} has shape {shape} in the safetensors but {wanted[name]} in config.json")
    done = {}  # devices that hold the same slice share one read

    def callback(index):
      key = tuple((s.start, s.stop, s.step) for s in index)
      if key not in done:
        done[key] = read(index)
      return done[key]

    flat[name] = jax.make_array_from_callback(shape, shardings[name], callback)

  for entry in src.table:
    if entry.transpose is None:
      for name, value in zip(entry.ours, _load_entry(entry, t, dt), strict=True):
        place(name, value.shape, lambda index, value=value: value[index])
      continue
    (name,) = entry.ours
    shapes = {t.shape(n) for n in entry.hf}
    if len(shapes) > 1:
      raise _misfit(entry, t, ValueError("the stacked tensors differ in shape"))
    (shape,) = shapes
    shape = (len(entry.hf),) * entry.stacked + (shape[::-1] if entry.transpose else shape)
    place(name, shape, lambda index, entry=entry: _read_slice(entry, t, index, dt))
  _check_rest(src)
  return src.config, _unflatten(flat)


def to_hf(config, params, path: str, dtype="float32", max_shard_bytes: int = 5 * 10**9) -> None:
  """Writes config.json and the weights in `dtype` (float32 or bfloat16): deepseek_v2 for MLA models
  (deepseek_v3 with the sigmoid router), mamba2 for Mamba2 ones, llama for the GQA models it can hold,
  granitemoehybrid for the other GQA and hybrid ones. Above `max_shard_bytes` the weights are split
  into model-0000k-of-0000n.safetensors files with model.safetensors.index.json (`safetensors_io.write_folder`)."""
  config_lib.validate(config)
  cfg = config_lib.ModelConfig.from_config(config)
  if all(kind == "mamba" for kind in cfg.layer_kinds) and not cfg.mamba_ffn:
    _check_plain(cfg, "mamba2")
    table, hf = mamba2_table(cfg), _mamba2_hf_config(cfg)
  elif _llama_can_hold(cfg):
    table, hf = llama_table(cfg), _llama_hf_config(cfg)
  elif not cfg.use_mla or "attention" not in cfg.layer_kinds:
    _check_granite_export(cfg)
    table, hf = granite_table(cfg), _granite_hf_config(cfg)
  else:
    if "mamba" in cfg.layer_kinds:
      raise UserError(
        "to_hf writes MLA models as DeepSeek (every layer MLA), Mamba2 and GQA models as mamba2 or granitemoehybrid"
      )
    _check_plain(cfg, "deepseek_v2")
    if not cfg.mla_latent_norms or cfg.mla_q_rope_from_input:
      key = "mla_latent_norms" if not cfg.mla_latent_norms else "mla_q_rope_from_input"
      raise ConfigError(f"model.{key}", "the seed trainer's MLA variant has no deepseek_v2 equivalent")
    if cfg.aux_free_bias:
      raise ConfigError(
        "model.aux_free_bias",
        "the running selection bias is in the 'moe_bias' collection, which to_hf does not receive (with the "
        "sigmoid router, add it to each layer's moe/score_bias param and set aux_free_bias=False)",
      )
    if cfg.num_experts > 0 and cfg.router == "softmax":
      if cfg.norm_topk_prob and cfg.experts_per_tok > 1:
        raise ConfigError("model.norm_topk_prob", "deepseek_v2 in transformers does not renormalise the top-k weights")
      if cfg.n_group > 1:
        raise ConfigError("model.n_group", "deepseek_v2's group-limited routing scores a group by its best expert")
    table, hf = deepseek_table(cfg), _deepseek_hf_config(cfg)
  hf["torch_dtype"] = dtype_of(dtype).name
  pytree.check_shapes(
    params, abstract_variables(cfg)[0], "to_hf", DataError, found_in="the params", wanted_in="the config"
  )
  write_folder(_dump(table, params), path, dtype, max_shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
    f.write("\n")
