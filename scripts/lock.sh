#!/usr/bin/env bash
# Makes requirements.lock, the one lock of every Python package the daemon, the tests and the
# build install, from pyproject.toml's ranges: exact versions with the sha256 hashes of every
# file of each version (uv's universal resolution for Python 3.11, so one lock serves every
# platform). requirements-daemon.lock is the daemon's part of it, with the same versions and
# hashes, for deploy/install.sh. Then the CRI stubs are made again with the locked
# grpcio-tools, which tests/unit/test_generated.py compares against.
#   scripts/lock.sh              add what pyproject.toml gained, keeping every other pin
#   scripts/lock.sh --upgrade    every package to the newest release its range allows
# Installing needs only pip: `pip install --require-hashes -r requirements.lock`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
uv_version=0.13.10  # the lock tool, pinned so that a lock is made the same way everywhere
upgrade=()
[ "${1:-}" = "--upgrade" ] && upgrade=(--upgrade)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/tool"
"$work/tool/bin/pip" install -q "uv==$uv_version"
compile=("$work/tool/bin/uv" pip compile --quiet --universal --python-version 3.11
         --generate-hashes --no-header)
# The build backend comes from the lock too: installs use --no-build-isolation.
"$work/tool/bin/python" - >"$work/build.in" <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PY

header() {
  printf '# %s\n# Made by scripts/lock.sh (uv %s) from pyproject.toml: do not edit by hand.\n' \
    "$1" "$uv_version"
}
# uv names the temp file of the build requirements: name their source instead, so that a
# lock made again from the same inputs is the same file.
stable() { sed -E "s|-r $work/build.in\$|pyproject.toml [build-system] requires|" "$1"; }
[ -f requirements.lock ] && cp requirements.lock "$work/all.txt"
"${compile[@]}" "${upgrade[@]}" pyproject.toml "$work/build.in" --extra test -o "$work/all.txt"
{ header "The one lock: every Python package the daemon, the tests and the build install."
  stable "$work/all.txt"; } >requirements.lock
"${compile[@]}" pyproject.toml "$work/build.in" -c requirements.lock -o "$work/daemon.txt"
{ header "The daemon's part of requirements.lock (same versions and hashes): deploy/install.sh."
  stable "$work/daemon.txt"; } >requirements-daemon.lock

# The stubs, made with the locked grpcio-tools and protobuf.
"$work/tool/bin/python" - "$work/gen.txt" <<'PY'
import re, sys
wanted = {"grpcio", "grpcio-tools", "protobuf", "setuptools"}
blocks, keep = [], False
for line in open("requirements.lock"):
    m = re.match(r"([A-Za-z0-9_.-]+)==", line)
    if m:
        keep = m.group(1).lower() in wanted
    if keep and not line.lstrip().startswith("#"):
        blocks.append(line)
open(sys.argv[1], "w").write("".join(blocks))
PY
python3 -m venv "$work/gen"
"$work/gen/bin/pip" install -q --require-hashes --no-deps -r "$work/gen.txt"
PYTHON="$work/gen/bin/python" scripts/gen-proto.sh
git --no-pager diff --stat -- requirements.lock requirements-daemon.lock src/moorage/cri || true
