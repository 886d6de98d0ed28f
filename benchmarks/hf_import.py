"""Hugging Face import: peak host memory and time of reading a DeepSeek-V2-style bfloat16 checkpoint.

  python -m benchmarks.hf_import                 # ~1 GB checkpoint -> benchmarks/results/hf_import.md
  python -m benchmarks.hf_import --experts 16     # a smaller checkpoint

A random DeepSeek-V2-style model (MLA with a q latent, one dense layer, then MoE layers of `--experts`
experts and 2 shared ones) is written by `to_hf` in bfloat16, split into 256 MB files with an index, in a
temporary folder. Each reading mode then runs in a fresh subprocess, which reports its own peak resident
memory (VmHWM) and the time of the read alone:

  full read       the whole folder as float32 first (`safetensors_io.read_folder`), then the name table
  streamed        `from_hf`: one tensor at a time, in the checkpoint's dtype until it becomes a parameter
  streamed bf16   `from_hf(dtype="bfloat16")`: the parameters stay in bfloat16
  sharded (8 dev) `load_sharded` onto 8 simulated CPU devices, FSDP over all 8: every parameter goes
                  straight to its shards (on CPU the device buffers are host memory too)

'baseline' is the same process after its imports, before reading. The files are in the page cache
(just written), so the times are of decoding and copying, not of the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from benchmarks.common import write_results

MODES = ("baseline", "full read", "streamed", "streamed bf16", "sharded (8 dev)")

CHILD = """
import json, os, sys, time
mode, path = sys.argv[1], sys.argv[2]
import jax, numpy as np
from mla_jax import hf
from mla_jax.safetensors_io import Tensors, read_folder

def peak_mb():
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

start = time.perf_counter()
if mode == "full read":
  src = hf._open(path)
  params = hf._load(src.table, Tensors(read_folder(path), path))
elif mode == "streamed":
  params = hf.from_hf(path)[1]
elif mode == "streamed bf16":
  params = hf.from_hf(path, dtype="bfloat16")[1]
elif mode == "sharded (8 dev)":
  mesh = jax.make_mesh((1, 8, 1, 1), ("data", "fsdp", "tensor", "expert"))
  params = jax.block_until_ready(hf.load_sharded(path, mesh)[1])
else:
  params = {}
seconds = time.perf_counter() - start
size = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
print(json.dumps({"peak_mb": peak_mb(), "seconds": seconds, "params_mb": size / 2**20}))
"""


def hf_config(experts: int) -> dict:
  return {
    "model_type": "deepseek_v2",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 384,
    "kv_lora_rank": 256,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "max_position_embeddings": 2048,
    "first_k_dense_replace": 1,
    "n_routed_experts": experts,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 704,
    "n_shared_experts": 2,
  }


def write_checkpoint(path: str, experts: int, shard_mb: int) -> int:
  """Random bfloat16 weights written by to_hf; returns the bytes of the safetensors files."""
  import jax  # noqa: PLC0415

  from mla_jax import hf  # noqa: PLC0415
  from mla_jax.config import ModelConfig  # noqa: PLC0415
  from mla_jax.model import abstract_variables  # noqa: PLC0415

  config = hf.deepseek_config(hf_config(experts))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
    lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(ml_dtypes.bfloat16),
    abstract_variables(ModelConfig.from_config(config))[0],
  )
  hf.to_hf(config, params, path, dtype="bfloat16", max_shard_bytes=shard_mb * 2**20)
  return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def measure(mode: str, path: str) -> dict:
  flags = "--xla_force_host_platform_device_count=8" if mode.startswith("sharded") else ""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  run = subprocess.run([sys.executable, "-c", CHILD, mode, path], env=env, capture_output=True, text=True)
  if run.returncode:
    raise RuntimeError(f"{mode}: {run.stderr[-2000:]}")
  return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer (64: ~1 GB)")
  parser.add_argument("--shard_mb", type=int, default=256, help="largest safetensors file, MB")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "hf")
    start = time.perf_counter()
    size = write_checkpoint(path, args.experts, args.shard_mb)
    files = len([n for n in os.listdir(path) if n.endswith(".safetensors")])
    print(f"wrote {size / 2**20:.0f} MB in {files} files in {time.perf_counter() - start:.1f} s", flush=True)
    rows = {}
    for mode in MODES:
      rows[mode] = measure(mode, path)
      print(mode, rows[mode], flush=True)
  base = rows["baseline"]["peak_mb"]
  lines = [
    f"DeepSeek-V2-style checkpoint: {hf_config(args.experts)}",
    "",
    f"{size / 2**20:.0f} MB of bfloat16 safetensors in {files} files (index-sharded at {args.shard_mb} MB).",
    "",
    "| mode | peak RSS (MB) | above baseline (MB) | params held (MB) | seconds |",
    "|---|---:|---:|---:|---:|",
  ]
  for mode, r in rows.items():
    lines.append(
      f"| {mode} | {r['peak_mb']:.0f} | {r['peak_mb'] - base:.0f} | {r['params_mb']:.0f} | {r['seconds']:.2f} |"
    )
  body = "\n".join(lines)
  print(f"wrote {write_results('hf_import', 'Hugging Face import: peak host memory and time', body)}")


if __name__ == "__main__":
  main()
