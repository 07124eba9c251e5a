#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA device and no network: installs the wheels in .whl/
# (scripts/gpu-wheels.sh) beside the image's torch, then runs scripts/gpu-check.plan's steps, each
# under its timeout (at most 290 s in all; TUNE: 180 more): the CUDA tests, then benchmarks of
# random-weight models of real geometries, fetched from 4 warm edges into GPU memory. Results go to
# $OUT (default gpu-check-out/): gpu-tests.txt, bench.md (a table per geometry and codec, a row per
# length), bench-N.json (the rows), progress.txt (each row's line as soon as it is measured). A
# bench stopped by its timeout prints the tables of the rows it measured by then.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-gpu-check-out}")
mkdir -p "$OUT"
plan=$(realpath "${PLAN:-scripts/gpu-check.plan}")  # PLAN: another plan (a rehearsal on a CPU)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# Run outside the checkout: its kvcdn/ folder (the core alone) would shadow the installed package.
run=$(mktemp -d)
cp -r tests pyproject.toml "$run/" && mkdir -p "$run/kvcdn" && cp -r kvcdn/samples "$run/kvcdn/"
cd "$run" && rm -f kvcdn/samples/__init__.py
export PYTHONPATH=/tmp/site:$run PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L || true
started=$(date +%s)
n=0
while read -r step limit flags <&3; do  # fd 3: the steps themselves read stdin
  case "$step" in
    tests)
      timeout -k 10 "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt" ;;
    bench|tune)
      [ "$step" = tune ] && [ "${1:-}" != tune ] && continue
      n=$((n + 1))
      echo "## $(date -u +%T) bench $flags" | tee -a "$OUT/progress.txt" >> "$OUT/bench.md"
      # shellcheck disable=SC2086  # the plan's flags are words
      timeout -k 20 "$limit" python3 -m kvcdn loadtest bench $flags --markdown --json "$OUT/bench-$n.json" \
        2> >(grep --line-buffered -v "it/s\]" | tee -a "$OUT/progress.txt" >&2) | tee -a "$OUT/bench.md" ;;
    *) ;;  # comments and blank lines
  esac
done 3< <(grep -v '^\s*#' "$plan")
echo "## $(date -u +%T) done in $(( $(date +%s) - started )) s" | tee -a "$OUT/progress.txt" >> "$OUT/bench.md"
