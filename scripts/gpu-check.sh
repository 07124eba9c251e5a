#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA device and no network (at most 8 minutes, its timeouts
# added up; TUNE: 4 more; not yet timed as it stands): installs the wheels in .whl/
# (scripts/gpu-wheels.sh) beside the image's torch, runs the CUDA tests, and benchmarks
# random-weight models of real geometries, fetched from 4 warm edges into GPU memory. Results go to
# $OUT (default gpu-check-out/): gpu-tests.txt, bench.md (a table per bench: a row per length and
# codec) and progress.txt (each row's line as soon as it is measured, so a bench that runs past its
# timeout still leaves the rows it measured).
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
bench() {  # TIMEOUT GEOMETRY CODECS LENGTHS [more bench flags]; each row also logged to progress.txt
  echo "## $(date -u +%T) bench ${*:2}" | tee -a "$OUT/progress.txt" >> "$OUT/bench.md"
  timeout "$1" python3 -m kvcdn loadtest bench --geometry "$2" --edges 4 --codecs "$3" --each-codec --lengths "$4" \
    "${@:5}" --repeats 3 --device cuda --markdown 2> >(grep --line-buffered -v "it/s\]" | tee -a "$OUT/progress.txt" >&2) \
    | tee -a "$OUT/bench.md"
}
# Every codec at three lengths (one cluster, one model load): from which length fetching beats the
# GPU's own prefill, and what half (int8, fp8) or a quarter (int4) of the bytes gains.
bench 150 qwen3-4b raw,int8,fp8,int4 1024,3774,16384
bench 90 llama3.1-8b raw 3774,16384
if [ "${1:-}" = tune ]; then  # `make gpu-check TUNE=1`: what chose the defaults, each against the first bench's row
  bench 75 qwen3-4b raw 3774 --primary-only  # blocks from their primary owners, not spread over both
  bench 75 qwen3-4b raw 3774 --streams-per-run 1  # one stream an edge (the default from 8 cores on: 2)
  bench 75 qwen3-4b raw 3774 --frame-bytes 3MiB  # a third of the frames (the default: 1 MiB)
fi
bench 120 qwen3-4b raw 32768  # the bundled texts over again; last, so that a slow one costs no other row
echo "## $(date -u +%T) done" | tee -a "$OUT/progress.txt" >> "$OUT/bench.md"
