#!/bin/bash
# The node lane inside the VM: moorage-lane.service runs this after boot (tests/vm/image.py).
# It installs moorage with deploy/install.sh as the README says (the packages come from
# the image's local apt repository and wheelhouse: the VM has no network), then runs
# tests/node once per cgroup driver against the installed service, writes the results as
# a tar archive onto /dev/vdc for the host, and powers the VM off.
set -uo pipefail
src=/root/moorage
out=/var/tmp/lane-results
rm -rf "$out" && mkdir -p "$out"
summary=$out/summary.txt

note() {
  echo "[node] $*"
  echo "$*" >>"$summary"
}

finish() {
  journalctl -u moorage --no-pager -o short-monotonic >"$out/moorage.journal" 2>&1
  echo "$1" >"$out/status"
  tar -C "$out" -cf /dev/vdc . && sync
  systemctl poweroff --no-block
  exit 0
}

secs() { echo $((SECONDS - $1)); }

note "kernel $(uname -r); cgroup filesystem: $(stat -fc %T /sys/fs/cgroup)" \
     "(controllers: $(cat /sys/fs/cgroup/cgroup.controllers))"
note "init: $(cat /proc/1/comm);" \
     "$(systemctl --version | head -1)"

# Some swap, so that memory.swap.max and the swap stats mean something.
if fallocate -l 256M /swapfile && chmod 600 /swapfile && mkswap -q /swapfile \
   && swapon /swapfile; then
  note "swap: 256 MiB"
fi

cd "$src" || finish 1
began=$SECONDS
echo "== deploy/install.sh (offline: a local apt repository and a wheelhouse) =="
# Traced (the host stamps each line with the time). pip finds its packages in the image's
# wheelhouse, and leaves byte-compiling to the first import (software emulation is slow:
# most of the packages' modules are never imported).
if ! PIP_NO_INDEX=1 PIP_FIND_LINKS=/srv/moorage-wheels PIP_NO_COMPILE=1 \
     bash -x ./deploy/install.sh; then
  note "deploy/install.sh FAILED"
  finish 1
fi
note "deploy/install.sh: $(secs "$began") s; moorage.service" \
     "$(systemctl show -P ActiveState moorage) (Type=$(systemctl show -P Type moorage)," \
     "$(/opt/moorage/bin/moorage version 2>/dev/null | head -1))"
note "runc: $(runc --version | head -1); crun: $(crun --version | head -1)"

status=0
# Each part: a name, the environment of its tests, the tests. The node parts reconfigure
# the installed service for a cgroup driver (tests/node/conftest.py); the replay of kubelet's
# recorded requests runs its own hermetic test daemon beside that service, with each driver.
parts=(
  "systemd|MOORAGE_NODE_LANE=systemd|tests/node"
  "cgroupfs|MOORAGE_NODE_LANE=cgroupfs|tests/node/test_cgroups.py tests/node/test_stats.py"
  "replay|MOORAGE_TEST_CGROUP_DRIVER=systemd,cgroupfs|tests/e2e/test_kubelet_replay.py"
)
for part in "${parts[@]}"; do
  IFS='|' read -r name setting files <<<"$part"
  began=$SECONDS
  echo "== part: $name ($setting) =="
  # shellcheck disable=SC2086
  env "$setting" /opt/moorage-lane/bin/python -m pytest -p no:cacheprovider \
    -q -ra --junitxml="$out/$name.xml" $files 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s' \
         "$out/$name.log" | tail -1 | tr -d '=' | xargs)
  note "part '$name' ($setting): ${line:-no pytest summary} (exit $rc, $(secs "$began") s)"
  [ "$rc" -eq 0 ] || status=1
done
finish "$status"
