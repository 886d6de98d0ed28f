"""Safetensors reading (one file, index-sharded or plain folders, bfloat16) and writing, and named access."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mla_jax import safetensors_io as st
from mla_jax.errors import DataError, UserError


def test_bfloat16_reads_as_float32_and_writes_back_as_float32(tmp_path):
  x = np.array([[1.0, -2.5, 0.15625], [3e4, -1e-3, 7.0]], np.float32)
  save_file({"w": x.astype(ml_dtypes.bfloat16), "b": x[0]}, str(tmp_path / "a.safetensors"))
  got = st.read_file(str(tmp_path / "a.safetensors"))
  assert got["w"].dtype == np.float32 and got["b"].dtype == np.float32
  np.testing.assert_array_equal(got["w"], x.astype(ml_dtypes.bfloat16).astype(np.float32))
  np.testing.assert_array_equal(got["b"], x[0])
  st.write_file({"w": got["w"].astype(np.float64)}, str(tmp_path / "b.safetensors"))
  with safe_open(str(tmp_path / "b.safetensors"), framework="np") as f:
    assert f.metadata() == {"format": "pt"} and f.get_tensor("w").dtype == np.float32


def test_folder_reads_the_index_shards_else_every_file(tmp_path):
  save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "m-1.safetensors"))
  save_file({"b": np.zeros(3, np.float32)}, str(tmp_path / "m-2.safetensors"))
  save_file({"stale": np.zeros(1, np.float32)}, str(tmp_path / "old.safetensors"))
  assert sorted(st.read_folder(str(tmp_path))) == ["a", "b", "stale"]
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
  assert sorted(st.read_folder(str(tmp_path))) == ["a", "b"]
  index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "c": "m-3.safetensors"}}))
  with pytest.raises(DataError, match="m-3.safetensors: listed in the index but missing"):
    st.read_folder(str(tmp_path))
  index.write_text("{")
  with pytest.raises(DataError, match="model.safetensors.index.json: not an index with a weight_map"):
    st.read_folder(str(tmp_path))
  with pytest.raises(DataError, match="no \\*.safetensors files"):
    st.read_folder(str(tmp_path / "nothing"))


def test_unreadable_file_is_named(tmp_path):
  (tmp_path / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
  with pytest.raises(DataError, match="x.safetensors: not a readable safetensors file"):
    st.read_file(str(tmp_path / "x.safetensors"))


def test_tensors_report_missing_and_leftover_names():
  t = st.Tensors({"a": np.ones(1), "mtp.b": np.ones(1), "c": np.ones(1)}, "folder")
  assert t.has("a") and not t.has("z")
  t.take("a")
  with pytest.raises(DataError, match="folder: tensor z is missing"):
    t.take("z")
  t.check_all_used(("mtp.", "c"))
  with pytest.raises(DataError, match="folder: 1 tensors have no place in the model, first c"):
    t.check_all_used(("mtp.",))
  w_OI = np.arange(6.0).reshape(2, 3)
  assert st.linear(w_OI).flags.c_contiguous and np.array_equal(st.linear(w_OI), w_OI.T)


def test_folder_reads_lazily_in_the_stored_dtype_as_the_full_read_does(tmp_path):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((6, 4)).astype(ml_dtypes.bfloat16)
  b = rng.standard_normal(5).astype(np.float32)
  save_file({"w": w}, str(tmp_path / "m-1.safetensors"))
  save_file({"b": b}, str(tmp_path / "m-2.safetensors"))
  for indexed in (False, True):
    if indexed:
      (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "m-1.safetensors", "b": "m-2.safetensors"}})
      )
    folder, full = st.Folder(str(tmp_path)), st.read_folder(str(tmp_path))
    assert sorted(folder) == sorted(full) == ["b", "w"] and len(folder) == 2 and "c" not in folder
    assert folder["w"].dtype == ml_dtypes.bfloat16 and folder["b"].dtype == np.float32
    for name in full:
      np.testing.assert_array_equal(np.asarray(folder[name], np.float32), full[name])
    t = st.Tensors(folder, "folder")
    index = (slice(1, 4), slice(2, 4))
    assert t.shape("w") == (6, 4)
    np.testing.assert_array_equal(t.take_slice("w", index), w[index])
    np.testing.assert_array_equal(st.Tensors(full, "full").take_slice("w", index), full["w"][index])
    with pytest.raises(DataError, match="folder: 1 tensors have no place in the model, first b"):
      t.check_all_used()
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"z": "m-1.safetensors"}}))
  with pytest.raises(DataError, match="m-1.safetensors: cannot read tensor z"):
    st.Folder(str(tmp_path))["z"]


def test_write_folder_in_bfloat16_splits_above_the_size_limit(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {f"t{k}": rng.standard_normal((8, 4)).astype(np.float32) for k in range(5)}  # 64 bytes each in bf16
  names = st.write_folder(tensors.items(), str(tmp_path), "bfloat16", max_shard_bytes=150)
  assert names == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 5 * 64 and index["weight_map"]["t4"] == names[2]
  with safe_open(str(tmp_path / names[0]), framework="np") as f:
    assert sorted(f.keys()) == ["t0", "t1"] and f.get_tensor("t0").dtype == ml_dtypes.bfloat16
  back = st.read_folder(str(tmp_path))
  for name, x in tensors.items():
    np.testing.assert_array_equal(back[name], x.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert st.write_folder(tensors.items(), str(tmp_path)) == ["model.safetensors"]  # replaces the shards
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
  back = st.read_folder(str(tmp_path))
  for name, x in tensors.items():
    np.testing.assert_array_equal(back[name], x)
  with pytest.raises(UserError, match="dtype 'float16' is not supported"):
    st.write_folder(tensors.items(), str(tmp_path), "float16")
