"""Seed-trainer checkpoint import: the imported model reproduces a numpy transcription of the seed's
forward pass (GQA + SwiGLU and MLA + MoE), and every incompatible checkpoint is refused by name."""

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from mla_jax import seed_checkpoint
from mla_jax.config import ModelConfig
from mla_jax.errors import ConfigError, DataError
from mla_jax.model import forward
from mla_jax.workdir import load, write_from_seed

V, D, L, H, T = 320, 32, 2, 4, 12  # V covers the byte tokenizer, so the workdir test can use it
EPS = 1e-5


def _yaml(tmp_path, **model):
  base = {
    "name": "tiny",
    "hidden_size": D,
    "num_layers": L,
    "num_heads": H,
    "vocab_size": V,
    "max_seq_len": 32,
    "rope_theta": 10000.0,
    "intermediate_size": 40,
  }
  path = tmp_path / "model.yaml"
  path.write_text(
    yaml.safe_dump({"model": {**base, **model}, "trainer": {"learning_rate": 0.001, "batch_size": 2, "max_steps": 10}})
  )
  return str(path)


MLA = dict(kv_latent_dim=12, q_latent_dim=16, d_rope=4, num_experts=4, experts_per_tok=2, shared_expert_enabled=True)
GQA = dict(kv_heads=2)


def _seed_tensors(model: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights under the seed's names, candle layout [out, in]."""
  rng = np.random.default_rng(seed)
  w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
  norm = lambda: (1.0 + 0.2 * rng.standard_normal(D)).astype(np.float32)
  d = D // H
  out = {
    "embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32),
    "norm.weight": norm(),
    "lm_head.weight": w(V, D),
  }
  F = model.get("intermediate_size", 40)
  for i in range(L):
    p, a = f"layers.{i}.", f"layers.{i}.self_attn."
    out[p + "input_layernorm.weight"], out[p + "post_attention_layernorm.weight"] = norm(), norm()
    if "kv_latent_dim" in model:
      C, Q, R, E = model["kv_latent_dim"], model["q_latent_dim"], model["d_rope"], model["num_experts"]
      out.update(
        {
          a + "w_dkv.weight": w(C, D),
          a + "w_dq.weight": w(Q, D),
          a + "w_uq.weight": w(H * d, Q),
          a + "w_uk.weight": w(H * d, C),
          a + "w_uv.weight": w(H * d, C),
          a + "w_qr.weight": w(H * R, D),
          a + "w_kr.weight": w(R, D),
          a + "o_proj.weight": w(D, D),
          p + "moe.router.gate.weight": 3 * w(E, D),
        }
      )
      for e in [f"experts.{j}" for j in range(E)] + ["shared_expert"]:
        out.update(
          {
            f"{p}moe.{e}.gate_proj.weight": w(F, D),
            f"{p}moe.{e}.up_proj.weight": w(F, D),
            f"{p}moe.{e}.down_proj.weight": w(D, F),
          }
        )
    else:
      K = model["kv_heads"]
      out.update(
        {
          a + "q_proj.weight": w(D, D),
          a + "k_proj.weight": w(K * d, D),
          a + "v_proj.weight": w(K * d, D),
          a + "o_proj.weight": w(D, D),
          p + "mlp.gate_proj.weight": w(F, D),
          p + "mlp.up_proj.weight": w(F, D),
          p + "mlp.down_proj.weight": w(D, F),
        }
      )
  return out


# ----------------------------------------------------------- the seed's forward pass, in numpy (oxidizr §3)


def _rms(x, w):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * w


def _rope(x_HTd, theta):
  d = x_HTd.shape[-1]
  freqs = np.arange(x_HTd.shape[-2])[:, None] * (1.0 / theta ** (np.arange(0, d, 2) / d))[None]
  emb = np.concatenate([freqs, freqs], -1)
  rotated = np.concatenate([-x_HTd[..., d // 2 :], x_HTd[..., : d // 2]], -1)
  return x_HTd * np.cos(emb) + rotated * np.sin(emb)


def _attend(q_HTk, k_HTk, v_HTd, scale):
  s = q_HTk @ k_HTk.swapaxes(-1, -2) * scale + np.triu(np.full((T, T), -np.inf), 1)
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v_HTd


def _swiglu(x, g, u, dn):
  a = x @ g.T
  return (a / (1 + np.exp(-a)) * (x @ u.T)) @ dn.T


def _seed_logits(t: dict, model: dict, tokens_T: np.ndarray) -> np.ndarray:
  t = {k: v.astype(np.float64) for k, v in t.items()}
  d = D // H
  x = t["embed_tokens.weight"][tokens_T]
  for i in range(L):
    p, a = f"layers.{i}.", f"layers.{i}.self_attn."
    h = _rms(x, t[p + "input_layernorm.weight"])
    heads = lambda y, n: y.reshape(T, n, -1).transpose(1, 0, 2)
    if "kv_latent_dim" in model:
      R = model["d_rope"]
      c_kv, c_q = h @ t[a + "w_dkv.weight"].T, h @ t[a + "w_dq.weight"].T  # no latent norms
      q_r = _rope(heads(h @ t[a + "w_qr.weight"].T, H), 10000.0)  # from x, not from c_q
      k_r = np.broadcast_to(_rope((h @ t[a + "w_kr.weight"].T)[None], 10000.0), (H, T, R))
      q = np.concatenate([heads(c_q @ t[a + "w_uq.weight"].T, H), q_r], -1)
      k = np.concatenate([heads(c_kv @ t[a + "w_uk.weight"].T, H), k_r], -1)
      o = _attend(q, k, heads(c_kv @ t[a + "w_uv.weight"].T, H), 1 / np.sqrt(d + R))
    else:
      K = model["kv_heads"]
      q = _rope(heads(h @ t[a + "q_proj.weight"].T, H), 10000.0)
      k = np.repeat(_rope(heads(h @ t[a + "k_proj.weight"].T, K), 10000.0), H // K, axis=0)
      v = np.repeat(heads(h @ t[a + "v_proj.weight"].T, K), H // K, axis=0)
      o = _attend(q, k, v, 1 / np.sqrt(d))
    x = x + o.transpose(1, 0, 2).reshape(T, D) @ t[a + "o_proj.weight"].T
    h = _rms(x, t[p + "post_attention_layernorm.weight"])
    if "kv_latent_dim" in model:
      m = p + "moe."
      logits = h @ t[m + "router.gate.weight"].T
      y = _swiglu(h, *(t[f"{m}shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down")))
      for n in range(T):  # top-k on the raw logits, softmax over the k chosen values, every expert dense
        top = np.argsort(-logits[n])[: model["experts_per_tok"]]
        gate = np.exp(logits[n, top] - logits[n, top].max())
        for e, g in zip(top, gate / gate.sum(), strict=True):
          y[n] += g * _swiglu(h[n], *(t[f"{m}experts.{e}.{k}_proj.weight"] for k in ("gate", "up", "down")))
      x = x + y
    else:
      x = x + _swiglu(h, *(t[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
  return _rms(x, t["norm.weight"]) @ t["lm_head.weight"].T


def _save(tmp_path, tensors, name="tiny_32_1m_f32_step_100.safetensors"):
  folder = tmp_path / "checkpoints"
  folder.mkdir(exist_ok=True)
  save_file(tensors, str(folder / name))
  return str(folder)


@pytest.mark.parametrize("model", [MLA, GQA], ids=["mla_moe", "gqa"])
def test_imported_seed_model_matches_the_seed_forward_pass(tmp_path, model):
  tensors = _seed_tensors(model)
  config, params = seed_checkpoint.from_seed(_save(tmp_path, tensors), _yaml(tmp_path, **model))
  cfg = ModelConfig.from_config(config)
  tokens_T = np.random.default_rng(1).integers(0, V, T)
  ours = np.asarray(forward(config, params, tokens_T[None]))[0]  # the notebook form: the ConfigDict itself
  want = _seed_logits(tensors, model, tokens_T)
  assert np.std(want) > 0.3
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=1e-4)
  if "kv_latent_dim" in model:
    assert not cfg.mla_latent_norms and cfg.mla_q_rope_from_input and cfg.norm_topk_prob
    assert cfg.rms_norm_eps == EPS and cfg.num_shared_experts == 1 and cfg.moe_intermediate_size == 40


def test_checkpoint_folder_prefers_final_then_newest_step(tmp_path):
  folder = tmp_path / "ckpt"
  folder.mkdir()
  for name in ("m_32_1m_f32_step_9.safetensors", "m_32_1m_f32_step_100.safetensors"):
    (folder / name).write_bytes(b"")
  assert seed_checkpoint.find_checkpoint(str(folder)).endswith("_step_100.safetensors")
  (folder / "m_32_1m_f32_final.safetensors").write_bytes(b"")
  assert seed_checkpoint.find_checkpoint(str(folder)).endswith("_final.safetensors")
  with pytest.raises(DataError, match="no \\*_final.safetensors"):
    seed_checkpoint.find_checkpoint(str(tmp_path))


@pytest.mark.parametrize(
  "model,key,words",
  [
    ({"mamba_layers": [0], "mamba2_num_heads": 4, **MLA}, "model.mamba_layers", "intra-chunk"),
    ({"mamba_layers": [0], "mamba2_num_heads": 4, "mamba3_enabled": True, **MLA}, "model.mamba3_enabled", "Mamba3"),
    ({"mamba_layers": [1], **GQA}, "model.mamba_layers", "exp(-a_log)"),
    ({**MLA, "experts_per_tok": 1}, "model.experts_per_tok", "exactly 1.0"),
    ({**MLA, "num_experts": None}, "model.num_experts", "always MLA + MoE"),
    ({}, "model.kv_heads", "need kv_heads or kv_latent_dim"),
  ],
)
def test_incompatible_seed_models_are_refused_by_name(tmp_path, model, key, words):
  with pytest.raises(ConfigError, match=re.escape(words)) as e:
    seed_checkpoint.seed_config(_yaml(tmp_path, **{k: v for k, v in model.items() if v is not None}))
  assert e.value.key == key


def test_bad_checkpoints_name_the_file_and_tensor(tmp_path):
  yaml_path = _yaml(tmp_path, **MLA)
  tensors = _seed_tensors(MLA)
  missing = {k: v for k, v in tensors.items() if k != "layers.1.moe.experts.3.up_proj.weight"}
  folder = _save(tmp_path, missing)
  with pytest.raises(DataError, match=r"step_100.safetensors: tensor layers.1.moe.experts.3.up_proj.weight is missing"):
    seed_checkpoint.from_seed(folder, yaml_path)
  wrong = dict(tensors, **{"layers.0.self_attn.w_uq.weight": tensors["layers.0.self_attn.w_uq.weight"][:, :8]})
  with pytest.raises(DataError, match="layers.0.self_attn.w_uq.weight has shape"):
    seed_checkpoint.from_seed(_save(tmp_path, wrong), yaml_path)
  short = dict(tensors, **{"layers.1.input_layernorm.weight": tensors["layers.1.input_layernorm.weight"][:-1]})
  with pytest.raises(
    DataError,
    match=r"step_100.safetensors: layer_1/mixer_norm/scale has shape \(31,\) in the "
    r"checkpoint but \(32,\) in the YAML",
  ):
    seed_checkpoint.from_seed(_save(tmp_path, short), yaml_path)
  extra = dict(tensors, **{"layers.0.moe.experts.4.up_proj.weight": tensors["layers.0.moe.experts.3.up_proj.weight"]})
  with pytest.raises(DataError, match="1 tensors have no place"):
    seed_checkpoint.from_seed(_save(tmp_path, extra), yaml_path)
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a safetensors file")
  with pytest.raises(DataError, match="garbage.safetensors: not a readable safetensors file"):
    seed_checkpoint.from_seed(str(garbage), yaml_path)
  (tmp_path / "checkpoints" / "config.json").write_text(json.dumps({"hidden_size": D, "kv_latent_dim": 24}))
  with pytest.raises(ConfigError, match="kv_latent_dim is 24 in .*config.json"):
    seed_checkpoint.from_seed(_save(tmp_path, tensors), yaml_path)


def test_convert_writes_a_workdir_that_holds_the_seed_weights(tmp_path):
  tensors = _seed_tensors(GQA, seed=3)
  folder = _save(tmp_path, tensors, "tiny_32_1m_f32_final.safetensors")
  workdir = str(tmp_path / "run")
  out = io.StringIO()
  write_from_seed(folder, _yaml(tmp_path, **GQA), workdir, stream=out)
  assert "uses the byte tokenizer" in out.getvalue() and f"{workdir}/checkpoints/0" in out.getvalue()
  _, cfg, variables, _, step = load(workdir)
  assert step == 0 and cfg.kv_heads == 2 and cfg.rms_norm_eps == EPS
  np.testing.assert_array_equal(
    np.asarray(variables["params"]["layer_1"]["gqa"]["w_k"]["kernel"]).reshape(D, -1),
    tensors["layers.1.self_attn.k_proj.weight"].T,
  )


def test_convert_cli_needs_the_seed_yaml(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "mla_jax.convert", f"--seed={tmp_path}", f"--workdir={tmp_path}/w"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2 and "--seed needs --seed_yaml" in result.stderr
