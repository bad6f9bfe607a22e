#!/usr/bin/env bash
# Run jax_rlhf on a Cloud TPU VM or slice: create it (or reuse it), copy this checkout to every worker,
# install with the `tpu` extra, mount the GCS bucket that holds the workdir, and run the same command on all
# workers at once (--worker=all); JAX finds the slice's hosts itself (`--distributed`).
#
#   launch/tpu_vm.sh --name rlhf --zone us-central2-b --accelerator v4-32 --bucket my-bucket \
#       --workdir runs/demo [--spot] [--dry-run] -- --config configs/pipeline.py:model=gpt2
#
# --dry-run prints every command (one per line, starting with '+ ') instead of running it. The workdir is
# gs://BUCKET/WORKDIR, mounted with gcsfuse at ~/gcs on every worker, so checkpoints outlive the VM: after a
# preemption, run the same command again and every stage resumes from its last checkpoint.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

name='' zone='' accelerator='' bucket='' workdir='' version='tpu-ubuntu2204-base' project='' spot=0 dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --bucket) bucket="${2#gs://}"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in name zone accelerator bucket workdir; do
  if [[ -z "${!v}" ]]; then echo "error: --$v is required (see --help)" >&2; exit 2; fi
done
if [[ $# -eq 0 ]]; then echo "error: give the jax_rlhf.main arguments after --, e.g. -- --config configs/pipeline.py" >&2; exit 2; fi

# quote and run (dry run: print) come from common.sh
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

root="$(cd "$(dirname "$0")/.." && pwd)"
tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then where+=(--project "$project"); fi
create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version")
if [[ $spot -eq 1 ]]; then create+=(--spot); fi

# 1. the VM (or slice): reuse it when it exists
if [[ $dry -eq 1 ]]; then
  run "${tpu[@]}" describe "$name" "${where[@]}"
  echo "# if it does not exist:"
  run "${create[@]}"
elif ! "${tpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
  run "${create[@]}"
fi

# 2. the code: this checkout's committed files, to every worker
tarball="${TMPDIR:-/tmp}/jax_rlhf-$name.tar.gz"
run git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
run "${tpu[@]}" scp "$tarball" "$name:jax_rlhf.tar.gz" "${where[@]}" --worker=all

# 3. install (the `tpu` extra pins jax[tpu]) and mount the bucket
setup="mkdir -p jax_rlhf ~/gcs && tar -xzf jax_rlhf.tar.gz -C jax_rlhf && cd jax_rlhf"
setup+=" && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
setup+=" && (mountpoint -q ~/gcs || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket ~/gcs)"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$setup"

# 4. the same command on every worker
args=''
for a in "$@"; do args+=" $(quote "$a")"; done
cmd="cd jax_rlhf && .venv/bin/python -m jax_rlhf.main --distributed --workdir ~/gcs/$workdir$args"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$cmd"
