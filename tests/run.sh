#!/usr/bin/env bash
# Runs the whole test suite on a Debian 12 machine as root, installing what it needs:
#   sudo ./tests/run.sh [pytest args]
#   sudo ./tests/run.sh --install-only      (what Dockerfile.test does at build time)
# The integration tests use the real things: runc, overlayfs, a registry server
# (Debian's docker-registry) on loopback, images built from busybox-static.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/run.sh: run as root (the tests mount, chroot and start registries)" >&2
  exit 1
fi
need=()
for pkg in python3-venv runc conmon containernetworking-plugins docker-registry busybox-static \
           apache2-utils catatonit iptables iproute2 util-linux criu \
           golang-go golang-github-docker-spdystream-dev \
           golang-github-gorilla-websocket-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The Debian package starts a registry on port 5000 where an init system runs it; the tests
# start their own on free loopback ports and need none.

venv=${MOORAGE_TEST_VENV:-$here/.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# Every Python package comes from the lock (exact versions, hashes checked), so every machine
# tests with the same ones; the package itself is installed editable on top, without
# dependencies. Only a change of the lock or of pyproject.toml needs pip again (and the
# network), so a second run, or one in the Dockerfile.test image, starts testing at once.
stamp="$venv/.moorage-lock.sha256"
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/pip" install -q --require-hashes -r requirements.lock
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
  echo "$want" >"$stamp"
fi
if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi

status=0
"$venv/bin/ruff" check src tests || status=1
"$venv/bin/mypy" || status=1
"$venv/bin/pytest" -q -ra "$@" || status=$?
exit $status
