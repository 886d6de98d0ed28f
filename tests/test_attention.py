"""Attention: fast implementations equal the einsum reference; RoPE; GQA; MLA follows DeepSeek-V2."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from mla_jax.layers.attention import GQA
from mla_jax.layers.common import rms_norm
from mla_jax.layers.mla import MLA
from mla_jax.layers.rope import apply_rope
from mla_jax.ops.attention import CPU_CHUNKED_ABOVE, attention, attention_reference, current_platform, resolve_impl


def _qkv(key, B=2, T=12, H=4, K=2, D=8, E=6):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (B, T, H, D)), jax.random.normal(kk, (B, T, K, D)), jax.random.normal(kv, (B, T, K, E)))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_fast_attention_equals_reference(impl, K):
  q, k, v = _qkv(jax.random.PRNGKey(0), K=K)
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  ref_fn = lambda q, k, v: attention_reference(q, k, v, pos, 0.3)
  fast_fn = lambda q, k, v: attention(q, k, v, pos, scale=0.3, impl=impl, chunk_size=5)
  np.testing.assert_allclose(jax.jit(fast_fn)(q, k, v), jax.jit(ref_fn)(q, k, v), atol=1e-5, rtol=1e-5)
  g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(ref_fn(*a))), argnums=(0, 1, 2)))(q, k, v)
  g_fast = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fast_fn(*a))), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_flash_equals_reference_values_and_gradients():
  """Splash attention in Pallas interpret mode: GQA grouping (4 heads over 2), value width below key width
  (MLA), T padded to the kernel's 128. float32: the kernel's online softmax sums in another order, so
  agreement is to float32 rounding over ~100 terms, not bit-exact."""
  q, k, v = _qkv(jax.random.PRNGKey(4), B=1, T=100, H=4, K=2, D=24, E=16)
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])

  def value_and_vjp(fn):
    def run(q, k, v):
      o, vjp = jax.vjp(fn, q, k, v)
      return o, vjp(jnp.cos(o))

    return jax.jit(run)(q, k, v)

  flash = value_and_vjp(lambda q, k, v: attention(q, k, v, pos, scale=0.3, impl="flash"))
  ref = value_and_vjp(lambda q, k, v: attention_reference(q, k, v, pos, 0.3))
  for a, b in zip(jax.tree.leaves(flash), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("segmented", [False, True])
def test_flash_compiles_the_tpu_kernel_per_shard(segmented):
  """For TPU devices (an abstract v5e:2x2 slice, compiled from this host) `auto` is splash attention, the
  real Mosaic kernel (not the interpreter), run per shard of a batch x heads mesh, fwd + bwd; segment ids
  (packed rows) are sharded with the batch."""
  pytest.importorskip("libtpu", reason="needs the TPU compiler (libtpu)")
  from jax.experimental import topologies

  from mla_jax import sharding
  from mla_jax.config import DEFAULT_LOGICAL_AXIS_RULES

  devices = topologies.get_topology_desc(
    platform="tpu", topology_name="v5e:2x2", chip_config_name="default", chips_per_host_bounds=(2, 2, 1), num_slices=1
  ).devices
  mesh = jax.make_mesh((1, 2, 2, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=devices)
  spec = jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor"))
  B, T, H, D, E = 4, 256, 4, 24, 16
  args = [jax.ShapeDtypeStruct((B, T, H, w), jnp.bfloat16, sharding=spec) for w in (D, D, E)]

  def grads(q, k, v):
    with sharding.activation_rules(mesh, DEFAULT_LOGICAL_AXIS_RULES):
      pos = jnp.broadcast_to(jnp.arange(T), (B, T))
      seg = (jnp.arange(T) >= T // 3).astype(jnp.int32) + jnp.arange(B)[:, None] if segmented else None
      o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, pos, scale=D**-0.5, segment_ids_BT=seg), q, k, v)
      return vjp(o)

  hlo = jax.jit(grads).lower(*args).compile().as_text()
  assert hlo.count("tpu_custom_call") >= 3  # forward, dq and dkv kernels


def test_auto_picks_per_platform():
  assert resolve_impl("auto", jnp.bfloat16, 2048, "tpu") == "flash"
  assert resolve_impl("auto", jnp.bfloat16, 2048, "gpu") == "cudnn"
  assert resolve_impl("auto", jnp.float32, 2048, "gpu") == "xla"
  assert resolve_impl("auto", jnp.float32, CPU_CHUNKED_ABOVE, "cpu") == "reference"
  assert resolve_impl("auto", jnp.float32, CPU_CHUNKED_ABOVE + 1, "cpu") == "chunked"
  assert resolve_impl("xla", jnp.float32, 16, "tpu") == "xla"
  # The platform is the mesh's devices' (an abstract TPU mesh when compiling for TPU from a CPU host).
  tpu = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  mesh = jax.sharding.AbstractMesh((2,), ("data",), abstract_device=tpu)
  with jax.sharding.use_abstract_mesh(mesh):
    assert current_platform() == "tpu"
  assert current_platform() == jax.default_backend()


def test_reference_matches_per_head_loop():
  """The grouped einsum equals a plain loop over heads with repeated kv heads and a causal mask."""
  q, k, v = _qkv(jax.random.PRNGKey(1), B=1, T=5, H=4, K=2)
  pos = jnp.arange(5)[None]
  out = attention_reference(q, k, v, pos, 0.5)
  for h in range(4):
    s = np.asarray(q[0, :, h] @ k[0, :, h // 2].T) * 0.5
    s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0, :, h], p @ np.asarray(v[0, :, h // 2]), atol=1e-5)


def test_positions_mask_unwritten_slots():
  """A query at position p ignores key slots after p (what a preallocated cache relies on)."""
  q, k, v = _qkv(jax.random.PRNGKey(2), B=1, T=6)
  ref = jax.jit(attention_reference, static_argnums=4)
  full = ref(q, k, v, jnp.arange(6)[None], 1.0)
  k2 = k.at[:, 4:].set(100.0)
  v2 = v.at[:, 4:].set(-100.0)
  last = ref(q[:, 3:4], k2, v2, jnp.array([[3]]), 1.0)
  np.testing.assert_allclose(last[:, 0], full[:, 3], atol=1e-5)
  # Keys from a cache (S != T): `flash` falls back to this position mask.
  flash = jax.jit(lambda q, k, v: attention(q, k, v, jnp.array([[3]]), scale=1.0, impl="flash"))
  np.testing.assert_allclose(flash(q[:, 3:4], k2, v2), last, atol=1e-6)


def test_rope_depends_only_on_relative_position():
  key = jax.random.PRNGKey(3)
  q = jax.random.normal(key, (1, 1, 1, 16))
  k = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, 1, 16))

  def score(pq, pk):
    return jnp.sum(apply_rope(q, jnp.array([[pq]]), 10000.0) * apply_rope(k, jnp.array([[pk]]), 10000.0))

  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  np.testing.assert_allclose(score(0, 0), jnp.sum(q * k), rtol=1e-5)
  assert abs(float(score(7, 3)) - float(score(7, 4))) > 1e-4
  np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([[55]]), 10000.0)), jnp.linalg.norm(q), rtol=1e-5)


class AttentionLayerTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_gqa_shapes_for_every_kv_heads(self):
    for kv_heads in (1, 2, 4):
      cfg = tiny_model_config("gqa", kv_heads=kv_heads)
      layer = GQA(cfg)
      x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 64))
      pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
      params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x, pos))
      y, cache = self.variant(layer.apply)(params, x, pos)
      chex.assert_shape(y, (2, 10, 64))
      assert cache is None
      assert params["params"]["w_k"]["kernel"].shape == (64, kv_heads, 16)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mla_shapes_with_and_without_query_compression(self):
    for kind, q_names in (("mla", {"w_dq", "w_uq", "q_norm"}), ("mla_noq", {"w_q"})):
      cfg = tiny_model_config(kind)
      layer = MLA(cfg)
      x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 64))
      pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
      params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x, pos))
      y, _ = self.variant(layer.apply)(params, x, pos)
      chex.assert_shape(y, (2, 10, 64))
      names = set(params["params"])
      assert q_names <= names and names - q_names == {"w_dkv", "kv_norm", "w_uk", "w_uv", "w_o"}
      assert params["params"]["w_dkv"]["kernel"].shape == (64, cfg.kv_latent_dim + cfg.d_rope)


@pytest.mark.parametrize("kind,impl", [("mla", "auto"), ("mla_noq", "auto"), ("mla", "flash")])
def test_mla_equals_deepseek_v2_equations(kind, impl):
  """MLA against an independent numpy transcription of DeepSeek-V2 eq. 9-19 (v_head_dim != head_dim)."""
  cfg = tiny_model_config(kind, v_head_dim=12, attention_impl=impl)
  layer = MLA(cfg)
  B, T, D = 1, 7, 64
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  pos = jnp.arange(T)[None]
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x, pos))
  y, _ = jax.jit(layer.apply)(params, x, pos)
  p = jax.tree_util.tree_map(np.asarray, params["params"])
  H, Dn, Dr, C, Dv = cfg.num_heads, cfg.head_dim, cfg.d_rope, cfg.kv_latent_dim, cfg.v_head_dim
  eps = cfg.rms_norm_eps
  if cfg.q_latent_dim:
    c_q = np.asarray(rms_norm(x @ p["w_dq"]["kernel"], p["q_norm"]["scale"], eps))
    q = np.einsum("btq,qhk->bthk", c_q, p["w_uq"]["kernel"])
  else:
    q = np.einsum("btd,dhk->bthk", x, p["w_q"]["kernel"])
  kv = np.asarray(x) @ p["w_dkv"]["kernel"]
  c_kv = np.asarray(rms_norm(kv[..., :C], p["kv_norm"]["scale"], eps))
  k_nope = np.einsum("btc,chd->bthd", c_kv, p["w_uk"]["kernel"])
  v = np.einsum("btc,chd->bthd", c_kv, p["w_uv"]["kernel"])

  def rope(z, t):  # rotate-half: pairs (i, i + d/2) rotated by t * theta^(-2i/d)
    d = z.shape[-1]
    ang = t * 10000.0 ** (-np.arange(0, d, 2) / d)
    z1, z2 = z[..., : d // 2], z[..., d // 2 :]
    return np.concatenate([z1 * np.cos(ang) - z2 * np.sin(ang), z2 * np.cos(ang) + z1 * np.sin(ang)], -1)

  out = np.zeros((T, H, Dv))
  for h in range(H):
    for t in range(T):
      qt = np.concatenate([q[0, t, h, :Dn], rope(q[0, t, h, Dn:], t)])
      scores = []
      for s in range(t + 1):
        ks = np.concatenate([k_nope[0, s, h], rope(kv[0, s, C:], s)])
        scores.append(qt @ ks / np.sqrt(Dn + Dr))
      w = np.exp(np.array(scores) - max(scores))
      w /= w.sum()
      out[t, h] = w @ v[0, : t + 1, h]
  expected = np.einsum("thv,hvd->td", out, p["w_o"]["kernel"])
  np.testing.assert_allclose(y[0], expected, atol=2e-5, rtol=2e-4)


class SmallModuleTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_swiglu_and_rmsnorm_shapes(self):
    from mla_jax.layers.common import RMSNorm
    from mla_jax.layers.mlp import SwiGLU

    cfg = tiny_model_config("gqa")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 64))
    mlp = SwiGLU(cfg)
    params = nn.meta.unbox(mlp.init(jax.random.PRNGKey(1), x))
    chex.assert_shape(self.variant(mlp.apply)(params, x), (2, 5, 64))
    assert params["params"]["gate"]["kernel"].shape == (64, cfg.intermediate_size)
    norm = RMSNorm(1e-6)
    nparams = nn.meta.unbox(norm.init(jax.random.PRNGKey(1), x))
    y = self.variant(norm.apply)(nparams, x)
    chex.assert_shape(y, (2, 5, 64))
    np.testing.assert_allclose(jnp.mean(jnp.square(y), -1), 1.0, rtol=1e-4)
