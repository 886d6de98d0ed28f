"""Configuration: the key tables, defaults, validation with clear errors, and the frozen `ModelConfig`.

Every experiment is an `ml_collections.ConfigDict` with the sections `model`, `trainer`, `data`, `sample`,
`mesh` and the tuple `logical_axis_rules`. Each section is one table of `Key` rows below: name, default (which
fixes the type), doc, allowed values or bound, and for model keys how the `ModelConfig` field resolves a 0
sentinel. `default_config()`, the choice and bound checks of `validate()` and the fields of `ModelConfig` (with
`from_config`) all come from these tables, so a new key is one row. `validate()` rejects unknown keys (naming
the nearest valid one) and every broken rule (naming the key and the rule) before anything is compiled. Key
names follow the seed trainer's YAML where it has one.

The layer types are chosen in one place: `mla_enabled`, `q_latent_enabled`, `moe_enabled` and
`model_layer_kinds`, for a model section or a `ModelConfig` alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import warnings
from collections.abc import Callable
from typing import Any

import ml_collections

from mla_jax.errors import ConfigError

# Logical axis names used by the layers, mapped to mesh axes (MaxText style). A logical name may map
# to one mesh axis, a tuple of mesh axes, or None (replicated). The batch is split over data, fsdp and
# expert: outside the MoE layers the expert axis is one more data-parallel axis (mla_jax.sharding).
DEFAULT_LOGICAL_AXIS_RULES = (
  ("batch", ("data", "fsdp", "expert")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("q_latent", "fsdp"),  # MLA up-projections [latent, heads, head_dim]: split under FSDP too
  ("kv_latent", "fsdp"),  # (a kernel whose `embed` axis already took fsdp keeps its latent whole)
  ("mlp", "tensor"),
  ("expert", "expert"),
  ("expert_mlp", "tensor"),
  ("ssm_heads", "tensor"),
  ("ssm_inner", "tensor"),
  ("ssm_state", None),
  ("conv", None),
  ("norm", None),
  ("layers", None),
  ("cache_batch", ("data", "fsdp", "expert")),
  ("cache_sequence", None),
  ("cache_heads", "tensor"),
  ("cache_kv", None),
)


# Concrete rematerialisation policies, ordered by how much they recompute (least first).
REMAT_POLICIES = ("none", "dots", "full")


@dataclasses.dataclass(frozen=True)
class Key:
  """One row of a section table."""

  name: str
  default: Any  # also fixes the key's type
  doc: str = ""
  choices: tuple = ()  # the allowed values
  bound: str = ""  # ">0" or ">=0"
  ignored: str = ""  # a seed-trainer key that does nothing here: why (validate warns when it is set)
  # Model rows only:
  field: bool = True  # also a ModelConfig field of the same name
  config: bool = True  # False: a ModelConfig field that `resolve` computes, not a config key
  resolve: Callable[[Any], Any] | None = None  # model section -> the field's value (default: the value)
  type: Any = None  # the field's type, where the default does not show it

  @property
  def field_type(self):
    return self.type or type(self.default)


# Resolvers of the 0 sentinels (they read a model section with every key present).
def _head_dim(m) -> int:
  return m.head_dim or m.hidden_size // m.num_heads


def _intermediate(m) -> int:
  return m.intermediate_size or 4 * m.hidden_size


def _mamba2_head_dim(m) -> int:
  heads = m.mamba2_num_heads
  return m.mamba2_head_dim or (m.hidden_size * m.mamba2_expand // heads if heads else 0)


MODEL = (
  Key("name", "model", "shown in summaries", field=False),
  Key("vocab_size", 0, "0: the tokenizer's vocabulary size (from_config's vocab_size)", bound=">=0"),
  Key("hidden_size", 384, bound=">0"),
  Key("num_layers", 8, bound=">0"),
  Key("num_heads", 6, bound=">0"),
  Key(
    "kv_heads",
    0,
    "GQA key/value heads; 0: num_heads (MHA). 1 is MQA.",
    bound=">=0",
    resolve=lambda m: m.kv_heads or m.num_heads,
  ),
  Key("head_dim", 0, "0: hidden_size // num_heads", bound=">=0", resolve=_head_dim),
  Key(
    "v_head_dim", 0, "MLA value head width; 0: head_dim", bound=">=0", resolve=lambda m: m.v_head_dim or _head_dim(m)
  ),
  Key("intermediate_size", 0, "SwiGLU hidden width; 0: 4 * hidden_size", bound=">=0", resolve=_intermediate),
  Key("max_seq_len", 2048, bound=">0"),
  Key("rope_theta", 10000.0, bound=">0"),
  Key("use_rope", True, "rotary position embedding in GQA attention (MLA always rotates its d_rope part)"),
  Key(
    "rope_dim",
    0,
    "GQA RoPE rotates the first rope_dim dims of each q/k head, the rest pass through (partial rotary); 0: head_dim",
    bound=">=0",
    resolve=lambda m: m.rope_dim or _head_dim(m),
  ),
  Key("rms_norm_eps", 1e-6, bound=">0"),
  Key("tie_embeddings", False),
  # muP-style multipliers (Granite); the defaults change nothing.
  Key("embedding_multiplier", 1.0, "scales the embeddings after the lookup", bound=">0"),
  Key("residual_multiplier", 1.0, "scales every mixer and FFN output before it joins the residual", bound=">0"),
  Key("attention_multiplier", 0.0, "softmax scale of the attention scores; 0: 1/sqrt(q.k width)", bound=">=0"),
  Key("logits_scaling", 1.0, "the logits are divided by it", bound=">0"),
  Key("dtype", "float32", "compute dtype", choices=("float32", "bfloat16")),
  Key(
    "attention_impl",
    "auto",
    "flash: the Pallas TPU kernel",
    choices=("auto", "reference", "xla", "cudnn", "chunked", "flash"),
  ),
  Key("attention_chunk_size", 512, "query block of the chunked form (chunked; auto on CPU beyond 1024 tokens)"),
  # MLA (DeepSeek-V2): non-Mamba layers are MLA when kv_latent_dim > 0, else GQA (mla_enabled).
  Key("kv_latent_dim", 0, bound=">=0"),
  Key("q_latent_dim", 0, "0: no query compression", bound=">=0"),
  Key("d_rope", 0, bound=">=0"),
  Key("mla_latent_norms", True, "RMSNorm on c_q and c_kv (DeepSeek-V2); False: none (the seed trainer's MLA)"),
  Key("mla_q_rope_from_input", False, "q_rope = x W_QR instead of c_q W_UQ (the seed trainer's MLA)"),
  # Mixture-of-Experts: the FFN of attention layers is MoE when num_experts > 0, else SwiGLU (moe_enabled).
  Key("num_experts", 0, bound=">=0"),
  Key("experts_per_tok", 2),
  Key("shared_expert_enabled", True),
  Key(
    "num_shared_experts",
    1,
    "0 in ModelConfig when shared_expert_enabled is off",
    bound=">=0",
    resolve=lambda m: m.num_shared_experts if m.shared_expert_enabled else 0,
  ),
  Key(
    "moe_intermediate_size",
    0,
    "0: intermediate_size",
    bound=">=0",
    resolve=lambda m: m.moe_intermediate_size or _intermediate(m),
  ),
  Key(
    "shared_intermediate_size",
    0,
    "width of the fused shared-expert SwiGLU (ModelConfig.shared_width); 0: num_shared_experts * moe_intermediate_size",
    bound=">=0",
  ),
  Key("first_dense_layers", 0, bound=">=0"),
  Key("norm_topk_prob", True),
  Key(
    "router",
    "softmax",
    "expert scores: softmax (DeepSeek-V2) | sigmoid (DeepSeek-V3; its selection bias is the score_bias param)",
    choices=("softmax", "sigmoid"),
  ),
  Key("n_group", 1, "group-limited routing: the experts form n_group groups (1: no groups)", bound=">0"),
  Key("topk_group", 1, "with n_group > 1, each token's experts come from its topk_group best groups", bound=">0"),
  Key("routed_scaling_factor", 1.0, "multiplies the routed experts' weights", bound=">0"),
  Key("moe_dispatch", "ragged", choices=("ragged", "capacity", "dense")),
  Key("capacity_factor", 1.25),
  Key("aux_free_bias", False, "DeepSeek-V3 auxiliary-loss-free balancing bias"),
  Key("aux_free_bias_rate", 1e-3),
  # Mamba2 (SSD) mixers and hybrid stacks.
  Key("mamba_layers", (), "0-based indices of Mamba2 layers", field=False),
  Key("layer_pattern", "", "alternative to mamba_layers: e.g. MMMAMMMA (M = Mamba2, A = attention)", field=False),
  Key(
    "layer_kinds",
    None,
    "'mamba' or 'attention' for each layer",
    config=False,
    type=tuple[str, ...],
    resolve=lambda m: model_layer_kinds(m),
  ),
  Key("mamba2_num_heads", 0, bound=">=0"),
  Key("mamba2_head_dim", 0, "0: hidden_size * expand // num_heads", bound=">=0", resolve=_mamba2_head_dim),
  Key("mamba2_state_size", 64),
  Key("mamba2_chunk_size", 64),
  Key("mamba2_n_groups", 1),
  Key("mamba2_conv_kernel", 4),
  Key("mamba2_expand", 2),
  Key("mamba2_dt_min", 0.001),
  Key("mamba2_dt_max", 0.1),
  Key("mamba2_dt_init_floor", 1e-4),
  Key("mamba_ffn", False, "Mamba2 layers also get an FFN (the Mamba2 paper: no)"),
  Key("scan_layers", False, "scan over a repeating super-block so compile time stays flat with depth"),
  # Rematerialisation per block (and per scanned super-block): none | dots (keep matmul outputs, recompute
  # attention scores and elementwise work) | full (keep only each block's input) | auto (training compiles
  # the policies in REMAT_POLICIES order and takes the first that fits the device; elsewhere none).
  Key("remat", "auto", choices=("auto",) + REMAT_POLICIES),
)

TRAINER = (
  Key("learning_rate", 3e-4, bound=">0"),
  Key("min_lr_ratio", 0.1, "cosine decays to learning_rate * min_lr_ratio"),
  Key("warmup_steps", 100, bound=">=0"),
  Key("batch_size", 8, "global batch (sequences per optimizer step, all micro-batches together)", bound=">0"),
  Key("gradient_accumulation", 1, bound=">0"),
  Key("seq_len", 256, "training sequence length; 0: model.max_seq_len", bound=">=0"),
  Key("max_steps", 1000, bound=">0"),
  Key("num_epochs", 0, "0: max_steps decides; >0: this many passes over the data (capped by max_steps)", bound=">=0"),
  Key("weight_decay", 0.1, bound=">=0"),
  Key("beta1", 0.9),
  Key("beta2", 0.95),
  Key("eps", 1e-8),
  Key("max_grad_norm", 1.0, "clip by global norm; 0 disables", bound=">=0"),
  Key("decay_norms", False),
  Key("decay_embeddings", False),
  Key("z_loss_alpha", 0.0, "output-logit z-loss", bound=">=0"),
  # Cross-entropy in chunks of this many tokens of the global (micro-)batch, [batch, chunk / batch, vocab]
  # logits at a time, recomputed in backward: no [batch, seq_len, vocab] float32 tensor is kept. 0, or a
  # batch of at most one chunk: the plain loss. Raise it with the data-parallel width on accelerators.
  Key("loss_chunk_size", 1024, bound=">=0"),
  Key("load_balance_alpha", 0.01, bound=">=0"),
  Key("router_z_loss_alpha", 0.0, bound=">=0"),
  Key("log_interval", 10, bound=">0"),
  Key("eval_interval", 200, bound=">0"),
  Key("eval_steps", 8, bound=">=0"),
  Key("save_interval", 500, bound=">0"),
  Key("max_checkpoints", 3, "newest checkpoints kept; 0 keeps all", bound=">=0"),
  Key("keep_best", False, "also keep the checkpoint with the lowest validation loss (evaluates at each save)"),
  Key("tensorboard", True, "also write TensorBoard event files into the workdir (tensorboard --logdir runs/)"),
  Key("profile_steps", "", "FIRST,LAST: a jax.profiler trace of those train steps into <workdir>/profile"),
  Key("max_skipped_steps", 10, "stop after this many consecutive non-finite updates", bound=">0"),
  Key("seed", 0),
  Key("checkpoint_dir", "", ignored="use --workdir"),
  Key("target_device", "", ignored="JAX uses its default backend; set JAX_PLATFORMS to choose"),
  Key("group_size", 0, ignored="GRPO is not part of mla_jax"),
  Key("beta_kl", 0.0, ignored="GRPO is not part of mla_jax"),
)

DATA = (
  Key(
    "corpus",
    "stdlib",
    "stdlib (the interpreter's own sources) | a text file or folder | a token file | "
    "a .jsonl/.jsonl.gz/.parquet file or a folder of them (text is tokenized once, then cached)",
  ),
  Key("text_field", "text", "the field of each JSON line / the parquet column that holds a document's text"),
  Key("format", "auto", choices=("auto", "text", "uint32", "uint16")),
  Key("tokenizer", "byte", "byte | path to a Hugging Face tokenizer.json"),
  Key("val_fraction", 0.05, "held-out share of the files (stdlib/text folder) or of the tokens (one file, records)"),
  Key(
    "packing",
    "stream",
    "stream: rows cut from one token stream | documents: whole documents packed "
    "into rows, attention, Mamba2 state and loss kept within each document",
    choices=("stream", "documents"),
  ),
  Key("max_bytes", 24_000_000, "cap on the UTF-8 bytes read from the stdlib corpus or a folder of files"),
)

SAMPLE = (
  Key("prompt", "def "),
  Key("max_new_tokens", 200),
  Key("temperature", 0.8),
  Key("top_k", 40),
)

# Device mesh (mla_jax.sharding). The product is the device count; one axis may be -1 (the rest).
# Presets: data parallel  mesh.data=-1 (default) | FSDP  mesh.fsdp=-1 mesh.data=1
#          FSDP + tensor  mesh.fsdp=-1 mesh.data=1 mesh.tensor=2 | expert parallel  mesh.expert=4
MESH = (
  Key("data", -1, "pure data parallelism: params replicated, batch split"),
  Key("fsdp", 1, "params and optimizer state split on `embed`, batch split (ZeRO-3)"),
  Key("tensor", 1, "heads, mlp, vocab and Mamba2 heads split (num_heads etc. must divide)"),
  Key("expert", 1, "MoE experts split (num_experts must divide); batch split outside the experts"),
)

SECTIONS = {"model": MODEL, "trainer": TRAINER, "data": DATA, "sample": SAMPLE, "mesh": MESH}


def _config_keys() -> list[tuple[str, Key]]:
  """("section.key", row) for every config key, in table order."""
  return [(f"{section}.{k.name}", k) for section, keys in SECTIONS.items() for k in keys if k.config]


def default_config() -> ml_collections.ConfigDict:
  """Every key that exists, with its default. Config files start from this and change what they need."""
  c = ml_collections.ConfigDict()
  for section, keys in SECTIONS.items():
    c[section] = ml_collections.ConfigDict({k.name: k.default for k in keys if k.config})
  c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
  return c


# ------------------------------------------------------------------------------------ mode switches
# Each reads only keys that ModelConfig keeps as they are, so a model section and its ModelConfig agree.


def mla_enabled(m) -> bool:
  """Attention layers are MLA (DeepSeek-V2) when kv_latent_dim > 0, else GQA."""
  return m.kv_latent_dim > 0


def q_latent_enabled(m) -> bool:
  """MLA queries come from a q_latent_dim latent when it is > 0, else straight from the input."""
  return mla_enabled(m) and m.q_latent_dim > 0


def moe_enabled(m) -> bool:
  """The FFN of attention layers (from first_dense_layers on) is MoE when num_experts > 0, else SwiGLU."""
  return m.num_experts > 0


def layer_kinds(num_layers: int, mamba_layers, layer_pattern: str) -> tuple[str, ...]:
  """'mamba' or 'attention' for each layer, from mamba_layers (seed) or layer_pattern."""
  if layer_pattern:
    return tuple("mamba" if ch == "M" else "attention" for ch in layer_pattern)
  mamba = set(mamba_layers)
  return tuple("mamba" if i in mamba else "attention" for i in range(num_layers))


def model_layer_kinds(m) -> tuple[str, ...]:
  """layer_kinds of a model section or a ModelConfig."""
  if isinstance(m, ModelConfig):
    return m.layer_kinds
  return layer_kinds(m.num_layers, tuple(m.mamba_layers or ()), m.layer_pattern)


# ------------------------------------------------------------------------------------- validation


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key in cfg:
    value = cfg[key]
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def check_known_keys(cfg: ml_collections.ConfigDict) -> None:
  """Unknown keys are rejected with the nearest valid name (the seed trainer silently ignored them)."""
  known = _flatten(default_config())
  for key in _flatten(cfg):
    error = unknown_key_error(key, known)
    if error:
      raise error


def unknown_key_error(key: str, known: dict | None = None) -> ConfigError | None:
  """None for a key of default_config(), else the ConfigError naming the nearest valid key or section."""
  known = known or _flatten(default_config())
  if key in known:
    return None
  known_sections = {k.split(".")[0] for k in known}
  if key.split(".")[0] not in known_sections and "." in key:
    close = difflib.get_close_matches(key.split(".")[0], sorted(known_sections), n=1)
  else:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
  hint = f"; did you mean {close[0]}?" if close else ""
  return ConfigError(key, f"unknown key{hint}")


def _positive(flat: dict, *keys: str) -> None:
  for key in keys:
    if not flat[key] > 0:
      raise ConfigError(key, f"must be positive, got {flat[key]!r}")


def _non_negative(flat: dict, *keys: str) -> None:
  for key in keys:
    if flat[key] < 0:
      raise ConfigError(key, f"must be >= 0, got {flat[key]!r}")


def profile_window(text: str) -> tuple[int, int] | None:
  """trainer.profile_steps '10,15' -> (10, 15) (1-based train steps, inclusive); '' -> None."""
  if not str(text).strip():
    return None
  parts = [p.strip() for p in str(text).split(",")]
  if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
    raise ConfigError(
      "trainer.profile_steps",
      f"must be 'FIRST,LAST' train steps with 1 <= FIRST <= LAST (e.g. 10,15), or empty for none; got {text!r}",
    )
  return int(parts[0]), int(parts[1])


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks every rule; raises ConfigError naming the key and the rule. Warns where nothing breaks."""
  check_known_keys(cfg)
  f = _flatten(cfg)
  rows = _config_keys()
  for key, k in rows:
    if k.choices and f[key] not in k.choices:
      raise ConfigError(key, f"must be one of {', '.join(k.choices)}; got {f[key]!r}")
  for key, k in rows:
    if k.ignored and f[key] != k.default:
      warnings.warn(f"{key} is accepted for seed-config compatibility but ignored: {k.ignored}", stacklevel=2)
  _positive(f, *[key for key, k in rows if k.bound == ">0"])
  _non_negative(f, *[key for key, k in rows if k.bound == ">=0"])
  profile_window(cfg.trainer.profile_steps)

  m = cfg.model
  mc = ModelConfig.from_config(cfg, vocab_size=1)  # every sentinel resolved (safe once the bounds hold)
  hidden, heads = m.hidden_size, m.num_heads
  if m.head_dim == 0 and hidden % heads:
    raise ConfigError(
      "model.hidden_size", f"{hidden} is not divisible by model.num_heads={heads} (or set model.head_dim)"
    )
  if heads % mc.kv_heads:  # refused in MLA models too, where kv_heads is unused: it is wrong for any model
    raise ConfigError("model.kv_heads", f"model.num_heads={heads} is not divisible by kv_heads={mc.kv_heads}")
  if mc.use_mla:
    if m.d_rope <= 0:
      raise ConfigError("model.d_rope", "must be positive when kv_latent_dim is set (MLA)")
    for key in ("kv_latent_dim", "q_latent_dim"):
      if m[key] >= hidden:
        warnings.warn(f"model.{key}={m[key]} is not below hidden_size={hidden}: no compression happens", stacklevel=2)
  if m.mla_q_rope_from_input and not mc.use_q_latent:
    raise ConfigError(
      "model.mla_q_rope_from_input",
      "needs MLA with query compression (kv_latent_dim and "
      "q_latent_dim > 0); without q_latent_dim the whole query already comes from the input",
    )
  if m.d_rope % 2:
    raise ConfigError("model.d_rope", f"must be even (RoPE rotates pairs), got {m.d_rope}")
  if not m.use_rope and mc.use_mla and "attention" in mc.layer_kinds:
    raise ConfigError("model.use_rope", "must be true for MLA, which always rotates its d_rope part")
  if m.rope_dim:
    if mc.use_mla:
      raise ConfigError("model.rope_dim", "is a GQA key; MLA rotates its own part of each head: set model.d_rope")
    if not m.use_rope:
      raise ConfigError("model.rope_dim", "is set but model.use_rope is false (nothing is rotated)")
    if m.rope_dim % 2:
      raise ConfigError("model.rope_dim", f"must be even (RoPE rotates pairs), got {m.rope_dim}")
    if m.rope_dim > mc.head_dim:
      raise ConfigError("model.rope_dim", f"must not exceed head_dim={mc.head_dim}, got {m.rope_dim}")
  if not mc.use_mla and m.use_rope and not m.rope_dim and mc.head_dim % 2:
    if m.head_dim:
      raise ConfigError("model.head_dim", "must be even (RoPE rotates pairs)")
    raise ConfigError("model.num_heads", f"hidden_size / num_heads = {mc.head_dim} must be even for RoPE")
  if mc.use_moe:
    if not 1 <= m.experts_per_tok <= m.num_experts:
      raise ConfigError(
        "model.experts_per_tok",
        f"must satisfy 1 <= experts_per_tok <= num_experts={m.num_experts}, got {m.experts_per_tok}",
      )
    _positive(f, "model.capacity_factor")
    if m.num_experts % m.n_group:
      raise ConfigError("model.n_group", f"must divide num_experts={m.num_experts}, got {m.n_group}")
    if not 1 <= m.topk_group <= m.n_group:
      raise ConfigError("model.topk_group", f"must satisfy 1 <= topk_group <= n_group={m.n_group}, got {m.topk_group}")
    eligible = m.topk_group * m.num_experts // m.n_group
    if m.experts_per_tok > eligible:
      raise ConfigError(
        "model.experts_per_tok",
        f"{m.experts_per_tok} exceeds the {eligible} experts of topk_group={m.topk_group} groups of "
        f"num_experts / n_group = {m.num_experts // m.n_group}",
      )
    if m.shared_expert_enabled:
      _positive(f, "model.num_shared_experts")
  if m.scan_layers and m.aux_free_bias:
    raise ConfigError(
      "model.scan_layers", "cannot be combined with model.aux_free_bias (the bias update addresses unscanned layers)"
    )
  if m.first_dense_layers > m.num_layers:
    raise ConfigError("model.first_dense_layers", "must not exceed num_layers")

  _validate_layers(f, mc)
  _warn_unused_keys(m, mc)

  t = cfg.trainer
  if t.batch_size % t.gradient_accumulation:
    raise ConfigError(
      "trainer.batch_size",
      f"{t.batch_size} is not divisible by trainer.gradient_accumulation={t.gradient_accumulation}",
    )
  if seq_len(cfg) > m.max_seq_len:
    raise ConfigError("trainer.seq_len", f"{seq_len(cfg)} exceeds model.max_seq_len={m.max_seq_len}")
  if not 0.0 <= t.min_lr_ratio <= 1.0:
    raise ConfigError("trainer.min_lr_ratio", "must be in [0, 1]")
  if not 0.0 <= cfg.data.val_fraction < 1.0:
    raise ConfigError("data.val_fraction", "must be in [0, 1)")
  if not cfg.data.text_field:
    raise ConfigError("data.text_field", "must name the JSON field / parquet column that holds the text")
  for k in MESH:
    size = cfg.mesh[k.name]
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{k.name}", f"must be a positive size or -1 (the remaining devices), got {size}")


def _warn_unused_keys(m, mc: ModelConfig) -> None:
  """Warns (once per message) about attention keys that are set but that this model's layers never read."""
  if "attention" not in mc.layer_kinds:
    return
  if mc.use_mla:
    if m.kv_heads:
      warnings.warn(
        f"model.kv_heads={m.kv_heads} is ignored by MLA layers (their keys and values come from the "
        "kv_latent_dim latent); it only sets the GQA row that generate --report_cache compares against",
        stacklevel=2,
      )
    return
  for key in ("v_head_dim", "q_latent_dim", "d_rope"):
    if m[key]:
      warnings.warn(
        f"model.{key}={m[key]} is ignored: it is an MLA key and model.kv_latent_dim is 0, so "
        "attention layers are GQA (set model.kv_latent_dim for MLA)",
        stacklevel=2,
      )


def _validate_layers(f: dict, mc: ModelConfig) -> None:
  num_layers = f["model.num_layers"]
  pattern, mamba_layers = f["model.layer_pattern"], tuple(f["model.mamba_layers"] or ())
  if pattern and mamba_layers:
    raise ConfigError("model.layer_pattern", "set either layer_pattern or mamba_layers, not both")
  if pattern:
    bad = sorted(set(pattern) - {"M", "A"})
    if bad:
      raise ConfigError("model.layer_pattern", f"may contain only 'M' (Mamba2) and 'A' (attention), got {bad}")
    if len(pattern) != num_layers:
      raise ConfigError("model.layer_pattern", f"has {len(pattern)} letters but model.num_layers={num_layers}")
  for i in mamba_layers:
    if not isinstance(i, int) or not 0 <= i < num_layers:
      raise ConfigError("model.mamba_layers", f"index {i!r} is outside 0..{num_layers - 1}")
  if len(set(mamba_layers)) != len(mamba_layers):
    raise ConfigError("model.mamba_layers", "has repeated indices")
  if "mamba" not in mc.layer_kinds:
    return
  heads = f["model.mamba2_num_heads"]
  if heads <= 0:
    raise ConfigError("model.mamba2_num_heads", "must be positive when Mamba2 layers are present")
  _positive(
    f,
    "model.mamba2_state_size",
    "model.mamba2_chunk_size",
    "model.mamba2_n_groups",
    "model.mamba2_conv_kernel",
    "model.mamba2_expand",
    "model.mamba2_dt_min",
    "model.mamba2_dt_max",
  )
  inner, head_dim = mc.mamba2_inner, f["model.mamba2_head_dim"]
  if head_dim == 0 and inner % heads:
    raise ConfigError(
      "model.mamba2_num_heads", f"hidden_size * mamba2_expand = {inner} is not divisible by mamba2_num_heads={heads}"
    )
  if head_dim and inner != heads * head_dim:
    raise ConfigError(
      "model.mamba2_head_dim",
      f"hidden_size * mamba2_expand = {inner} must equal "
      f"mamba2_num_heads * mamba2_head_dim = {heads} * {head_dim} = {heads * head_dim}",
    )
  if heads % f["model.mamba2_n_groups"]:
    raise ConfigError(
      "model.mamba2_n_groups",
      f"mamba2_num_heads={heads} is not divisible by mamba2_n_groups={f['model.mamba2_n_groups']}",
    )
  if f["model.mamba2_dt_min"] > f["model.mamba2_dt_max"]:
    raise ConfigError("model.mamba2_dt_min", "must not exceed mamba2_dt_max")


def warn_unused_vocab(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> None:
  """Warns when model.vocab_size is far above the tokenizer's vocabulary: rows no token ever selects."""
  m = cfg.model
  unused = m.vocab_size - tokenizer_vocab
  if m.vocab_size and m.vocab_size > 2 * tokenizer_vocab:
    wasted = unused * m.hidden_size * (1 if m.tie_embeddings else 2)
    rows = "embedding" if m.tie_embeddings else "embedding and output"
    warnings.warn(
      f"model.vocab_size={m.vocab_size:,} is far above the tokenizer's vocabulary "
      f"({tokenizer_vocab:,}): {unused:,} {rows} rows are never used, {wasted:,} parameters "
      "wasted; model.vocab_size=0 follows the tokenizer",
      stacklevel=2,
    )


# ------------------------------------------------------------------------------------ ModelConfig


def _fields_from_model_table(cls):
  """Makes `cls` a frozen dataclass with one field per MODEL row that is a ModelConfig field, in table order."""
  cls.__annotations__ = {k.name: k.field_type for k in MODEL if k.field}
  return dataclasses.dataclass(frozen=True)(cls)


def _as_field_type(k: Key, value):
  return k.field_type(value) if k.field_type in (int, float, bool, str) else value


@_fields_from_model_table
class ModelConfig:
  """The resolved, hashable model description that the Flax modules read: one field per MODEL row with
  field=True, every 0 sentinel resolved."""

  @property
  def use_mla(self) -> bool:
    return mla_enabled(self)

  @property
  def use_q_latent(self) -> bool:
    return q_latent_enabled(self)

  @property
  def use_moe(self) -> bool:
    return moe_enabled(self)

  @property
  def attention_kind(self) -> str:
    return "mla" if self.use_mla else "gqa"

  @property
  def shared_width(self) -> int:
    """Width of the fused shared-expert SwiGLU of MoE layers; 0 without shared experts."""
    if not (self.shared_expert_enabled and self.num_shared_experts):
      return 0
    return self.shared_intermediate_size or self.num_shared_experts * self.moe_intermediate_size

  @property
  def mamba2_inner(self) -> int:
    return self.hidden_size * self.mamba2_expand

  def ffn_kind(self, layer: int) -> str | None:
    """'moe', 'mlp' or None (a Mamba2 layer without FFN) for layer `layer`."""
    if self.layer_kinds[layer] == "mamba" and not self.mamba_ffn:
      return None
    if self.use_moe and layer >= self.first_dense_layers:
      return "moe"
    return "mlp"

  def mixer_kind(self, layer: int) -> str:
    """'mamba2', 'mla' or 'gqa' for layer `layer`."""
    return "mamba2" if self.layer_kinds[layer] == "mamba" else self.attention_kind

  @property
  def scan_period(self) -> int:
    """The shortest repeating super-block: layers i and i + period always have the same kinds."""
    kinds = [(self.mixer_kind(i), self.ffn_kind(i)) for i in range(self.num_layers)]
    for period in range(1, self.num_layers + 1):
      if self.num_layers % period == 0 and all(kinds[i] == kinds[i % period] for i in range(self.num_layers)):
        return period
    return self.num_layers

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """From a config (or its model section); keys it lacks, saved before they existed, take their defaults."""
    m = cfg.model if "model" in cfg else cfg
    raw = types.SimpleNamespace(**{k.name: m.get(k.name, k.default) for k in MODEL if k.config})
    raw.vocab_size = raw.vocab_size or vocab_size
    if not raw.vocab_size:
      raise ConfigError("model.vocab_size", "is 0 and no tokenizer gave a vocabulary size")
    return cls(
      **{k.name: _as_field_type(k, k.resolve(raw) if k.resolve else getattr(raw, k.name)) for k in MODEL if k.field}
    )


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A config saved as JSON (a checkpoint's record), on top of today's defaults: keys added since it was
  saved take their defaults, and JSON lists become the tuples the defaults use."""
  config = default_config()
  as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, list) else v
  for section, values in saved.items():
    if isinstance(values, dict) and isinstance(config.get(section), ml_collections.ConfigDict):
      for key, value in values.items():
        config[section][key] = as_tuple(value) if isinstance(config[section].get(key), tuple) else value
    else:
      config[section] = as_tuple(values)
  return config


def seq_len(cfg: ml_collections.ConfigDict) -> int:
  return cfg.trainer.seq_len or cfg.model.max_seq_len


def summary(cfg: ml_collections.ConfigDict, model: ModelConfig) -> str:
  """One line: the model's layers (run-length coded), widths and the learning-rate schedule."""
  kinds = [
    model.mixer_kind(i) + (f"+{model.ffn_kind(i)}" if model.ffn_kind(i) else "") for i in range(model.num_layers)
  ]
  runs = []
  for kind in kinds:
    if runs and runs[-1][0] == kind:
      runs[-1][1] += 1
    else:
      runs.append([kind, 1])
  layers = ", ".join(f"{kind} x{n}" if n > 1 else kind for kind, n in runs)
  t = cfg.trainer
  return (
    f"{cfg.model.name}: {model.num_layers} layers ({layers}), hidden {model.hidden_size}, "
    f"{model.num_heads} heads, vocab {model.vocab_size}; learning rate {t.learning_rate:g}, "
    f"warmup {t.warmup_steps} steps"
  )
