"""Safetensors reading (one file, index-sharded or plain folders, bfloat16) and writing, and named access."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mla_jax import safetensors_io as st
from mla_jax.errors import DataError


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
