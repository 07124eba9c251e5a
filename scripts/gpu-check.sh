#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA device and no network (under 5 minutes): installs the wheels
# in .whl/ (scripts/gpu-wheels.sh) beside the image's torch, runs the CUDA tests, and benchmarks
# random-weight models of real geometries, fetched from 4 warm edges into GPU memory. Results go to
# $OUT (default gpu-check-out/): gpu-tests.txt and bench.md (one table per geometry and codec).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-gpu-check-out}")
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# Run outside the checkout: its kvcdn/ folder (the core alone) would shadow the installed package.
run=$(mktemp -d)
cp -r tests pyproject.toml "$run/" && mkdir -p "$run/kvcdn" && cp -r kvcdn/samples "$run/kvcdn/"
cd "$run" && rm -f kvcdn/samples/__init__.py
export PYTHONPATH=/tmp/site:$run PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L || true
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
bench() {  # GEOMETRY CODEC LENGTHS [more bench flags]
  timeout 150 python3 -m kvcdn loadtest bench --geometry "$1" --edges 4 --codecs "$2" --lengths "$3" \
    --streams-per-run 2 "${@:4}" --repeats 3 --device cuda --markdown 2>&1 | grep -v "it/s\]" | tee -a "$OUT/bench.md"
}
bench qwen3-4b raw 1024,3774,16384  # the crossover: from which length fetching beats the GPU's prefill
bench qwen3-4b int8 3774  # half the bytes on the wire and over PCIe, decoded by torch on the GPU
bench qwen3-4b fp8 3774
bench llama3.1-8b raw 3774,16384
