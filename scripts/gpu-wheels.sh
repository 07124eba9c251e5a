#!/usr/bin/env bash
# Fetch, on a machine with a package index, the Python 3.12 wheels a GPU machine without network needs
# to run `make gpu-check`, into .whl/ (about 35 MB), and build kvcdn's own wheel there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
rm -rf "$out" && mkdir -p "$out"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^#' scripts/gpu-wheels.txt | while read -r req; do
  [ -n "$req" ] || continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" "$req"
done
python3 -m pip wheel -q --no-deps -w "$out" .
du -sh "$out"
