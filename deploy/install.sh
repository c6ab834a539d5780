#!/usr/bin/env bash
# Installs moorage on a Debian 12 node and runs it with its defaults.
#   sudo ./deploy/install.sh            install, then run (under systemd when it is PID 1,
#                                       else in the foreground)
#   sudo ./deploy/install.sh --no-start install only
# Re-running it upgrades the installed copy and restarts the service; config files are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${MOORAGE_PREFIX:-/opt/moorage}
start=1
[ "${1:-}" = "--no-start" ] && start=0

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it installs packages and a system service)" >&2
  exit 1
fi

# Until now install.sh wrote /etc/containers/registries.conf itself, which belongs to
# Debian's golang-github-containers-image package: dpkg would then stop at a conffile
# prompt when that package comes (with skopeo, podman or buildah). A file exactly as we
# wrote it goes, so the package's own takes its place: its one setting (short names go to
# docker.io) is moorage's default, so moorage needs no drop-in in registries.conf.d/.
ours=449203ccfacc4b2252bb980180db3513835bcbe135f703db26c3fc5272f3d601
if ! dpkg -s golang-github-containers-image >/dev/null 2>&1 && [ -f /etc/containers/registries.conf ] &&
   [ "$(sha256sum </etc/containers/registries.conf | cut -d' ' -f1)" = "$ours" ]; then
  rm /etc/containers/registries.conf
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# golang-github-containers-common is Debian's containers-common: /etc/containers/policy.json,
# registries.conf (through golang-github-containers-image) and registries.conf.d/, shared
# with podman, skopeo and buildah. A changed conffile is kept, never asked about.
apt-get install -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  python3 python3-venv runc conmon containernetworking-plugins catatonit iptables iproute2 \
  golang-github-containers-common >/dev/null

# Python packages from the lock's daemon part (exact versions, hashes checked), then
# moorage itself without dependencies.
[ -x "$prefix/bin/python" ] || python3 -m venv "$prefix"
"$prefix/bin/pip" install -q --require-hashes -r "$here/requirements-daemon.lock"
"$prefix/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall "$here"
ln -sf "$prefix/bin/moorage" /usr/local/bin/moorage
# Record the commit for `moorage version` (the installed copy is not a git checkout).
pkg=$("$prefix/bin/python" -c 'import moorage, os; print(os.path.dirname(moorage.__file__))')
git -C "$here" rev-parse HEAD > "$pkg/COMMIT" 2>/dev/null || rm -f "$pkg/COMMIT"

install -d -m 0755 /etc/moorage /etc/moorage/moorage.d
if [ ! -e /etc/moorage/moorage.toml ]; then
  install -m 0644 "$here/deploy/config/moorage.toml" /etc/moorage/moorage.toml
fi
[ -e /etc/crictl.yaml ] || install -m 0644 "$here/deploy/config/crictl.yaml" /etc/crictl.yaml

# A bridge network for pods, as CRI-O's packages ship one, unless a CNI config exists.
install -d -m 0755 /etc/cni/net.d
if ! ls /etc/cni/net.d/*.conf /etc/cni/net.d/*.conflist /etc/cni/net.d/*.json >/dev/null 2>&1; then
  install -m 0644 "$here"/deploy/config/cni/* /etc/cni/net.d/
fi

if [ -d /run/systemd/system ]; then
  install -m 0644 "$here/deploy/systemd/moorage.service" /etc/systemd/system/moorage.service
  systemctl daemon-reload
  if [ "$start" = 1 ]; then
    # A re-run restarts the daemon on the new code; containers keep running (KillMode).
    systemctl enable moorage.service
    systemctl restart moorage.service
    systemctl --no-pager status moorage.service | head -5
  fi
elif [ "$start" = 1 ]; then
  echo "moorage: no systemd here; running in the foreground (Ctrl-C stops it)"
  exec "$prefix/bin/moorage"
fi
