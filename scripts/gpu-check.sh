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
bench() {  # TIMEOUT GEOMETRY CODEC LENGTHS [more bench flags]
  echo "## $(date -u +%T) bench ${*:2}" >> "$OUT/bench.md"
  timeout "$1" python3 -m kvcdn loadtest bench --geometry "$2" --edges 4 --codecs "$3" --lengths "$4" \
    "${@:5}" --repeats 3 --device cuda --markdown 2>&1 | grep -v "it/s\]" | tee -a "$OUT/bench.md"
}
# From which length fetching beats the GPU's own prefill (32,768: the bundled texts over again).
bench 200 qwen3-4b raw 1024,3774,16384,32768
bench 100 qwen3-4b int8 3774  # half the bytes on the wire and over PCIe, decoded by torch on the GPU
if [ "${1:-}" = tune ]; then  # `make gpu-check TUNE=1`: what chose the defaults, each against the row above
  bench 100 qwen3-4b raw 3774 --primary-only  # blocks from their primary owners, not spread over both
  bench 100 qwen3-4b raw 3774 --streams-per-run 1  # one stream an edge (the default from 8 cores on: 2)
  bench 100 qwen3-4b raw 3774 --frame-bytes 4MiB  # a quarter of the frames (the default: 1 MiB)
fi
bench 100 qwen3-4b fp8 3774
bench 100 qwen3-4b int4 3774
bench 150 llama3.1-8b raw 3774,16384
echo "## $(date -u +%T) done" >> "$OUT/bench.md"
