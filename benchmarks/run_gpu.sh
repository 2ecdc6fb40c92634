#!/usr/bin/env bash
# One command for a CUDA machine (e.g. the lent H100): build the extension with the CUDA
# kernels against the torch already installed, run the GPU tests and the GPU report.
# Results go to ${OUT:-gpu-results}/. Usage: bash benchmarks/run_gpu.sh
# pytorch-fid is optional there: put its wheel in .whl/ (git-ignored) to include its tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if ls .whl/*.whl >/dev/null 2>&1; then pip install --no-deps --no-index .whl/*.whl 2>&1 | tail -1; fi
pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
(cd /tmp && python -m dualdiff info) | tee "$OUT/info.txt"
pytest tests -x -q -m "cuda" -p no:cacheprovider --import-mode=importlib 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
pytest tests -q -p no:cacheprovider --import-mode=importlib 2>&1 | tail -15 | tee "$OUT/all_tests.txt"
python benchmarks/gpu_report.py --out "$OUT/gpu_report.json" 2>&1 | tee "$OUT/gpu_report.md"
