#!/usr/bin/env bash
# The GPU check: one command on a GPU host, under 8 minutes, one JSON line at the end.
#
#   bash bench/gpu_check.sh [--dry-run] [--skip-install]
#
# 1. install    pip install -e '.[cuda]' (jaxlib with the CUDA 12 plugin); the parity tests also need torch (the
#               transformers reference runs on the CPU; the tests skip without it). WHEELS=DIR installs from a
#               local wheel folder only (--no-index --find-links DIR),
#               for a host that cannot reach PyPI. PYTHON=... picks the interpreter (default: python3).
# 2. tests      the HF-parity and sampler tests (tests/test_hf.py, tests/test_families.py,
#               tests/test_sampling.py) on the GPU (JAX_PLATFORMS=cuda) in float32, matmuls at 'highest'
#               precision (a GPU's default fp32 matmul is TF32, ~1e-3), tolerances as on the CPU;
# 3. parity     bench/gpu_check.py --part parity: the same families against transformers in float32 and in
#               bfloat16 (logits, greedy tokens, the KV-cached sampler against the cache-free forward);
# 4. timings    --part lm (the LM step at a 350M Llama layout and at Llama-3.2-1B's shape, bf16, MFU against
#               the chip's bf16 peak), --part ppo and --part grpo (one iteration at Qwen2.5-0.5B's shape),
#               --part generate (tokens/s at that shape).
# Each step has its own time limit (seconds: install 75, tests 75, parity 50, lm 90, ppo 60, grpo 50, generate
# 40; 440 in all, SCALE_LIMITS=2 doubles them); a step that fails or times out is recorded as such and the check
# goes on. The last line is one JSON object:
#   {"check": "gpu", "device": ..., "install": {rc, s}, "tests": {rc, s, summary}, "parity": {...}, "lm": {...},
#    "ppo": {...}, "grpo": {...}, "generate": {...}, "ok": bool, "wall_s": ...}
# --dry-run prints each command it would run (one per line, prefixed "would run:") and the JSON line with every
# step marked "dry_run", without installing or running anything.
set -u

cd "$(dirname "$0")/.." || exit 2
DRY=0
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --skip-install) INSTALL=0 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run, --skip-install)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
SCALE="${SCALE_LIMITS:-1}"
limit() { echo $(($1 * SCALE)); }
OUT="$(mktemp -d)"
START=$(date +%s)
if [ -n "${WHEELS:-}" ]; then
  PIP_SOURCE=(--no-index --find-links "$WHEELS")
else
  PIP_SOURCE=()
fi

# run NAME LIMIT CMD...: runs CMD under `timeout LIMIT`, output in $OUT/NAME.log, {rc, s} in $OUT/NAME.status
run() {
  local name="$1" limit="$2"
  shift 2
  if [ "$DRY" = 1 ]; then
    echo "would run: timeout $limit $*"
    echo '{"dry_run": true}' > "$OUT/$name.status"
    return 0
  fi
  local t0 t1 rc
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  echo "{\"rc\": $rc, \"s\": $((t1 - t0))}" > "$OUT/$name.status"
  echo "[$name] exit $rc after $((t1 - t0)) s" >&2
  tail -n 3 "$OUT/$name.log" >&2
  return 0
}

if [ "$INSTALL" = 1 ]; then
  run install "$(limit 75)" "$PY" -m pip install -q "${PIP_SOURCE[@]}" -e '.[cuda]'
else
  echo '{"skipped": true}' > "$OUT/install.status"
fi

export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false
run tests "$(limit 75)" env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_hf.py tests/test_families.py tests/test_sampling.py
for part_limit in parity:50 lm:90 ppo:60 grpo:50 generate:40; do
  part="${part_limit%%:*}"
  run "$part" "$(limit "${part_limit##*:}")" "$PY" -m bench.gpu_check --part "$part"
done

# One JSON line: each step's status, the parts' own JSON (their last line), the tests' summary line.
END=$(date +%s)
"$PY" - "$OUT" "$DRY" "$((END - START))" <<'EOF'
import json, os, sys
out, dry, wall = sys.argv[1], sys.argv[2] == '1', int(sys.argv[3])
res = {'check': 'gpu', 'dry_run': dry, 'wall_s': wall}
ok = True
for name in ('install', 'tests', 'parity', 'lm', 'ppo', 'grpo', 'generate'):
  status = json.load(open(os.path.join(out, name + '.status')))
  log = os.path.join(out, name + '.log')
  lines = open(log).read().splitlines() if os.path.exists(log) else []
  if name not in ('install', 'tests') and lines:
    try:
      status.update(json.loads(lines[-1]))
    except ValueError:
      status['tail'] = lines[-3:]
  elif name == 'tests' and lines:
    status['summary'] = lines[-1]
  if 'rc' in status and status['rc'] != 0:
    ok = False
    status.setdefault('tail', lines[-3:])
  if status.get('ok') is False:
    ok = False
  if 'device' in status and 'device' not in res:
    res['device'] = status['device']
  res[name] = status
res['ok'] = None if dry else ok
print(json.dumps(res))
EOF
rm -rf "$OUT"
