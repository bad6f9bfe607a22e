#!/usr/bin/env bash
# Run jax_rlhf on one GPU host or several: the same command on every host, with the coordinator flags that
# jax.distributed needs (process 0 on the first host coordinates). Each host needs this checkout at --dir and
# the workdir on a file system that every host sees (NFS, a mounted bucket).
#
#   launch/gpu.sh [--hosts gpu0,gpu1] [--port 8476] [--dir ~/jax_rlhf] [--install] [--dry-run] -- \
#       --config configs/pipeline.py --workdir /shared/runs/x
#
# Without --hosts it runs here, one process. --install first creates .venv with the `cuda` extra (jax[cuda12])
# on every host. --dry-run prints every command (one per line, starting with '+ ') instead of running it.
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

# shellcheck disable=SC2088  # the tilde is for the remote shell to expand
hosts='' port=8476 dir='~/jax_rlhf' install=0 dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) hosts="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --install) install=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "error: give the jax_rlhf.main arguments after --, e.g. -- --config configs/pipeline.py --workdir runs/x" >&2; exit 2; fi

# quote and run (dry run: print) come from common.sh
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

args=''
for a in "$@"; do args+=" $(quote "$a")"; done
install_cmd="python3 -m venv .venv && .venv/bin/pip install -q -e '.[cuda]'"

if [[ -z "$hosts" ]]; then  # one host: here
  root="$(cd "$(dirname "$0")/.." && pwd)"
  if [[ $install -eq 1 ]]; then run bash -c "cd $(printf '%q' "$root") && $install_cmd"; fi
  run "$root/.venv/bin/python" -m jax_rlhf.main "$@"
  exit 0
fi

IFS=',' read -r -a hostlist <<< "$hosts"
n=${#hostlist[@]}
coordinator="${hostlist[0]}:$port"
if [[ $install -eq 1 ]]; then
  for h in "${hostlist[@]}"; do run ssh "$h" "cd $dir && $install_cmd"; done
fi
pids=()
for i in "${!hostlist[@]}"; do
  cmd="cd $dir && .venv/bin/python -m jax_rlhf.main --coordinator=$coordinator --num_processes=$n --process_id=$i$args"
  if [[ $dry -eq 1 ]]; then
    run ssh "${hostlist[$i]}" "$cmd"
  else
    # shellcheck disable=SC2029  # the command is built here on purpose
    ssh "${hostlist[$i]}" "$cmd" &
    pids+=($!)
  fi
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
