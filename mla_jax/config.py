"""Configuration: defaults, validation with clear errors, and the frozen `ModelConfig` the layers read.

Every experiment is an `ml_collections.ConfigDict` with the sections `model`, `trainer`, `data`, `mesh`,
`sample` and the tuple `logical_axis_rules`. `default_config()` lists every key that exists; `validate()`
rejects unknown keys (naming the nearest valid one) and every broken rule (naming the key and the rule)
before anything is compiled. Key names follow the seed trainer's YAML where it has one.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from typing import Any, Optional

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


def default_config() -> ml_collections.ConfigDict:
  """Every key that exists, with its default. Config files start from this and change what they need."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.name = "model"
  m.vocab_size = 0  # 0: the tokenizer's vocabulary size
  m.hidden_size = 384
  m.num_layers = 8
  m.num_heads = 6
  m.kv_heads = 0  # GQA key/value heads; 0: num_heads (MHA). 1 is MQA.
  m.head_dim = 0  # 0: hidden_size // num_heads
  m.v_head_dim = 0  # MLA value head width; 0: head_dim
  m.intermediate_size = 0  # SwiGLU hidden width; 0: 4 * hidden_size
  m.max_seq_len = 2048
  m.rope_theta = 10000.0
  m.rms_norm_eps = 1e-6
  m.tie_embeddings = False
  m.dtype = "float32"  # compute dtype: float32 | bfloat16
  m.attention_impl = "auto"  # auto | reference | xla | cudnn | chunked | flash (Pallas TPU kernel)
  m.attention_chunk_size = 512  # query block of the chunked form (chunked; auto on CPU beyond 1024 tokens)
  # MLA (DeepSeek-V2): non-Mamba layers are MLA when kv_latent_dim > 0, else GQA.
  m.kv_latent_dim = 0
  m.q_latent_dim = 0  # 0: no query compression
  m.d_rope = 0
  m.mla_latent_norms = True  # RMSNorm on c_q and c_kv (DeepSeek-V2); False: none (the seed trainer's MLA)
  m.mla_q_rope_from_input = False  # q_rope = x W_QR instead of c_q W_UQ (the seed trainer's MLA)
  # Mixture-of-Experts: the FFN of attention layers is MoE when num_experts > 0, else SwiGLU.
  m.num_experts = 0
  m.experts_per_tok = 2
  m.shared_expert_enabled = True
  m.num_shared_experts = 1
  m.moe_intermediate_size = 0  # 0: intermediate_size
  m.first_dense_layers = 0
  m.norm_topk_prob = True
  m.moe_dispatch = "ragged"  # ragged | capacity | dense
  m.capacity_factor = 1.25
  m.aux_free_bias = False  # DeepSeek-V3 auxiliary-loss-free balancing bias
  m.aux_free_bias_rate = 1e-3
  # Mamba2 (SSD) mixers and hybrid stacks.
  m.mamba_layers = ()  # 0-based indices of Mamba2 layers
  m.layer_pattern = ""  # alternative to mamba_layers: e.g. "MMMAMMMA" (M = Mamba2, A = attention)
  m.mamba2_num_heads = 0
  m.mamba2_head_dim = 0  # 0: hidden_size * expand // num_heads
  m.mamba2_state_size = 64
  m.mamba2_chunk_size = 64
  m.mamba2_n_groups = 1
  m.mamba2_conv_kernel = 4
  m.mamba2_expand = 2
  m.mamba2_dt_min = 0.001
  m.mamba2_dt_max = 0.1
  m.mamba2_dt_init_floor = 1e-4
  m.mamba_ffn = False  # Mamba2 layers also get an FFN (the Mamba2 paper: no)
  m.scan_layers = False  # scan over a repeating super-block so compile time stays flat with depth
  # Rematerialisation per block (and per scanned super-block): none | dots (keep matmul outputs, recompute
  # attention scores and elementwise work) | full (keep only each block's input) | auto (training compiles
  # the policies in REMAT_POLICIES order and takes the first that fits the device; elsewhere none).
  m.remat = "auto"

  c.trainer = t = ml_collections.ConfigDict()
  t.learning_rate = 3e-4
  t.min_lr_ratio = 0.1  # cosine decays to learning_rate * min_lr_ratio
  t.warmup_steps = 100
  t.batch_size = 8  # global batch (sequences per optimizer step, all micro-batches together)
  t.gradient_accumulation = 1
  t.seq_len = 256  # training sequence length; 0: model.max_seq_len
  t.max_steps = 1000
  t.num_epochs = 0  # 0: max_steps decides; >0: train this many passes over the data (capped by max_steps)
  t.weight_decay = 0.1
  t.beta1 = 0.9
  t.beta2 = 0.95
  t.eps = 1e-8
  t.max_grad_norm = 1.0  # clip by global norm; 0 disables
  t.decay_norms = False
  t.decay_embeddings = False
  t.z_loss_alpha = 0.0  # output-logit z-loss
  # Cross-entropy in chunks of this many tokens of the global (micro-)batch, [batch, chunk / batch, vocab]
  # logits at a time, recomputed in backward: no [batch, seq_len, vocab] float32 tensor is kept. 0, or a
  # batch of at most one chunk: the plain loss. Raise it with the data-parallel width on accelerators.
  t.loss_chunk_size = 1024
  t.load_balance_alpha = 0.01
  t.router_z_loss_alpha = 0.0
  t.log_interval = 10
  t.eval_interval = 200
  t.eval_steps = 8
  t.save_interval = 500
  t.max_checkpoints = 3  # newest checkpoints kept; 0 keeps all
  t.keep_best = False  # also keep the checkpoint with the lowest validation loss (evaluates at each save)
  t.max_skipped_steps = 10  # stop after this many consecutive non-finite updates
  t.seed = 0
  # Seed-trainer keys that are read but do nothing here (a warning says so when they are set).
  t.checkpoint_dir = ""
  t.target_device = ""
  t.group_size = 0
  t.beta_kl = 0.0

  c.data = d = ml_collections.ConfigDict()
  d.corpus = "stdlib"  # stdlib (the interpreter's own sources) | a text file or folder | a token file
  d.format = "auto"  # auto | text | uint32 | uint16
  d.tokenizer = "byte"  # byte | path to a Hugging Face tokenizer.json
  d.val_fraction = 0.05  # held-out share of the files (stdlib/folder) or of the tokens (one file)
  d.max_bytes = 24_000_000  # cap on the UTF-8 bytes read from the stdlib corpus or a folder of files

  c.sample = s = ml_collections.ConfigDict()
  s.prompt = "def "
  s.max_new_tokens = 200
  s.temperature = 0.8
  s.top_k = 40

  # Device mesh (mla_jax.sharding). The product is the device count; one axis may be -1 (the rest).
  # Presets: data parallel  mesh.data=-1 (default) | FSDP  mesh.fsdp=-1 mesh.data=1
  #          FSDP + tensor  mesh.fsdp=-1 mesh.data=1 mesh.tensor=2 | expert parallel  mesh.expert=4
  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # pure data parallelism: params replicated, batch split
  ms.fsdp = 1  # params and optimizer state split on `embed`, batch split (ZeRO-3)
  ms.tensor = 1  # heads, mlp, vocab and Mamba2 heads split (num_heads etc. must divide)
  ms.expert = 1  # MoE experts split (num_experts must divide); batch split outside the experts

  c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
  return c


# Keys that the seed trainer has but that mean nothing here.
_SEED_NOOP_KEYS = {
    "trainer.checkpoint_dir": "use --workdir",
    "trainer.target_device": "JAX uses its default backend; set JAX_PLATFORMS to choose",
    "trainer.group_size": "GRPO is not part of mla_jax",
    "trainer.beta_kl": "GRPO is not part of mla_jax",
}

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("auto", "reference", "xla", "cudnn", "chunked", "flash"),
    "model.moe_dispatch": ("ragged", "capacity", "dense"),
    "model.remat": ("auto",) + REMAT_POLICIES,
    "data.format": ("auto", "text", "uint32", "uint16"),
}


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key in cfg.keys():
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


def unknown_key_error(key: str, known: Optional[dict] = None) -> Optional[ConfigError]:
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


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks every rule; raises ConfigError naming the key and the rule. Warns where nothing breaks."""
  check_known_keys(cfg)
  f = _flatten(cfg)
  for key, choices in _CHOICES.items():
    if f[key] not in choices:
      raise ConfigError(key, f"must be one of {', '.join(choices)}; got {f[key]!r}")
  for key, why in _SEED_NOOP_KEYS.items():
    if f[key] != default_config()[key.split(".")[0]][key.split(".")[1]]:
      warnings.warn(f"{key} is accepted for seed-config compatibility but ignored: {why}")

  _positive(f, "model.hidden_size", "model.num_layers", "model.num_heads", "model.max_seq_len",
            "model.rope_theta", "model.rms_norm_eps")
  _non_negative(f, "model.vocab_size", "model.kv_heads", "model.head_dim", "model.v_head_dim",
                "model.intermediate_size", "model.kv_latent_dim", "model.q_latent_dim", "model.d_rope",
                "model.num_experts", "model.num_shared_experts", "model.moe_intermediate_size",
                "model.first_dense_layers", "model.mamba2_num_heads", "model.mamba2_head_dim")
  hidden, heads = f["model.hidden_size"], f["model.num_heads"]
  if f["model.head_dim"] == 0 and hidden % heads:
    raise ConfigError("model.hidden_size",
                      f"{hidden} is not divisible by model.num_heads={heads} (or set model.head_dim)")
  kv_heads = f["model.kv_heads"] or heads
  if heads % kv_heads:  # refused in MLA models too, where kv_heads is unused: it is wrong for any model
    raise ConfigError("model.kv_heads", f"model.num_heads={heads} is not divisible by kv_heads={kv_heads}")
  if f["model.kv_latent_dim"] > 0:
    if f["model.d_rope"] <= 0:
      raise ConfigError("model.d_rope", "must be positive when kv_latent_dim is set (MLA)")
    for key in ("model.kv_latent_dim", "model.q_latent_dim"):
      if f[key] >= hidden:
        warnings.warn(f"{key}={f[key]} is not below hidden_size={hidden}: no compression happens")
  if f["model.mla_q_rope_from_input"] and not (f["model.kv_latent_dim"] and f["model.q_latent_dim"]):
    raise ConfigError("model.mla_q_rope_from_input", "needs MLA with query compression (kv_latent_dim and "
                      "q_latent_dim > 0); without q_latent_dim the whole query already comes from the input")
  if f["model.d_rope"] % 2:
    raise ConfigError("model.d_rope", f"must be even (RoPE rotates pairs), got {f['model.d_rope']}")
  if f["model.kv_latent_dim"] == 0 and f["model.head_dim"] % 2:
    raise ConfigError("model.head_dim", "must be even (RoPE rotates pairs)")
  if f["model.kv_latent_dim"] == 0 and f["model.head_dim"] == 0 and (hidden // heads) % 2:
    raise ConfigError("model.num_heads", f"hidden_size / num_heads = {hidden // heads} must be even for RoPE")
  if f["model.num_experts"] > 0:
    k = f["model.experts_per_tok"]
    if not 1 <= k <= f["model.num_experts"]:
      raise ConfigError("model.experts_per_tok",
                        f"must satisfy 1 <= experts_per_tok <= num_experts={f['model.num_experts']}, got {k}")
    _positive(f, "model.capacity_factor")
    if f["model.shared_expert_enabled"]:
      _positive(f, "model.num_shared_experts")
  if f["model.scan_layers"] and f["model.aux_free_bias"]:
    raise ConfigError("model.scan_layers", "cannot be combined with model.aux_free_bias (the bias update "
                      "addresses unscanned layers)")
  if f["model.first_dense_layers"] > f["model.num_layers"]:
    raise ConfigError("model.first_dense_layers", "must not exceed num_layers")

  _validate_layers(f)
  _warn_unused_keys(f)

  _positive(f, "trainer.learning_rate", "trainer.batch_size", "trainer.gradient_accumulation",
            "trainer.max_steps", "trainer.log_interval", "trainer.eval_interval", "trainer.save_interval",
            "trainer.max_skipped_steps")
  _non_negative(f, "trainer.warmup_steps", "trainer.seq_len", "trainer.num_epochs", "trainer.weight_decay",
                "trainer.max_grad_norm", "trainer.z_loss_alpha", "trainer.load_balance_alpha",
                "trainer.router_z_loss_alpha", "trainer.eval_steps", "trainer.max_checkpoints",
                "trainer.loss_chunk_size")
  if f["trainer.batch_size"] % f["trainer.gradient_accumulation"]:
    raise ConfigError("trainer.batch_size", f"{f['trainer.batch_size']} is not divisible by "
                      f"trainer.gradient_accumulation={f['trainer.gradient_accumulation']}")
  seq_len = f["trainer.seq_len"] or f["model.max_seq_len"]
  if seq_len > f["model.max_seq_len"]:
    raise ConfigError("trainer.seq_len", f"{seq_len} exceeds model.max_seq_len={f['model.max_seq_len']}")
  if not 0.0 <= f["trainer.min_lr_ratio"] <= 1.0:
    raise ConfigError("trainer.min_lr_ratio", "must be in [0, 1]")
  if not 0.0 <= f["data.val_fraction"] < 1.0:
    raise ConfigError("data.val_fraction", "must be in [0, 1)")
  for axis in ("data", "fsdp", "tensor", "expert"):
    size = f[f"mesh.{axis}"]
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}", f"must be a positive size or -1 (the remaining devices), got {size}")


def _warn_unused_keys(f: dict) -> None:
  """Warns (once per message) about attention keys that are set but that this model's layers never read."""
  kinds = layer_kinds(f["model.num_layers"], tuple(f["model.mamba_layers"] or ()), f["model.layer_pattern"])
  if "attention" not in kinds:
    return
  if f["model.kv_latent_dim"] > 0:
    if f["model.kv_heads"]:
      warnings.warn(f"model.kv_heads={f['model.kv_heads']} is ignored by MLA layers (their keys and values "
                    "come from the kv_latent_dim latent); it only sets the GQA row that generate --report_cache "
                    "compares against")
    return
  for key in ("model.v_head_dim", "model.q_latent_dim", "model.d_rope"):
    if f[key]:
      warnings.warn(f"{key}={f[key]} is ignored: it is an MLA key and model.kv_latent_dim is 0, so attention "
                    "layers are GQA (set model.kv_latent_dim for MLA)")


def warn_unused_vocab(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> None:
  """Warns when model.vocab_size is far above the tokenizer's vocabulary: rows no token ever selects."""
  m = cfg.model
  unused = m.vocab_size - tokenizer_vocab
  if m.vocab_size and m.vocab_size > 2 * tokenizer_vocab:
    wasted = unused * m.hidden_size * (1 if m.tie_embeddings else 2)
    rows = "embedding" if m.tie_embeddings else "embedding and output"
    warnings.warn(f"model.vocab_size={m.vocab_size:,} is far above the tokenizer's vocabulary "
                  f"({tokenizer_vocab:,}): {unused:,} {rows} rows are never used, {wasted:,} parameters "
                  "wasted; model.vocab_size=0 follows the tokenizer")


def layer_kinds(num_layers: int, mamba_layers, layer_pattern: str) -> tuple[str, ...]:
  """'mamba' or 'attention' for each layer, from mamba_layers (seed) or layer_pattern."""
  if layer_pattern:
    return tuple("mamba" if ch == "M" else "attention" for ch in layer_pattern)
  mamba = set(mamba_layers)
  return tuple("mamba" if i in mamba else "attention" for i in range(num_layers))


def _validate_layers(f: dict) -> None:
  num_layers = f["model.num_layers"]
  pattern, mamba_layers = f["model.layer_pattern"], tuple(f["model.mamba_layers"] or ())
  if pattern and mamba_layers:
    raise ConfigError("model.layer_pattern", "set either layer_pattern or mamba_layers, not both")
  if pattern:
    bad = sorted(set(pattern) - {"M", "A"})
    if bad:
      raise ConfigError("model.layer_pattern", f"may contain only 'M' (Mamba2) and 'A' (attention), got {bad}")
    if len(pattern) != num_layers:
      raise ConfigError("model.layer_pattern",
                        f"has {len(pattern)} letters but model.num_layers={num_layers}")
  for i in mamba_layers:
    if not isinstance(i, int) or not 0 <= i < num_layers:
      raise ConfigError("model.mamba_layers", f"index {i!r} is outside 0..{num_layers - 1}")
  if len(set(mamba_layers)) != len(mamba_layers):
    raise ConfigError("model.mamba_layers", "has repeated indices")
  kinds = layer_kinds(num_layers, mamba_layers, pattern)
  if "mamba" not in kinds:
    return
  heads = f["model.mamba2_num_heads"]
  if heads <= 0:
    raise ConfigError("model.mamba2_num_heads", "must be positive when Mamba2 layers are present")
  _positive(f, "model.mamba2_state_size", "model.mamba2_chunk_size", "model.mamba2_n_groups",
            "model.mamba2_conv_kernel", "model.mamba2_expand", "model.mamba2_dt_min", "model.mamba2_dt_max")
  inner = f["model.hidden_size"] * f["model.mamba2_expand"]
  head_dim = f["model.mamba2_head_dim"]
  if head_dim == 0 and inner % heads:
    raise ConfigError("model.mamba2_num_heads", f"hidden_size * mamba2_expand = {inner} is not divisible by "
                      f"mamba2_num_heads={heads}")
  if head_dim and inner != heads * head_dim:
    raise ConfigError("model.mamba2_head_dim", f"hidden_size * mamba2_expand = {inner} must equal "
                      f"mamba2_num_heads * mamba2_head_dim = {heads} * {head_dim} = {heads * head_dim}")
  if heads % f["model.mamba2_n_groups"]:
    raise ConfigError("model.mamba2_n_groups", f"mamba2_num_heads={heads} is not divisible by "
                      f"mamba2_n_groups={f['model.mamba2_n_groups']}")
  if f["model.mamba2_dt_min"] > f["model.mamba2_dt_max"]:
    raise ConfigError("model.mamba2_dt_min", "must not exceed mamba2_dt_max")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The resolved, hashable model description that the Flax modules read (all defaults filled in)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  kv_heads: int
  head_dim: int
  v_head_dim: int
  intermediate_size: int
  max_seq_len: int
  rope_theta: float
  rms_norm_eps: float
  tie_embeddings: bool
  dtype: str
  attention_impl: str
  attention_chunk_size: int
  kv_latent_dim: int
  q_latent_dim: int
  d_rope: int
  mla_latent_norms: bool
  mla_q_rope_from_input: bool
  num_experts: int
  experts_per_tok: int
  shared_expert_enabled: bool
  num_shared_experts: int
  moe_intermediate_size: int
  first_dense_layers: int
  norm_topk_prob: bool
  moe_dispatch: str
  capacity_factor: float
  aux_free_bias: bool
  aux_free_bias_rate: float
  layer_kinds: tuple[str, ...]
  mamba2_num_heads: int
  mamba2_head_dim: int
  mamba2_state_size: int
  mamba2_chunk_size: int
  mamba2_n_groups: int
  mamba2_conv_kernel: int
  mamba2_expand: int
  mamba2_dt_min: float
  mamba2_dt_max: float
  mamba2_dt_init_floor: float
  mamba_ffn: bool
  scan_layers: bool
  remat: str

  @property
  def use_mla(self) -> bool:
    return self.kv_latent_dim > 0

  @property
  def attention_kind(self) -> str:
    return "mla" if self.use_mla else "gqa"

  @property
  def mamba2_inner(self) -> int:
    return self.hidden_size * self.mamba2_expand

  def ffn_kind(self, layer: int) -> Optional[str]:
    """'moe', 'mlp' or None (a Mamba2 layer without FFN) for layer `layer`."""
    if self.layer_kinds[layer] == "mamba" and not self.mamba_ffn:
      return None
    if self.num_experts > 0 and layer >= self.first_dense_layers:
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
  def from_config(cls, cfg: ml_collections.ConfigDict, vocab_size: Optional[int] = None) -> "ModelConfig":
    m = cfg.model if "model" in cfg else cfg
    vocab = m.vocab_size or vocab_size
    if not vocab:
      raise ConfigError("model.vocab_size", "is 0 and no tokenizer gave a vocabulary size")
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    inter = m.intermediate_size or 4 * m.hidden_size
    mamba_heads = m.mamba2_num_heads
    return cls(
        vocab_size=int(vocab),
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        kv_heads=m.kv_heads or m.num_heads,
        head_dim=head_dim,
        v_head_dim=m.v_head_dim or head_dim,
        intermediate_size=inter,
        max_seq_len=m.max_seq_len,
        rope_theta=float(m.rope_theta),
        rms_norm_eps=float(m.rms_norm_eps),
        tie_embeddings=bool(m.tie_embeddings),
        dtype=m.dtype,
        attention_impl=m.attention_impl,
        attention_chunk_size=m.attention_chunk_size,
        kv_latent_dim=m.kv_latent_dim,
        q_latent_dim=m.q_latent_dim,
        d_rope=m.d_rope,
        mla_latent_norms=bool(m.mla_latent_norms),
        mla_q_rope_from_input=bool(m.mla_q_rope_from_input),
        num_experts=m.num_experts,
        experts_per_tok=m.experts_per_tok,
        shared_expert_enabled=bool(m.shared_expert_enabled),
        num_shared_experts=m.num_shared_experts if m.shared_expert_enabled else 0,
        moe_intermediate_size=m.moe_intermediate_size or inter,
        first_dense_layers=m.first_dense_layers,
        norm_topk_prob=bool(m.norm_topk_prob),
        moe_dispatch=m.moe_dispatch,
        capacity_factor=float(m.capacity_factor),
        aux_free_bias=bool(m.aux_free_bias),
        aux_free_bias_rate=float(m.aux_free_bias_rate),
        layer_kinds=layer_kinds(m.num_layers, tuple(m.mamba_layers or ()), m.layer_pattern),
        mamba2_num_heads=mamba_heads,
        mamba2_head_dim=m.mamba2_head_dim or (
            (m.hidden_size * m.mamba2_expand) // mamba_heads if mamba_heads else 0),
        mamba2_state_size=m.mamba2_state_size,
        mamba2_chunk_size=m.mamba2_chunk_size,
        mamba2_n_groups=m.mamba2_n_groups,
        mamba2_conv_kernel=m.mamba2_conv_kernel,
        mamba2_expand=m.mamba2_expand,
        mamba2_dt_min=float(m.mamba2_dt_min),
        mamba2_dt_max=float(m.mamba2_dt_max),
        mamba2_dt_init_floor=float(m.mamba2_dt_init_floor),
        mamba_ffn=bool(m.mamba_ffn),
        scan_layers=bool(m.scan_layers),
        remat=m.get("remat", "auto"),
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
  kinds = [model.mixer_kind(i) + (f"+{model.ffn_kind(i)}" if model.ffn_kind(i) else "")
           for i in range(model.num_layers)]
  runs = []
  for kind in kinds:
    if runs and runs[-1][0] == kind:
      runs[-1][1] += 1
    else:
      runs.append([kind, 1])
  layers = ", ".join(f"{kind} x{n}" if n > 1 else kind for kind, n in runs)
  t = cfg.trainer
  return (f"{cfg.model.name}: {model.num_layers} layers ({layers}), hidden {model.hidden_size}, "
          f"{model.num_heads} heads, vocab {model.vocab_size}; learning rate {t.learning_rate:g}, "
          f"warmup {t.warmup_steps} steps")
