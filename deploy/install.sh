#!/usr/bin/env bash
# Installs moorage on a Debian 12 node and runs it with its defaults.
#   sudo ./deploy/install.sh            install, then run (under systemd when it is PID 1,
#                                       else in the foreground)
#   sudo ./deploy/install.sh --no-start install only
# Re-running it upgrades the installed copy; existing config files are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${MOORAGE_PREFIX:-/opt/moorage}
start=1
[ "${1:-}" = "--no-start" ] && start=0

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it installs packages and a system service)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq python3 python3-venv runc conmon containernetworking-plugins \
  catatonit iptables iproute2 >/dev/null

python3 -m venv "$prefix"
"$prefix/bin/pip" install -q --upgrade pip
"$prefix/bin/pip" install -q "$here"
ln -sf "$prefix/bin/moorage" /usr/local/bin/moorage
# Record the commit for `moorage version` (the installed copy is not a git checkout).
pkg=$("$prefix/bin/python" -c 'import moorage, os; print(os.path.dirname(moorage.__file__))')
git -C "$here" rev-parse HEAD > "$pkg/COMMIT" 2>/dev/null || rm -f "$pkg/COMMIT"

install -d -m 0755 /etc/moorage /etc/moorage/moorage.d
if [ ! -e /etc/moorage/moorage.toml ]; then
  install -m 0644 "$here/deploy/config/moorage.toml" /etc/moorage/moorage.toml
fi
[ -e /etc/crictl.yaml ] || install -m 0644 "$here/deploy/config/crictl.yaml" /etc/crictl.yaml
if [ ! -e /etc/containers/registries.conf ]; then
  install -d -m 0755 /etc/containers
  install -m 0644 "$here/deploy/config/registries.conf" /etc/containers/registries.conf
fi
# Every pull is checked against the signature policy; without one pulls fail (as in
# CRI-O). Debian's containers-common ships this same accept-anything default.
if [ ! -e /etc/containers/policy.json ]; then
  install -D -m 0644 "$here/deploy/config/policy.json" /etc/containers/policy.json
fi

# A bridge network for pods, as CRI-O's packages ship one, unless a CNI config exists.
install -d -m 0755 /etc/cni/net.d
if ! ls /etc/cni/net.d/*.conf /etc/cni/net.d/*.conflist /etc/cni/net.d/*.json >/dev/null 2>&1; then
  install -m 0644 "$here"/deploy/config/cni/* /etc/cni/net.d/
fi

if [ -d /run/systemd/system ]; then
  install -m 0644 "$here/deploy/systemd/moorage.service" /etc/systemd/system/moorage.service
  systemctl daemon-reload
  if [ "$start" = 1 ]; then
    systemctl enable --now moorage.service
    systemctl --no-pager status moorage.service | head -5
  fi
elif [ "$start" = 1 ]; then
  echo "moorage: no systemd here; running in the foreground (Ctrl-C stops it)"
  exec "$prefix/bin/moorage"
fi
