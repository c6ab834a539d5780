"""Security and filesystem defaults of a container, as CRI-O and containerd give them.

- :data:`CAPABILITIES`: CRI-O's ``default_capabilities`` (its configuration's default list).
  The same sets go to root and to other users, as in CRI-O and containerd: for a
  non-root uid the kernel's execve() leaves effective and permitted empty (no ambient
  capabilities, no file capabilities), so added capabilities reach only root or a
  setuid-root / file-capability program, which ``no_new_privs`` stops.
- :data:`CAPABILITY_NAMES`: every capability name by number (``capabilities(7)``, up to
  ``CAP_CHECKPOINT_RESTORE`` = 40); a kernel knows those up to its
  ``/proc/sys/kernel/cap_last_cap``.
- :data:`MASKED_PATHS` / :data:`READONLY_PATHS`: kubelet's ``DefaultProcMount`` lists, which
  kubelet sends in every CreateContainer of an unprivileged container; CRI-O and containerd
  apply what the request gives, so with kubelet these are their lists too. A request that
  gives none (another client) gets them as well: CRI-O would mask nothing then (its spec
  generator sets no masked paths), containerd its own copy of the same lists.
- :data:`DEVICE_RULES`: the device cgroup of an unprivileged container: deny everything,
  then allow runc's default devices (``specconv.AllowedDevices``, which runc adds to the
  rules of every container, CRI-O's and containerd's alike; written out so the spec says
  what the container gets whatever the runtime); the CRI devices come after.
  Privileged containers: allow everything.
- :data:`MOUNTS`: the mounts of every container (``runc spec``'s defaults, the proc options
  of runtime-tools that CRI-O and containerd start from, and CRI-O's ``/sys/fs/cgroup``).
- :data:`DEFAULT_PATH`: ``PATH`` of a container whose image sets none (containerd's and
  Docker's default).
- :data:`HOST_DEVICE_SKIP_DIRS` / :data:`HOST_DEVICE_SKIP_NAMES`: what runc's
  ``HostDevices`` leaves out when a privileged container gets all of the host's ``/dev``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CAPABILITIES",
    "CAPABILITY_NAMES",
    "DEFAULT_PATH",
    "DEVICE_RULES",
    "HOST_DEVICE_SKIP_DIRS",
    "HOST_DEVICE_SKIP_NAMES",
    "MASKED_PATHS",
    "MOUNTS",
    "READONLY_PATHS",
    "mounts",
]

#: CRI-O's default capabilities (without the ``CAP_`` prefix, as its configuration has them):
#: ``default_capabilities`` of crio.conf(5) (Docker's list without MKNOD, NET_RAW,
#: SYS_CHROOT, SETFCAP and AUDIT_WRITE).
CAPABILITIES: tuple[str, ...] = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "KILL",
)

#: ``CAP_<name>`` by capability number (linux/capability.h).
CAPABILITY_NAMES: tuple[str, ...] = (
    "CAP_CHOWN",  # 0
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",  # 5
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",  # 10
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",  # 15
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",  # 20
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",  # 25
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",  # 30
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",  # 35
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",  # 40
)

#: kubelet's default masked paths (``pkg/securitycontext/util.go`` defaultMaskedPaths, kept
#: in sync with moby's ``oci/defaults.go``; Kubernetes 1.34+ adds /proc/interrupts).
MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

#: kubelet's default read-only paths (``defaultReadonlyPaths`` there; moby's list too).
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: ``linux.resources.devices`` of an unprivileged container before its CRI devices: deny
#: all (runtime-tools' generator, which CRI-O starts from; containerd's default spec), then
#: runc's ``AllowedDevices`` (runc 1.1: mknod of any char or block device, the memory
#: devices, the tty, the console, ptmx and the pty slaves). Major/minor numbers are
#: ``Documentation/admin-guide/devices.txt``.
DEVICE_RULES: tuple[dict[str, Any], ...] = (
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},  # mknod of any char device
    {"allow": True, "type": "b", "access": "m"},  # mknod of any block device
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # /dev/null
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},  # /dev/zero
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},  # /dev/full
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},  # /dev/random
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},  # /dev/urandom
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},  # /dev/tty
    {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},  # /dev/console
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # /dev/ptmx
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},  # /dev/pts/*
)

#: The mounts of every container, unprivileged form (``runc spec``'s defaults and the
#: runtime-tools generator's, which CRI-O starts from). ``/dev/shm`` is not here: it is the
#: pod's (a bind mount of the sandbox's tmpfs, or of the host's for host IPC).
MOUNTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # destination, type, source, options
    ("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    ("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    (
        "/dev/pts",
        "devpts",
        "devpts",
        ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"),
    ),
    ("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    ("/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")),
)

#: Directories of the host's /dev that are not walked for a privileged container's devices
#: (runc's HostDevices), and names that are skipped.
HOST_DEVICE_SKIP_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})
HOST_DEVICE_SKIP_NAMES = frozenset({"console"})


def mounts(*, privileged: bool) -> list[dict[str, Any]]:
    """The default mounts as OCI mount objects; privileged: ``/sys`` and
    ``/sys/fs/cgroup`` read-write (CRI: "any sysfs and procfs mounts are mounted RW")."""
    out: list[dict[str, Any]] = []
    for destination, type_, source, options in MOUNTS:
        opts = list(options)
        if privileged and "ro" in opts:
            opts = [o for o in opts if o != "ro"] + ["rw"]
        out.append({"destination": destination, "type": type_, "source": source, "options": opts})
    return out
