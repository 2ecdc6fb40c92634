#!/usr/bin/env bash
# The GPU checklist, for any CUDA machine (no network needed):
#
#   bash benchmarks/run_gpu.sh all      # build + CUDA kernels present + cuda tests (+ sanitizers) + report,
#                                       # in one call under 10 minutes (stage time limits below)
#   bash benchmarks/run_gpu.sh build    # pip install . with the CUDA kernels; fails if dualdiff._C has none
#   bash benchmarks/run_gpu.sh tests    # the cuda-marked tests, then a subset of each op's under
#                                       # compute-sanitizer memcheck and racecheck (one process per op)
#   bash benchmarks/run_gpu.sh report   # gpu_report.py: the kernel ops, hutchinson, frechet, toy2d
#   bash benchmarks/run_gpu.sh lift     # bench_lift.py --device cuda (the 58.5 M model; its own call)
#   bash benchmarks/run_gpu.sh experiments  # tadiff / vae / ldm training steps at the default presets
#                                           # (bench_tadiff, bench_vae_train, bench_ldm --device cuda; its own call)
#
# Everything goes to ${OUT:-gpu-results}/ as it is produced (one log per stage, tee'd, unbuffered),
# so a stage killed at its time limit still leaves every finished line; summary.txt has one line
# per stage: its status (ok / FAILED rc / TIMEOUT) and seconds. The exit status is non-zero when
# any stage failed or timed out. pytorch-fid is optional: put its wheel in .whl/ (git-ignored) to
# install it first. Time limits (seconds, override by environment): BUDGET_S (the whole call,
# default 570), BUILD_S 200, TESTS_S 120, SANITIZER_S 20 (per op and tool), REPORT_S 300, LIFT_S 570;
# a stage gets at most what is left of BUDGET_S, so `all` stays under 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
stage=${1:-all}
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
FAILED=()

# The installed package must be what runs, not the source tree (which has no built dualdiff._C):
# -P keeps the current directory off sys.path (Python >= 3.11; else run from a neutral directory).
if python -P -c "" 2>/dev/null; then PY=(python -P); else PY=(python); fi
# nvcc where CUDA usually lives, so CMake finds it (without nvcc it silently builds no CUDA kernels)
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# limited SECONDS LOG CMD...: run CMD under `timeout` (min of SECONDS and the budget left), its
# output tee'd to LOG as produced; returns CMD's status (124 on timeout).
limited() {
  local limit=$1 log=$2 rc=0
  shift 2
  local l; l=$(left)
  (( l < limit )) && limit=$l
  if (( limit <= 5 )); then echo "no time left in BUDGET_S=$BUDGET_S for: $*" | tee -a "$log"; return 124; fi
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
  return "$rc"
}

# run_stage NAME FUNCTION: runs it, records status and seconds in summary.txt
run_stage() {
  local name=$1 t0 rc=0 status
  t0=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S) UTC, $(left) s of budget left)"
  "$2" || rc=$?
  if (( rc == 0 )); then status=ok; elif (( rc == 124 )); then status=TIMEOUT; else status="FAILED rc=$rc"; fi
  echo "$name: $status ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/summary.txt"
  (( rc == 0 )) || FAILED+=("$name")
  return "$rc"
}

build() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"
    command -v nvcc && nvcc --version | tail -2 || echo "nvcc: not found (CMake will build no CUDA kernels)"
    command -v compute-sanitizer || echo "compute-sanitizer: not found"
    "${PY[@]}" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  } 2>&1 | tee "$OUT/env.txt"
  if compgen -G ".whl/*.whl" >/dev/null; then
    limited 120 "$OUT/wheels.log" pip install --no-deps --no-index .whl/*.whl || return
  fi
  echo "pip install --no-build-isolation --no-deps . (log: $OUT/build.log)"
  limited "${BUILD_S:-200}" "$OUT/build.log" pip install --no-build-isolation --no-deps . >/dev/null \
    || { local rc=$?; tail -40 "$OUT/build.log"; return "$rc"; }
  (cd /tmp && "${PY[@]}" -m dualdiff info --json) > "$OUT/info.json" || { cat "$OUT/info.json"; return 1; }
  "${PY[@]}" - "$OUT/info.json" <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import json, sys
info = json.load(open(sys.argv[1]))
ext = info["extension"]
if not (ext.get("built") and ext.get("cuda_kernels")):
    sys.exit(f"dualdiff._C has no CUDA kernels (built={ext.get('built')}, error={ext.get('error')!r}): "
             "nvcc was not found at build time? see build.log")
usable = {be: v["usable"] for be, v in info.get("cuda", {}).items()}
print(f"dualdiff._C: CUDA kernels for {ext.get('cuda_archs')}; usable on cuda: {usable}")
if not info["torch"].get("cuda_available"):
    sys.exit("torch sees no CUDA device")
EOF
}

# ops whose tests/test_<op>.py cuda-marked tests run under the sanitizers, one process per op and
# tool; the subset: the CUDA C++ backend without torch.compile (-k), stopping at the first error
SANITIZE_OPS=(weighted_dice vae_loss timestep_embedding)

tests() {
  local rc=0
  limited "${TESTS_S:-120}" "$OUT/gpu_tests.txt" "${PY[@]}" -m pytest tests -m cuda -q -rfEs \
    -p no:cacheprovider --import-mode=importlib || rc=$?
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found: memcheck/racecheck SKIPPED" | tee -a "$OUT/sanitizer.txt"
    return "$rc"
  fi
  local op tool
  for op in "${SANITIZE_OPS[@]}"; do
    for tool in memcheck racecheck; do
      echo "--- compute-sanitizer --tool $tool: tests/test_$op.py -m cuda -k 'not triton and not compile'" \
        | tee -a "$OUT/sanitizer.txt"
      limited "${SANITIZER_S:-20}" "$OUT/sanitizer.txt" compute-sanitizer --tool "$tool" --error-exitcode 3 \
        "${PY[@]}" -m pytest "tests/test_$op.py" -m cuda -k "not triton and not compile" -q -x -p no:cacheprovider \
        --import-mode=importlib || { local r=$?; echo "$op $tool: rc=$r" | tee -a "$OUT/sanitizer.txt"; rc=$r; }
    done
  done
  return "$rc"
}

report() {
  # kernel ops first: a time limit then cuts the long rows (toy2d's 10 000 steps), not these
  limited "${REPORT_S:-300}" "$OUT/gpu_report.md" "${PY[@]}" benchmarks/gpu_report.py --out "$OUT/gpu_report.json" \
    --only bench_weighted_dice,bench_vae_loss,bench_timestep_embedding,bench_hutchinson,bench_frechet,bench_toy2d
}

lift() {
  limited "${LIFT_S:-570}" "$OUT/bench_lift.md" "${PY[@]}" benchmarks/bench_lift.py --device cuda
}

experiments() {
  local rc=0
  limited "${EXP_S:-180}" "$OUT/bench_tadiff.md" "${PY[@]}" benchmarks/bench_tadiff.py --device cuda \
    --model default --batch 16 || rc=$?
  limited "${EXP_S:-180}" "$OUT/bench_vae_train.md" "${PY[@]}" benchmarks/bench_vae_train.py --device cuda \
    --preset default --batch 32 || rc=$?
  limited "${EXP_S:-180}" "$OUT/bench_ldm.md" "${PY[@]}" benchmarks/bench_ldm.py --device cuda \
    --preset default --image-size 256 || rc=$?
  return "$rc"
}

echo "run_gpu.sh $stage: results in $OUT" | tee -a "$OUT/summary.txt"
case "$stage" in
  build|tests|report|lift|experiments) run_stage "$stage" "$stage" || true ;;
  all)
    if run_stage build build; then
      run_stage tests tests || true
      run_stage report report || true
    fi ;;
  *) echo "usage: bash benchmarks/run_gpu.sh [build|tests|report|lift|experiments|all]" >&2; exit 2 ;;
esac
if (( ${#FAILED[@]} )); then
  echo "run_gpu.sh $stage: FAILED stages: ${FAILED[*]} (see $OUT/summary.txt)" | tee -a "$OUT/summary.txt"
  exit 1
fi
echo "run_gpu.sh $stage: all stages ok" | tee -a "$OUT/summary.txt"
