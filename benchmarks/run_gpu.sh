#!/usr/bin/env bash
# The GPU measurements on a CUDA machine (e.g. the lent H100), in stages that each fit in one
# 10-minute device call (the machine keeps the install between calls while it stays warm):
#
#   bash benchmarks/run_gpu.sh build    # pip install the extension with the CUDA kernels
#   bash benchmarks/run_gpu.sh tests    # the cuda-marked tests, then the whole suite
#   bash benchmarks/run_gpu.sh report   # gpu_report.py: the kernel ops (issue 2) and toy2d (issue 5)
#   bash benchmarks/run_gpu.sh lift     # bench_lift.py: heatmap cell, training step, heatmap,
#                                       # generation with the default 58.5 M model (issue 4)
#   bash benchmarks/run_gpu.sh          # all four in order
#
# Results go to ${OUT:-gpu-results}/. pytorch-fid is optional there: put its wheel in .whl/
# (git-ignored) to include its tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
stage=${1:-all}

build() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  } 2>&1 | tee "$OUT/env.txt"
  if ls .whl/*.whl >/dev/null 2>&1; then pip install --no-deps --no-index .whl/*.whl 2>&1 | tail -1; fi
  pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  (cd /tmp && python -m dualdiff info) | tee "$OUT/info.txt"
}
tests() {
  pytest tests -x -q -m "cuda" -p no:cacheprovider --import-mode=importlib 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
  pytest tests -q -p no:cacheprovider --import-mode=importlib 2>&1 | tail -15 | tee "$OUT/all_tests.txt"
}
report() {
  python benchmarks/gpu_report.py --skip bench_lift --out "$OUT/gpu_report.json" 2>&1 | tee "$OUT/gpu_report.md"
}
lift() {
  python benchmarks/bench_lift.py --device cuda 2>&1 | tee "$OUT/bench_lift.md"
}
case "$stage" in
  build) build ;;
  tests) tests ;;
  report) report ;;
  lift) lift ;;
  all) build && tests && report && lift ;;
  *) echo "usage: bash benchmarks/run_gpu.sh [build|tests|report|lift|all]" >&2; exit 2 ;;
esac
