#!/usr/bin/env bash
# bfloat16 training throughput and MFU of the seed configs on one GPU.
#
#   bash benchmarks/gpu.sh                       # -> benchmarks/results/gpu.md
#   CONFIGS="mla moe" BATCH=16 SEQ_LEN=1024 STEPS=60 PEAK_TFLOPS=989 bash benchmarks/gpu.sh
#
# Each config trains STEPS steps with the real trainer (`python -m mla_jax.train`, compiled once before
# the loop) at --config.model.dtype=bfloat16 (parameters and optimizer state stay float32). tokens/s is
# the median of the logged intervals after the first; achieved FLOP/s uses the trainer's own FLOPs per
# token (6 x active matmul params + causal attention + SSD); MFU divides by the GPU's dense bfloat16
# peak, looked up from `nvidia-smi` (or PEAK_TFLOPS).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIGS="${CONFIGS:-gqa mla moe mamba2 hybrid}"
BATCH="${BATCH:-16}" SEQ_LEN="${SEQ_LEN:-1024}" STEPS="${STEPS:-60}" LOG_EVERY="${LOG_EVERY:-10}"
PYTHON="${PYTHON:-python}"
OUT="${OUT:-benchmarks/results/gpu.md}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
if [[ -z "${PEAK_TFLOPS:-}" ]]; then
  case "$GPU" in  # dense bfloat16 tensor-core peaks from the vendors' data sheets (no sparsity)
    *H200*|*H100*SXM*|*"H100 80GB HBM3"*) PEAK_TFLOPS=989 ;;
    *H100*PCIe*|*"H100 PCIe"*) PEAK_TFLOPS=756 ;;
    *H100*NVL*) PEAK_TFLOPS=835 ;;
    *A100*) PEAK_TFLOPS=312 ;;
    *L40S*) PEAK_TFLOPS=362 ;;
    *A10*) PEAK_TFLOPS=125 ;;
    *L4*) PEAK_TFLOPS=121 ;;
    *) echo "gpu.sh: unknown GPU '$GPU'; set PEAK_TFLOPS" >&2; exit 2 ;;
  esac
fi

rows=()
for name in $CONFIGS; do
  log="$WORK/$name.log"
  "$PYTHON" -m mla_jax.train --config="configs/$name.py" --workdir="$WORK/$name" \
      --config.model.dtype=bfloat16 --config.trainer.batch_size="$BATCH" --config.trainer.seq_len="$SEQ_LEN" \
      --config.trainer.max_steps="$STEPS" --config.trainer.log_interval="$LOG_EVERY" \
      --config.trainer.warmup_steps=10 --config.trainer.eval_steps=0 --config.trainer.max_checkpoints=1 \
      --config.sample.max_new_tokens=0 >"$log" 2>&1 || { tail -n 20 "$log" >&2; exit 1; }
  rows+=("$("$PYTHON" - "$name" "$WORK/$name/metrics.jsonl" "$log" "$PEAK_TFLOPS" <<'EOF'
import json, re, statistics, sys
name, metrics, log, peak = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]) * 1e12
tok_s = statistics.median([r["tokens_per_s"] for r in map(json.loads, open(metrics)) if "tokens_per_s" in r][1:])
text = open(log).read()
per_token = float(re.search(r"FLOPs per step: \S+ \((\S+) per token", text).group(1))
params = re.search(r"Parameters: total ([\d,]+), active ([\d,]+)", text)
total, active = (int(params.group(i).replace(",", "")) / 1e6 for i in (1, 2))
mem = re.search(r"Memory per device: .*total ([\d,.]+ MiB)", text)
print(f"| {name} | {total:.1f}M / {active:.1f}M | {tok_s:,.0f} | {tok_s * per_token / 1e12:.1f} | "
      f"{tok_s * per_token / peak:.1%} | {mem.group(1) if mem else '-'} |")
EOF
)")
  echo "${rows[-1]}"
done

{
  echo "# Training throughput (bfloat16, one GPU)"
  echo
  echo "- date: $(date +%Y-%m-%d)"
  echo "- GPU: $GPU, dense bfloat16 peak $PEAK_TFLOPS TFLOP/s"
  echo "- $("$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices()[0].device_kind)')"
  echo
  echo "batch $BATCH x $SEQ_LEN tokens, byte vocabulary, bfloat16 compute, float32 parameters and AdamW state;"
  echo "median tokens/s of the logged intervals after the first ($STEPS steps, logged every $LOG_EVERY)."
  echo
  echo "| config | params (total / active) | tokens/s | achieved TFLOP/s | MFU | memory per device |"
  echo "|---|---:|---:|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
} >"$OUT"
echo "wrote $OUT"
