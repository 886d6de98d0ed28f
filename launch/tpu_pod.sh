#!/usr/bin/env bash
# Train mla_jax on a Cloud TPU VM pod slice: every worker runs the same `python -m mla_jax.train`.
#
#   launch/tpu_pod.sh --name=mla-pod --zone=us-central2-b --accelerator=v4-32 \
#       --config=configs/hybrid.py --workdir=/gcs/mla-runs/hybrid [--bucket=mla-runs] [--spot] \
#       [--delete] [--dry_run] [-- --config.trainer.max_steps=2000 --config.mesh.fsdp=-1 ...]
#
# Steps: create the slice unless it exists (`gcloud compute tpus tpu-vm create`), copy this checkout to
# every worker (`scp --worker=all`), install it with pip (`jax[tpu]`), optionally mount a GCS bucket with
# gcsfuse (orbax needs one directory that all workers share), run the trainer on every worker with
# `ssh --worker=all` (process 0 prints, so the streamed log is one run's log; each worker also keeps
# ~/train.log), and with --delete remove the slice at the end. --dry_run (or DRY_RUN=1) prints every
# command instead of running it. See launch/README.md.
set -euo pipefail

NAME="" ZONE="" ACCELERATOR="v4-32" VERSION="tpu-ubuntu2204-base" CONFIG="configs/hybrid.py" WORKDIR=""
BUCKET="" SPOT=0 DELETE=0 DRY_RUN="${DRY_RUN:-0}" PROJECT="${CLOUDSDK_CORE_PROJECT:-}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --delete) DELETE=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$NAME" && -n "$ZONE" ]] || { echo "tpu_pod.sh: --name and --zone are required" >&2; exit 2; }
WORKDIR="${WORKDIR:-${BUCKET:+/gcs/$BUCKET/runs/$NAME}}"
[[ -n "$WORKDIR" ]] || { echo "tpu_pod.sh: give --workdir (shared by all workers) or --bucket" >&2; exit 2; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="/tmp/mla_jax-$NAME.tar.gz"
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

# Prints the command (quoting only the words that need it); runs it unless this is a dry run.
run() {
  local out="+" word safe='^[][A-Za-z0-9_./:=@,+%~-]+$'
  for word in "$@"; do
    if [[ "$word" =~ $safe ]]; then out+=" $word"; else out+=" '${word//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
  if [[ "$DRY_RUN" != "1" ]]; then "$@"; fi
}

# Hosts in the slice: v2/v3/v4/v5p count TensorCores (8 a host), v5e/v6e count chips (4 a host).
SIZE="${ACCELERATOR##*-}"
case "$ACCELERATOR" in
  v5litepod-*|v5e-*|v6e-*) WORKERS=$(( SIZE > 8 ? SIZE / 4 : 1 )) ;;
  *) WORKERS=$(( SIZE > 8 ? SIZE / 8 : 1 )) ;;
esac
echo "# $ACCELERATOR: $WORKERS worker(s), one training process each"

# 1. Create the slice, or reuse it when it already exists.
if [[ "$DRY_RUN" != "1" ]] && "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  echo "reusing TPU VM $NAME"
else
  CREATE=("${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  [[ "$SPOT" == "1" ]] && CREATE+=(--spot)
  run "${CREATE[@]}"
fi

# 2. Copy this checkout to every worker: the files git tracks or would track, so nothing .gitignore names
#    (.venv, runs, caches) travels; without git, everything but .git, .venv, runs and caches.
FILES="/tmp/mla_jax-$NAME.files"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi  # tracked files deleted in the checkout are left out
  done) > "$FILES"
  echo "# copying $(tr -cd '\0' < "$FILES" | wc -c) files listed in $FILES"
  run tar -C "$REPO" --null -T "$FILES" -czf "$TARBALL"
else
  run tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs --exclude=.pytest_cache \
      --exclude=__pycache__ -czf "$TARBALL" .
fi
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:~/mla_jax.tar.gz" "${COMMON[@]}" --worker=all

# 3. Unpack and install on every worker; mount the bucket when one is given.
SETUP="rm -rf ~/mla_jax && mkdir -p ~/mla_jax && tar -xzf ~/mla_jax.tar.gz -C ~/mla_jax && \
pip install -q 'jax[tpu]>=0.6,<0.11' -e ~/mla_jax"
if [[ -n "$BUCKET" ]]; then
  SETUP="$SETUP && sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET && \
(mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET)"
fi
run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$SETUP"

# 4. The same training command on every worker; JAX finds the other workers (--multihost).
TRAIN="set -o pipefail; cd ~/mla_jax && python3 -m mla_jax.train --config=$(printf %q "$CONFIG") \
--workdir=$(printf %q "$WORKDIR") --multihost"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(printf '%q' "$arg")"; done
run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$TRAIN 2>&1 | tee ~/train.log"

# 5. Optionally delete the slice.
if [[ "$DELETE" == "1" ]]; then
  run "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}" --quiet
fi
