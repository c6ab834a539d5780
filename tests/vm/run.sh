#!/usr/bin/env bash
# The node lane: boots a Debian 12 VM (systemd as PID 1, cgroup v2), installs moorage in it
# with deploy/install.sh, and runs tests/node there through the service's CRI socket.
#   sudo ./tests/vm/run.sh
# The exit status is the lane's. The node image is cached by a hash of its inputs in
# $MOORAGE_VM_CACHE (default /var/cache/moorage-vm); docs/node.md tells the rest.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/vm/run.sh: run as root (debootstrap and chroot build the node image)" >&2
  exit 1
fi
need=()
for pkg in qemu-system-x86 debootstrap e2fsprogs python3-venv; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
exec python3 "$here/tests/vm/lane.py" "$@"
