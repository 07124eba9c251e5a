#!/usr/bin/env bash
# Build kvcdn's CPU image with buildah (no Docker daemon, no registry needed), then run an origin and
# an edge from it and fetch a cache through them with the host's `kvcdn` (make install model first).
#
#   sudo deploy/docker/check.sh          # `make image-check`; needs root, buildah and (without BASE) debootstrap
#
# BASE: an image with Python 3.11+ as python3 (default: a Debian bookworm root filesystem made here
# with debootstrap, from Debian's mirror). TORCH_INDEX / TORCH_FIND_LINKS: where torch's CPU wheel comes
# from (default: download.pytorch.org; with a local wheel folder in /opt/wheels, that folder served on
# loopback and PyPI for the rest). Ports 17070/17080 on 127.0.0.1 must be free.
set -euo pipefail
cd "$(dirname "$0")/../.."
KVCDN=${KVCDN:-.venv/bin/kvcdn}
MODELS=${KVCDN_MODELS_DIR:-$HOME/.cache/kvcdn/models}
B=(buildah --storage-driver vfs)
RUN=("${B[@]}" run --isolation chroot --network host -v "$MODELS:/models:ro")
WORK=$(mktemp -d /tmp/kvcdn-image.XXXXXX)
PIDS=()
CONTAINERS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for c in "${CONTAINERS[@]}"; do "${B[@]}" rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${BASE:-}" ]; then
  echo "== base: Debian bookworm (minbase, python3, python3-venv) by debootstrap"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log"
  # A TLS-inspecting proxy's CA, where this machine trusts one: the build's pip goes through it.
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/"
    chroot "$WORK/rootfs" update-ca-certificates >/dev/null
  fi
  rm -f "$WORK"/rootfs/var/cache/apt/archives/*.deb
  mkdir "$WORK/base" && tar -C "$WORK/rootfs" -cf "$WORK/base/rootfs.tar" .
  printf 'FROM scratch\nADD rootfs.tar /\n' >"$WORK/base/Containerfile"
  "${B[@]}" bud --isolation chroot --quiet -t localhost/kvcdn-base:bookworm -f "$WORK/base/Containerfile" "$WORK/base" >/dev/null
  BASE=localhost/kvcdn-base:bookworm
fi

ARGS=(--build-arg "BASE=$BASE")
if [ -z "${TORCH_INDEX:-}" ] && ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
  python3 -m http.server 8731 --bind 127.0.0.1 --directory /opt/wheels >"$WORK/wheels.log" 2>&1 &
  PIDS+=($!)
  ARGS+=(--build-arg TORCH_INDEX=https://pypi.org/simple --build-arg TORCH_FIND_LINKS=http://127.0.0.1:8731/)
elif [ -n "${TORCH_INDEX:-}" ]; then
  ARGS+=(--build-arg "TORCH_INDEX=$TORCH_INDEX" --build-arg "TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-}")
fi
echo "== image: deploy/docker/Dockerfile on $BASE"
start=$(date +%s)
"${B[@]}" bud --isolation chroot --network host --format docker --quiet "${ARGS[@]}" -f deploy/docker/Dockerfile -t localhost/kvcdn:cpu . >"$WORK/build.log"
"${B[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' localhost/kvcdn:cpu
echo "built in $(($(date +%s) - start)) s"

echo "== the image runs as uid 10001, with no model inside"
c=$("${B[@]}" from localhost/kvcdn:cpu)
CONTAINERS+=("$c")
"${B[@]}" run --isolation chroot "$c" -- sh -c 'id -u; ls /models | wc -l'

echo "== an origin and an edge from the image; the host publishes and fetches through them"
"${RUN[@]}" "$c" -- kvcdn origin --listen 127.0.0.1:17070 --store /var/lib/kvcdn/store --bulk-port -1 >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
e=$("${B[@]}" from localhost/kvcdn:cpu)
CONTAINERS+=("$e")
"${RUN[@]}" "$e" -- kvcdn edge --listen 127.0.0.1:17080 --origin 127.0.0.1:17070 --bulk-port -1 >"$WORK/edge.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do "$KVCDN" health 127.0.0.1:17070 >/dev/null 2>&1 && break; sleep 1; done
for _ in $(seq 60); do "$KVCDN" health 127.0.0.1:17080 >/dev/null 2>&1 && break; sleep 1; done
# The image's own HEALTHCHECK command, run inside it, against each server.
"${B[@]}" run --isolation chroot --network host --env KVCDN_HEALTH=127.0.0.1:17070 "$c" -- \
  /bin/sh -c 'exec kvcdn health "$KVCDN_HEALTH" $KVCDN_HEALTH_FLAGS'
"${B[@]}" run --isolation chroot --network host --env KVCDN_HEALTH=127.0.0.1:17080 "$e" -- \
  /bin/sh -c 'exec kvcdn health "$KVCDN_HEALTH" $KVCDN_HEALTH_FLAGS'
env -u KVCDN_TRUST -u KVCDN_TOKEN_FILE -u KVCDN_TLS_CERT -u KVCDN_TLS_KEY -u KVCDN_TLS_CA \
  "$KVCDN" publish --origin 127.0.0.1:17070 kvcdn/samples/mpl-2.0.txt
env -u KVCDN_TRUST -u KVCDN_TOKEN_FILE -u KVCDN_TLS_CERT -u KVCDN_TLS_KEY -u KVCDN_TLS_CA \
  "$KVCDN" ask --edges 127.0.0.1:17080 --doc kvcdn/samples/mpl-2.0.txt --question "Who is the license steward?" \
  --verify --json | grep -E '"(kv_bit_identical|exact|cached_tokens)"'
echo "image check passed"
