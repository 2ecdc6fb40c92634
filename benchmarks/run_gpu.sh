#!/usr/bin/env bash
# The GPU checklist, for one CUDA machine (no network needed), from a fresh clone:
#
#   bash benchmarks/run_gpu.sh plan         # the stages, their time limits and files; runs nothing
#   bash benchmarks/run_gpu.sh all          # preflight, build, kernel-tests, cuda-tests, report,
#                                           # sanitizer: <= BUDGET_S (420 s) in all
#   bash benchmarks/run_gpu.sh STAGE        # one of: build kernel-tests cuda-tests report sanitizer
#   bash benchmarks/run_gpu.sh lift         # bench_lift.py --device cuda (its own call)
#   bash benchmarks/run_gpu.sh experiments  # tadiff / vae / ldm training steps at the default presets
#
# Results go to ${OUT:-gpu-results}/ as they are produced, at most 8 files (the device tool brings
# back 8): summary.txt (one line per stage and per sanitizer tool: ok / FAILED rc=N / TIMEOUT,
# seconds, pytest's or the tool's own closing line), build.log (machine, toolchain, build,
# `dualdiff info`), kernel_tests.log, cuda_tests.log, report.md + rows.json (gpu_report.py: every
# measured row), sanitizer.log. A stage fails on any non-zero status of what it runs (pipefail:
# never tee's); nothing turns a failure into ok. The exit status is non-zero when a stage failed.
#
# Environment: BUDGET_S (default 420), per-stage limits PREFLIGHT_S BUILD_S KERNEL_TESTS_S
# CUDA_TESTS_S REPORT_S SANITIZER_S (each stage also gets at most what is left of BUDGET_S),
# PYTHON (the one interpreter for pip, pytest and the scripts; default python3), CUDA_ARCH (default:
# the GPU's compute capability from nvidia-smi, e.g. 90), XDIST_WORKERS (8), TEST_TIMEOUT_S (60 per
# test), KERNEL_TESTS (the kernel test files, space-separated), COMPUTE_SANITIZER (its path; default:
# looked up). Extra wheels (e.g. pytorch-fid) in .whl/ are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
stage=${1:-all}

# ---- stages: name, time limit (s), files written --------------------------------------------------
PREFLIGHT_S=${PREFLIGHT_S:-20}
BUILD_S=${BUILD_S:-100}
KERNEL_TESTS_S=${KERNEL_TESTS_S:-80}
CUDA_TESTS_S=${CUDA_TESTS_S:-50}
REPORT_S=${REPORT_S:-100}
SANITIZER_S=${SANITIZER_S:-60}   # the three tools run side by side, each limited to this
# 420 s for `all` and its stages; the benchmark-only calls (lift, experiments) have a call of their own
case $stage in lift|experiments) BUDGET_S=${BUDGET_S:-570} ;; *) BUDGET_S=${BUDGET_S:-420} ;; esac
ALL_STAGES=(preflight build kernel-tests cuda-tests report sanitizer)
declare -A LIMIT=([preflight]=$PREFLIGHT_S [build]=$BUILD_S [kernel-tests]=$KERNEL_TESTS_S
                  [cuda-tests]=$CUDA_TESTS_S [report]=$REPORT_S [sanitizer]=$SANITIZER_S
                  [lift]=${LIFT_S:-560} [experiments]=${EXP_S:-560})
declare -A FILES=([preflight]="summary.txt" [build]="build.log" [kernel-tests]="kernel_tests.log"
                  [cuda-tests]="cuda_tests.log" [report]="report.md rows.json"
                  [sanitizer]="sanitizer.log" [lift]="bench_lift.md" [experiments]="bench_experiments.md auto_vs_torch.json")
declare -A WHAT=(
  [preflight]="a CUDA device (nvidia-smi, torch.cuda.is_available()), else stop with one line"
  [build]="pip install --no-build-isolation --no-deps . for this GPU's architecture only; fails unless dualdiff._C has CUDA kernels and the cuda and triton backends are usable on the GPU"
  [kernel-tests]="pytest of the kernel tests (weighted dice, vae loss, timestep embedding, their edge and index-model tests): every backend on CUDA, Triton included; xdist, per-test timeout"
  [cuda-tests]="pytest -m cuda of every other test file"
  [report]="gpu_report.py: each op's time, ratio to eager, GB/s and share of the copy bandwidth"
  [sanitizer]="compute-sanitizer memcheck, racecheck and synccheck (side by side) of sanitize_kernels.py: every CUDA and Triton kernel once per dtype and code path"
  [lift]="bench_lift.py --device cuda"
  [experiments]="bench_tadiff, bench_vae_train, bench_ldm --device cuda at the default presets; bench_auto_vs_torch (auto vs DUALDIFF_BACKEND=torch, every experiment, tiny and default)")
if [ -n "${KERNEL_TESTS:-}" ]; then
  read -r -a KERNEL_TEST_FILES <<< "$KERNEL_TESTS"
else
  KERNEL_TEST_FILES=(tests/test_weighted_dice.py tests/test_vae_loss.py tests/test_timestep_embedding.py)
  for f in tests/test_gpu_kernel_edges.py tests/test_cuda_index_models.py tests/test_triton_launcher_fallback.py; do
    [ -f "$f" ] && KERNEL_TEST_FILES+=("$f")
  done
fi
SANITIZER_TOOLS=(memcheck racecheck synccheck)

plan() {
  local total=0 s
  echo "run_gpu.sh all: stages in order (limit in s, files under \$OUT), BUDGET_S=$BUDGET_S"
  for s in "${ALL_STAGES[@]}"; do
    printf '  %-13s %4s s  %-28s %s\n' "$s" "${LIMIT[$s]}" "${FILES[$s]}" "${WHAT[$s]}"
    total=$(( total + ${LIMIT[$s]} ))
  done
  echo "  sum of the limits: $total s (BUDGET_S $BUDGET_S)"
  echo "  files: summary.txt build.log kernel_tests.log cuda_tests.log report.md rows.json sanitizer.log (7 <= 8)"
  echo "  kernel test files: ${KERNEL_TEST_FILES[*]}"
  echo "own calls: lift (${LIMIT[lift]} s, ${FILES[lift]}), experiments (${LIMIT[experiments]} s, ${FILES[experiments]})"
  if (( total > BUDGET_S )); then echo "run_gpu.sh plan: the limits sum to more than BUDGET_S" >&2; return 1; fi
}

if [ "$stage" = plan ]; then plan; exit $?; fi

OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=()

# One interpreter for everything. -P keeps the checkout off sys.path so the installed package
# (with its built dualdiff._C) is what runs.
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
PY=("$PYTHON" -P)

# CUDA tools: PATH first, then /usr/local/cuda*/bin (newest first), also when nvcc is on PATH but
# compute-sanitizer is not.
find_cuda_tool() {
  local name=$1 d
  command -v "$name" 2>/dev/null && return 0
  for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer $(ls -d /usr/local/cuda-*/bin /usr/local/cuda-*/compute-sanitizer 2>/dev/null | sort -rV); do
    [ -x "$d/$name" ] && { echo "$d/$name"; return 0; }
  done
  return 1
}
NVCC=$(find_cuda_tool nvcc || true)
SANITIZER=${COMPUTE_SANITIZER-$(find_cuda_tool compute-sanitizer || true)}
[ -n "$NVCC" ] && export PATH="$(dirname "$NVCC"):$PATH" CUDACXX="$NVCC"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# limited SECONDS LOG CMD...: CMD under `timeout` (the smaller of SECONDS and the budget left; the
# whole process group is signalled), its output appended to LOG as produced (and echoed); returns
# CMD's status, 124 on timeout.
limited() {
  local limit=$1 log=$2 l
  shift 2
  l=$(left)
  if (( l <= 3 )); then echo "no time left in BUDGET_S=$BUDGET_S for: $*" | tee -a "$log"; return 124; fi
  (( l < limit )) && limit=$l
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
}

# the closing line of a pytest log ("== 3 failed, 250 passed in 61.2s ==") or of sanitize_kernels
closing_line() {
  grep -E '^(=+ )?(([0-9]+ [a-z]+(, )?)+|no tests ran) in [0-9.]+s.*$' "$1" 2>/dev/null \
    | tail -1 | sed -E 's/^=+ //; s/ =+$//' || true
}

# run_stage NAME FUNCTION: runs it; one line in summary.txt: status, seconds, detail
run_stage() {
  local name=$1 t0 rc=0 status detail=""
  t0=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S) UTC, limit ${LIMIT[$name]:-?} s, $(left) s of BUDGET_S left)"
  STAGE_DETAIL=""
  "$2" || rc=$?
  if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=TIMEOUT; else status="FAILED rc=$rc"; fi
  [ -n "$STAGE_DETAIL" ] && detail=" - $STAGE_DETAIL"
  echo "$name: $status ($(( $(date +%s) - t0 )) s)$detail" | tee -a "$SUMMARY"
  (( rc == 0 )) || FAILED+=("$name")
  return "$rc"
}

preflight() {
  if ! command -v nvidia-smi >/dev/null; then
    STAGE_DETAIL="no CUDA device: nvidia-smi not found"; return 1
  fi
  if ! nvidia-smi -L >/dev/null 2>&1; then
    STAGE_DETAIL="no CUDA device: nvidia-smi -L failed ($(nvidia-smi -L 2>&1 | head -1))"; return 1
  fi
  if ! timeout "${LIMIT[preflight]}" "${PY[@]}" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    STAGE_DETAIL="no CUDA device: torch.cuda.is_available() is False or timed out ($PYTHON)"; return 1
  fi
  STAGE_DETAIL="$(nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader | head -1)"
}

build() {
  local log=$OUT/build.log arch
  {
    echo "## machine"; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
    echo "nvcc: ${NVCC:-not found}"; [ -n "$NVCC" ] && "$NVCC" --version | tail -2
    echo "compute-sanitizer: ${SANITIZER:-not found}"
    echo "cores: $(nproc)"
    "${PY[@]}" -c "import sys, torch, triton; print('python', sys.version.split()[0], sys.executable, '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    "${PY[@]}" -c "import importlib.util as u; print('pytest-xdist', bool(u.find_spec('xdist')), '| pytest-timeout', bool(u.find_spec('pytest_timeout')), '| pytorch-fid', bool(u.find_spec('pytorch_fid')))"
  } > "$log" 2>&1
  if [ -z "$NVCC" ]; then STAGE_DETAIL="nvcc not found (PATH, /usr/local/cuda*/bin): no CUDA kernels can be built"; return 1; fi
  arch=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')}
  [ -n "$arch" ] || arch=native
  if compgen -G ".whl/*.whl" >/dev/null; then
    limited 60 "$log" "$PYTHON" -m pip install --no-deps --no-index .whl/*.whl >/dev/null || return
  fi
  echo "## pip install --no-build-isolation --no-deps . (CMAKE_CUDA_ARCHITECTURES=$arch)" >> "$log"
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  limited "${LIMIT[build]}" "$log" "$PYTHON" -m pip install --no-build-isolation --no-deps -v \
      -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" . >/dev/null \
    || { local rc=$?; tail -30 "$log"; STAGE_DETAIL="pip install failed (build.log)"; return "$rc"; }
  echo "## dualdiff info --json" >> "$log"
  local info=$OUT/.info.json  # removed below: not one of the files that come back
  (cd /tmp && timeout 120 "${PY[@]}" -m dualdiff info --json) > "$info" 2>> "$log" \
    || { cat "$info" >> "$log"; rm -f "$info"; STAGE_DETAIL="dualdiff info failed (build.log)"; return 1; }
  cat "$info" >> "$log"
  # the stage fails unless the CUDA kernels were built AND both GPU backends pass their probe launch
  local rc=0
  STAGE_DETAIL=$("${PY[@]}" - "$info" <<'EOF2'
import json, sys
info = json.load(open(sys.argv[1]))
ext, gpu = info["extension"], info.get("cuda", {})
bad = []
if not (ext.get("built") and ext.get("cuda_kernels")):
    bad.append(f"dualdiff._C has no CUDA kernels (built={ext.get('built')}, error={ext.get('error')!r})")
if not info["torch"].get("cuda_available"):
    bad.append("torch sees no CUDA device")
for be in ("cuda", "triton"):
    if not gpu.get(be, {}).get("usable"):
        bad.append(f"{be} backend unusable on the GPU: {gpu.get(be, {}).get('why')}")
print("; ".join(bad) if bad else f"CUDA kernels for {ext.get('cuda_archs')}; cuda and triton usable on the GPU")
sys.exit(1 if bad else 0)
EOF2
) || rc=$?
  rm -f "$info"
  return "$rc"
}

# pytest options: xdist and a per-test timeout where installed; the pyproject's addopts apply
pytest_opts() {
  PYTEST_OPTS=(-q -rfEs -p no:cacheprovider)
  if "${PY[@]}" -c "import xdist" 2>/dev/null; then PYTEST_OPTS+=(-n "${XDIST_WORKERS:-8}"); fi
  if "${PY[@]}" -c "import pytest_timeout" 2>/dev/null; then PYTEST_OPTS+=(--timeout "${TEST_TIMEOUT_S:-60}"); fi
}

kernel_tests() {
  pytest_opts
  local rc=0
  limited "${LIMIT[kernel-tests]}" "$OUT/kernel_tests.log" "${PY[@]}" -m pytest "${KERNEL_TEST_FILES[@]}" \
    "${PYTEST_OPTS[@]}" || rc=$?
  STAGE_DETAIL=$(closing_line "$OUT/kernel_tests.log")
  return "$rc"
}

cuda_tests() {
  pytest_opts
  local rc=0 f ignore=()
  for f in "${KERNEL_TEST_FILES[@]}"; do ignore+=(--ignore "$f"); done
  limited "${LIMIT[cuda-tests]}" "$OUT/cuda_tests.log" "${PY[@]}" -m pytest tests -m cuda "${ignore[@]}" \
    "${PYTEST_OPTS[@]}" || rc=$?
  STAGE_DETAIL=$(closing_line "$OUT/cuda_tests.log")
  return "$rc"
}

report() {
  # kernel ops first: a time limit then cuts the long rows (toy2d's training), not these
  local rc=0
  limited "${LIMIT[report]}" "$OUT/report.md" "${PY[@]}" benchmarks/gpu_report.py --out "$OUT/rows.json" \
    --only bench_weighted_dice,bench_vae_loss,bench_timestep_embedding,bench_hutchinson,bench_frechet,bench_toy2d \
    || rc=$?
  STAGE_DETAIL="$(grep -c '^| ' "$OUT/report.md" 2>/dev/null || echo 0) table lines"
  return "$rc"
}

# The three tools side by side (each its own process and time limit); one summary line per tool.
sanitizer() {
  local log=$OUT/sanitizer.log tmp tool rc=0 r limit
  if [ -z "$SANITIZER" ]; then
    STAGE_DETAIL="compute-sanitizer not found (PATH, /usr/local/cuda*/bin, /usr/local/cuda*/compute-sanitizer)"
    echo "$STAGE_DETAIL" >> "$log"; return 1
  fi
  limit=${LIMIT[sanitizer]}
  (( $(left) > 3 )) || { STAGE_DETAIL="no time left in BUDGET_S"; return 124; }
  (( $(left) < limit )) && limit=$(left)
  tmp=$(mktemp -d)
  for tool in "${SANITIZER_TOOLS[@]}"; do
    ( rc=0
      timeout -k 5 "$limit" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
        --error-exitcode 3 --print-limit 20 "${PY[@]}" benchmarks/sanitize_kernels.py \
        > "$tmp/$tool.log" 2>&1 || rc=$?
      echo "$rc" > "$tmp/$tool.rc" ) &
  done
  wait
  for tool in "${SANITIZER_TOOLS[@]}"; do
    r=$(cat "$tmp/$tool.rc" 2>/dev/null || echo 1)
    { echo "=== compute-sanitizer --tool $tool (rc=$r)"; cat "$tmp/$tool.log"; } >> "$log"
    local status
    if (( r == 0 )); then status=ok; elif (( r == 124 || r == 137 )); then status=TIMEOUT;
    elif (( r == 3 )); then status="FAILED rc=3 (sanitizer errors)"; else status="FAILED rc=$r"; fi
    echo "sanitizer $tool: $status - $(grep -E 'sanitize_kernels: ' "$tmp/$tool.log" | tail -1)$(grep -E 'ERROR SUMMARY' "$tmp/$tool.log" | tail -1 | sed 's/^=* */; /')" \
      | tee -a "$SUMMARY"
    (( r == 0 )) || rc=$r
  done
  rm -rf "$tmp"
  STAGE_DETAIL="${SANITIZER_TOOLS[*]}: see the lines above and sanitizer.log"
  return "$rc"
}

lift() {
  limited "${LIMIT[lift]}" "$OUT/bench_lift.md" "${PY[@]}" benchmarks/bench_lift.py --device cuda
}

experiments() {
  local rc=0 log=$OUT/bench_experiments.md
  limited 180 "$log" "${PY[@]}" benchmarks/bench_tadiff.py --device cuda --model default --batch 16 || rc=$?
  limited 180 "$log" "${PY[@]}" benchmarks/bench_vae_train.py --device cuda --preset default --batch 32 || rc=$?
  limited 180 "$log" "${PY[@]}" benchmarks/bench_ldm.py --device cuda --preset default --image-size 256 || rc=$?
  # issue 18 item 6 on the GPU: every experiment's step, auto vs DUALDIFF_BACKEND=torch, alternating
  limited 300 "$log" "${PY[@]}" benchmarks/bench_auto_vs_torch.py --device cuda --presets tiny,default \
    --json "$OUT/auto_vs_torch.json" || rc=$?
  return "$rc"
}

stage_fn() { case $1 in kernel-tests) echo kernel_tests ;; cuda-tests) echo cuda_tests ;; *) echo "$1" ;; esac; }

case "$stage" in
  all)
    echo "run_gpu.sh all: results in $OUT" | tee "$SUMMARY"
    plan | tee -a "$SUMMARY"
    if run_stage preflight preflight; then
      if run_stage build build; then
        for s in kernel-tests cuda-tests report sanitizer; do run_stage "$s" "$(stage_fn "$s")" || true; done
      fi
    fi ;;
  build|kernel-tests|cuda-tests|report|sanitizer|lift|experiments)
    echo "run_gpu.sh $stage: results in $OUT" | tee -a "$SUMMARY"
    # RUN_GPU_NO_PREFLIGHT=1 (single stages only) exercises a stage's own logic on a CPU machine:
    # the tests of this script use it; `all` always runs the preflight
    if [ "${RUN_GPU_NO_PREFLIGHT:-0}" = 1 ] || run_stage preflight preflight; then
      run_stage "$stage" "$(stage_fn "$stage")" || true
    fi ;;
  *) echo "usage: bash benchmarks/run_gpu.sh [plan|all|build|kernel-tests|cuda-tests|report|sanitizer|lift|experiments]" >&2
     exit 2 ;;
esac
if (( ${#FAILED[@]} )); then
  echo "run_gpu.sh $stage: FAILED stages: ${FAILED[*]} ($(( $(date +%s) - START )) s; see $SUMMARY)" | tee -a "$SUMMARY"
  exit 1
fi
echo "run_gpu.sh $stage: all stages ok ($(( $(date +%s) - START )) s)" | tee -a "$SUMMARY"
