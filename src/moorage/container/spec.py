"""The OCI runtime spec (``config.json``) of a container, from its CRI ContainerConfig, its
image's config, its pod sandbox and the runtime's security defaults.

What goes where, and where it comes from (CRI-O's ``server/container_create_linux.go`` and
containerd's ``internal/cri/opts``, unless said otherwise):

``process.args``
    Kubernetes' rules: ``command`` replaces the image's Entrypoint, and when ``command`` is
    given the image's Cmd is ignored; ``args`` replace Cmd. So the argv is ``command +
    args`` when ``command`` is set, else ``Entrypoint + (args or Cmd)``. An Entrypoint of
    ``[""]`` counts as none (containerd). Nothing at all: InvalidArgument "no command
    specified".
``process.env``
    ``PATH`` (default), ``HOSTNAME`` (the pod's) and ``TERM=xterm`` (tty) first, then the
    image's Env, then the CRI envs, then ``extra_env``: a later value of a key replaces an
    earlier one where that one was; ``HOME`` (the resolved user's) is added when still
    absent. CRI env values are bytes; they must be UTF-8: JSON carries text, and a lone
    surrogate (Python's ``surrogateescape``) would reach runc, a Go program, as U+FFFD, so a
    non-UTF-8 value is refused (InvalidArgument naming the key) rather than changed. A key
    may not be empty or hold ``=``; no NUL anywhere.
``process.cwd``
    CRI ``working_dir`` (must be absolute), else the image's WorkingDir (made absolute),
    else ``/``.
``process.user``
    From :func:`moorage.container.users.resolve_user`. No umask: runc's default is 0022,
    which is CRI-O's default.
``process.capabilities``
    CRI-O's semantics: the default list, or all capabilities when ``add_capabilities`` has
    ``ALL``, or none when ``drop_capabilities`` has ``ALL`` (even with add ALL); then the
    named adds, the ambient adds, and the named drops (a drop removes from every set).
    "All capabilities" are those of this kernel (up to ``/proc/sys/kernel/cap_last_cap``)
    that the daemon holds itself (as containerd's ``WithAllCurrentCapabilities``): runc
    cannot grant one it lacks ("unable to apply caps: operation not permitted"), which
    happens where the daemon runs with a reduced bounding set. Names with or without
    ``CAP_``, any case; an unknown name is an InvalidArgument, an add of one that is not
    available here a FailedPrecondition. The result goes into bounding, effective and
    permitted; inheritable and ambient hold only ``add_ambient_capabilities`` (the kernel
    raises an ambient capability only when it is also inheritable and permitted).
    Inheritable is otherwise empty (CVE-2022-27652). The sets are the same for any user, as
    CRI-O and containerd send them: for a non-root uid the kernel's execve() leaves
    effective and permitted empty, except ambient capabilities and file capabilities of the
    program.
``privileged``
    All capabilities (above); every device of the host's ``/dev`` (walked as runc's
    HostDevices) plus the CRI devices; the device cgroup allows everything; no masked or
    read-only paths; ``/sys`` and ``/sys/fs/cgroup`` read-write; no seccomp or AppArmor; no
    cgroup namespace (containerd). Capability adds and drops are ignored (CRI: they "MAY
    have no effect"), ambient ones are kept. The pod must be privileged too (CRI).
``linux.namespaces``
    network, ipc, uts: the sandbox's pinned paths; None means the host's (the namespace is
    left out). pid by the container's ``pid_mode``: CONTAINER a new one, POD the sandbox's
    (InvalidArgument when the pod has none), NODE the host's, TARGET the ``target_pid_ns``
    path the caller found for ``target_id`` (InvalidArgument when not given). mount always
    new; cgroup new on cgroup v2 for unprivileged containers.
    user: the pod's pinned user namespace (first in the list), with ``linux.uidMappings`` /
    ``gidMappings`` set to the pod's mappings (runc 1.1 wants them even to join by path).
    Capabilities are then the user namespace's. A CRI mount with ``uidMappings`` must
    arrive prepared (the container manager makes the idmapped mount; runc 1.1 has none).
``mounts``
    The defaults (:mod:`moorage.container.defaults`), the pod's ``/dev/shm`` (its tmpfs, or
    the host's ``/dev/shm`` for host IPC), ``/etc/hostname``, ``/etc/hosts`` and
    ``/etc/resolv.conf`` bound from the sandbox's files (read-only when the rootfs is), then
    the CRI mounts: ``rbind`` with ``rprivate``/``rslave``/``rshared`` and ``ro``/``rw``/``rro``.
    A CRI mount replaces a default or pod mount of the same path (and a CRI ``/dev`` or
    ``/sys`` replaces everything below it). ``rslave`` needs the host path's mount to be
    shared or a slave, ``rshared`` needs it shared (read from ``/proc/self/mountinfo``), and
    they set ``linux.rootfsPropagation``. ``rro`` needs ``readonly``, private propagation,
    and a handler that has it (``SpecOptions.rro_supported``: the kernel's
    ``mount_setattr`` and the runtime's ``rro``); each is checked first, an InvalidArgument
    naming ``recursive_read_only`` (CRI-O and containerd refuse the same). The host path must
    exist (kubelet creates what it mounts); symbolic links in it are resolved.
    ``selinux_relabel`` is ignored (no SELinux support). An image volume (CRI ``image``)
    arrives mounted by the container manager (its host path set): a bind with ``ro``,
    ``nosuid`` and ``nodev``, private, whatever propagation and ``recursive_read_only``
    say. All mounts are sorted by the depth of their container
    path (stable), so parents come first.
``linux.devices`` / ``linux.resources.devices``
    Each CRI device: type, major, minor, mode and owner from ``stat`` of the host path
    (symbolic links followed); a directory gives every device below it (CRI-O). The device
    cgroup (:data:`defaults.DEVICE_RULES`) denies everything, allows mknod of any device
    and the standard devices (null, zero, full, random, urandom, tty, console, ptmx, pts:
    runc's own defaults, written out), then each CRI device with its permissions.
``linux.resources``
    CPU shares, quota, period, cpuset; memory limit and swap in runc's v1 semantics (swap =
    memory + swap; runc converts for v2 itself), swap = limit when unset and the host
    accounts swap (no swap use by default: containerd, CRI-O), and none without swap
    accounting; hugepage limits; pids; ``unified``. What the node cannot enforce is shaped
    by :meth:`moorage.sandbox.cgroups.Layout.fit` for the pod's cgroup (hugepage limits
    without hugetlb dropped, ``unified`` dropped on v1, ...), as for pod cgroups.
    ``process.oomScoreAdj`` always set, raised to the daemon's own value when
    ``restrict_oom_score_adj`` (containerd).
``linux.cgroupsPath``
    :func:`cgroups_path`.
``linux.seccomp``
    :mod:`moorage.container.seccomp`: ``RuntimeDefault`` is the configured default profile
    (``SpecOptions.seccomp_profile``, else the built-in one), ``Localhost`` the profile in
    the file ``localhost_ref`` names (NotFound / InvalidArgument naming it when missing or
    invalid), rendered for the container's bounding capabilities (``CAP_SYS_ADMIN``
    unlocks mount, unshare...). ``Unconfined``: none. A request that names no profile is
    unconfined, or RuntimeDefault with ``seccomp_use_default_when_empty``. On a kernel
    without seccomp, RuntimeDefault and nothing mean none and Localhost is a
    FailedPrecondition (CRI-O).
``process.apparmorProfile``
    :mod:`moorage.container.apparmor` (CRI-O's rules: the default profile where AppArmor
    is enabled, loaded on demand; Localhost names a loaded profile; none on a host without
    AppArmor, where Localhost is a FailedPrecondition).
SELinux
    Not supported: ``selinux_options`` are ignored with a log line naming the container
    (CRI-O without ``selinux = true`` does the same), never an error.
``hostname``
    The pod's, when the container has the pod's UTS namespace (never for host network).
``annotations``
    The CRI annotations, then containerd's ``io.kubernetes.cri.*`` keys and CRI-O's
    ``io.kubernetes.pod.*`` keys (which win over a CRI annotation of the same name).
``linux.sysctl``
    None: the pod's sysctls were applied to the pinned namespaces.

Everything here may read the host (stat of mount and device paths, ``/proc``): call it off
the event loop.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moorage import log
from moorage.container import apparmor, defaults, seccomp
from moorage.container.model import (
    ContainerResources,
    ContainerSpec,
    Device,
    ImageView,
    Mount,
    SandboxView,
    SecurityContext,
)
from moorage.container.users import ResolvedUser, resolve_user
from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.sandbox import cgroups
from moorage.util.idmap import IdMapping

__all__ = [
    "OCI_VERSION",
    "SpecOptions",
    "build_spec",
    "capabilities",
    "cgroups_path",
    "host_capabilities",
    "host_devices",
    "image_volumes",
    "mount_depth",
    "oci_resources",
    "process_args",
    "resolve_user",
]

#: What runc 1.1 writes and accepts at most ("ociVersionMax" of ``runc features``).
OCI_VERSION = "1.0.2-dev"

#: CRI NamespaceMode numbers.
POD, CONTAINER, NODE, TARGET = 0, 1, 2, 3

_SC = "config.linux.security_context"
_log = log.get("moorage.container.spec")
_RES = "config.linux.resources"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PERMISSIONS_RE = re.compile(r"(?!.*(.).*\1)[rwm]{1,3}")


@dataclass(frozen=True)
class SpecOptions:
    """The runtime's configuration and the host's facts that a spec depends on.

    Fields left at None are read from the host when a spec is built (and cached).
    """

    cgroup_driver: Literal["cgroupfs", "systemd"] = "cgroupfs"
    #: The node's cgroups and what they can enforce (probed at start and on SIGHUP).
    cgroups: cgroups.Layout | None = None
    #: containerd's option: raise a lower oom_score_adj to the daemon's own.
    restrict_oom_score_adj: bool = False
    #: The runtime and kernel support recursive read-only mounts (the ``rro`` option).
    rro_supported: bool = False
    default_capabilities: tuple[str, ...] = defaults.CAPABILITIES
    #: What ``ALL`` and privileged mean: the capabilities of this kernel (up to
    #: ``/proc/sys/kernel/cap_last_cap``) that the daemon itself holds (its ``CapEff``):
    #: runc cannot give more than it has ("unable to apply caps").
    all_capabilities: tuple[str, ...] | None = None
    #: AppArmor is enabled on the host (``/sys/module/apparmor/parameters/enabled``).
    apparmor_enabled: bool | None = None
    #: The loaded AppArmor profiles (None: read ``/sys/kernel/security/apparmor/profiles``).
    apparmor_loaded: frozenset[str] | None = None
    #: ``runtime.apparmor_profile``: the profile of RuntimeDefault and of no request.
    apparmor_profile: str = apparmor.DEFAULT_PROFILE
    #: ``runtime.seccomp_profile`` loaded; None: the built-in RuntimeDefault profile.
    seccomp_profile: seccomp.Profile | None = None
    #: ``runtime.seccomp_use_default_when_empty``: RuntimeDefault for requests naming none.
    seccomp_use_default_when_empty: bool = False
    #: The kernel has seccomp (None: look at ``/proc/self/status``).
    seccomp_enabled: bool | None = None
    #: SELinux is enabled (None: ``/sys/fs/selinux/enforce`` exists).
    selinux_enabled: bool | None = None
    #: The daemon's own oom_score_adj (``/proc/self/oom_score_adj``), for the restriction.
    daemon_oom_score_adj: int | None = None
    #: Where a privileged container's devices are found.
    host_dev: str = "/dev"
    #: The mount table to check bind-mount propagation against.
    mountinfo: str = "/proc/self/mountinfo"


# -- host facts ---------------------------------------------------------------------------------


@functools.cache
def host_capabilities() -> tuple[str, ...]:
    """The capabilities of this kernel that this process holds in its effective set."""
    names = defaults.CAPABILITY_NAMES
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text().strip())
    except (OSError, ValueError):
        last = len(names) - 1
    effective = (1 << (last + 1)) - 1
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return tuple(name for i, name in enumerate(names) if i <= last and effective >> i & 1)


@functools.cache
def _host_layout() -> cgroups.Layout:
    return cgroups.Layout.detect()


def _layout(options: SpecOptions) -> cgroups.Layout:
    return options.cgroups if options.cgroups is not None else _host_layout()


def _daemon_oom_score_adj(options: SpecOptions) -> int:
    if options.daemon_oom_score_adj is not None:
        return options.daemon_oom_score_adj
    try:
        return int(Path("/proc/self/oom_score_adj").read_text().strip())
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"could not read the daemon's oom_score_adj: {e}") from None


# -- small pieces ---------------------------------------------------------------------------------


def cgroups_path(container_id: str, sandbox: SandboxView, driver: str) -> str:
    """``linux.cgroupsPath``: below the pod cgroup (cgroupfs), or runc's systemd form
    ``slice:prefix:name`` with the pod's slice (its path's last component)."""
    _check_id(container_id)
    parent = sandbox.cgroup_parent
    if driver == "cgroupfs":
        parent = parent or cgroups.DEFAULT_CGROUPFS_PARENT
        return f"{parent.rstrip('/')}/{cgroups.OUR_PREFIX}{container_id}"
    if driver == "systemd":
        slice_name = posixpath.basename(parent.rstrip("/")) or cgroups.DEFAULT_SYSTEMD_PARENT
        if not slice_name.endswith(".slice"):
            raise InvalidArgument(
                f"pod cgroup {parent!r} is not a systemd slice (the systemd cgroup driver "
                "puts containers in the pod's slice)"
            )
        return f"{slice_name}:moorage:{container_id}"
    raise InvalidArgument(f"cgroup driver {driver!r} is not cgroupfs or systemd")


def _check_id(container_id: str) -> None:
    if not _ID_RE.fullmatch(container_id):
        raise InvalidArgument(f"container id {container_id!r} is not a valid id")


def image_volumes(image: ImageView) -> list[str]:
    """The image config's ``Volumes`` (absolute, normalized, sorted, without ``/``): empty
    directories the caller creates in the writable layer unless a CRI mount covers them."""
    volumes = image.config.get("Volumes") or {}
    if not isinstance(volumes, Mapping):
        return []
    out: set[str] = set()
    for key in volumes:
        if not isinstance(key, str) or not key.strip() or "\0" in key:
            continue
        path = posixpath.normpath("/" + key.strip().lstrip("/"))
        if path != "/":
            out.add(path)
    return sorted(out)


def _string_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{what} is not a list of strings")
    return list(value)


def process_args(spec: ContainerSpec, image: ImageView) -> list[str]:
    """The container's argv by Kubernetes' command/args rules (module docstring)."""
    entrypoint = _string_list(
        image.config.get("Entrypoint"), f"image {image.name}: config Entrypoint"
    )
    if entrypoint == [""]:
        entrypoint = []
    cmd = _string_list(image.config.get("Cmd"), f"image {image.name}: config Cmd")
    # command replaces the Entrypoint and then the image's Cmd is ignored; args replace Cmd.
    argv = [*spec.command, *spec.args] if spec.command else [*entrypoint, *(spec.args or cmd)]
    if not argv:
        raise InvalidArgument(
            "config.command: no command specified (no command or args in the request, and "
            "no Entrypoint or Cmd in the image config)"
        )
    for arg in argv:
        if "\0" in arg:
            raise InvalidArgument(f"config.command/args: {arg[:80]!r} contains a NUL character")
    return argv


def _cwd(spec: ContainerSpec, image: ImageView) -> str:
    if spec.working_dir:
        if not spec.working_dir.startswith("/") or "\0" in spec.working_dir:
            raise InvalidArgument(
                f"config.working_dir: {spec.working_dir!r} is not an absolute path"
            )
        return posixpath.normpath(spec.working_dir)
    image_wd = image.config.get("WorkingDir") or ""
    if isinstance(image_wd, str) and image_wd.strip() and "\0" not in image_wd:
        return posixpath.normpath("/" + image_wd.strip().lstrip("/"))
    return "/"


def _env(
    spec: ContainerSpec,
    sandbox: SandboxView,
    image: ImageView,
    user: ResolvedUser,
    extra_env: Mapping[str, str],
) -> list[str]:
    env: dict[str, str] = {"PATH": defaults.DEFAULT_PATH}
    if sandbox.hostname:
        env["HOSTNAME"] = sandbox.hostname
    if spec.tty:
        env["TERM"] = "xterm"
    for item in _string_list(image.config.get("Env"), f"image {image.name}: config Env"):
        key, sep, value = item.partition("=")
        if not sep or not key or "\0" in item:
            continue  # runc refuses an entry without "=": the image's mistake, left out
        env[key] = value
    for i, (key, raw) in enumerate(spec.env):
        field = f"config.envs[{i}]"
        if not key or "=" in key or "\0" in key:
            raise InvalidArgument(f"{field}.key: {key!r} is not a valid variable name")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"{field}.value: the value of {key!r} is not UTF-8 (an OCI runtime takes "
                "environment values as text)"
            ) from None
        if "\0" in value:
            raise InvalidArgument(f"{field}.value: the value of {key!r} contains a NUL byte")
        env[key] = value
    for key, value in extra_env.items():
        env[key] = value
    env.setdefault("HOME", user.home or "/")
    return [f"{k}={v}" for k, v in env.items()]


# -- capabilities ---------------------------------------------------------------------------------

_CAP_INDEX = {name: i for i, name in enumerate(defaults.CAPABILITY_NAMES)}


def _cap_name(name: str, field: str) -> str:
    upper = name.strip().upper()
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full not in _CAP_INDEX:
        raise InvalidArgument(f"{field}: unknown capability {name!r}")
    return full


def capabilities(
    sc: SecurityContext, default_capabilities: Iterable[str], available: Iterable[str]
) -> dict[str, list[str]]:
    """``process.capabilities`` (rules in the module docstring); ``available`` is what
    ``ALL`` and privileged mean (``CAP_`` names)."""
    field = f"{_SC}.capabilities"
    known = {_cap_name(n, "all_capabilities") for n in available}

    def names(values: Iterable[str], sub: str) -> tuple[list[str], bool]:
        out, has_all = [], False
        for v in values:
            if v.strip().upper() == "ALL":
                has_all = True
            else:
                out.append(_cap_name(v, f"{field}.{sub}"))
        return out, has_all

    adds, add_all = names(sc.cap_add, "add_capabilities")
    drops, drop_all = names(sc.cap_drop, "drop_capabilities")
    ambient, ambient_all = names(sc.cap_add_ambient, "add_ambient_capabilities")
    if ambient_all:
        raise InvalidArgument(
            f"{field}.add_ambient_capabilities: ALL is not accepted, name the capabilities"
        )
    checked = [] if sc.privileged else [(a, "add_capabilities") for a in adds]
    for name, sub in checked + [(a, "add_ambient_capabilities") for a in ambient]:
        if name not in known:
            raise FailedPrecondition(
                f"{field}.{sub}: {name} is not available on this host (the kernel does not "
                "have it, or the runtime does not hold it itself)"
            )

    if sc.privileged:
        main = set(known)
    else:
        if drop_all:
            main = set()
        elif add_all:
            main = set(known)
        else:
            main = {
                n
                for n in (_cap_name(c, "default_capabilities") for c in default_capabilities)
                if n in known
            }
        main |= set(adds) | set(ambient)
        main -= set(drops)
    amb = set(ambient) if sc.privileged else set(ambient) - set(drops)
    main |= amb

    def ordered(values: set[str]) -> list[str]:
        return sorted(values, key=_CAP_INDEX.__getitem__)

    return {
        "bounding": ordered(main),
        "effective": ordered(main),
        "permitted": ordered(main),
        "inheritable": ordered(amb),
        "ambient": ordered(amb),
    }


# -- security profiles ----------------------------------------------------------------------------


def _seccomp(sc: SecurityContext, options: SpecOptions, bounding: Iterable[str]
             ) -> dict[str, Any] | None:
    """``linux.seccomp`` (module docstring), None for none."""
    if sc.privileged:
        return None
    kind = sc.seccomp.kind or (
        "RuntimeDefault" if options.seccomp_use_default_when_empty else "Unconfined")
    if kind == "Unconfined":
        return None
    field = f"{_SC}.seccomp"
    enabled = (options.seccomp_enabled if options.seccomp_enabled is not None
               else seccomp.host_enabled())
    if not enabled:
        if kind == "Localhost":
            raise FailedPrecondition(f"{field}: seccomp profile {sc.seccomp.localhost_ref!r} "
                                     "requested, but this kernel has no seccomp")
        _log.warning("container.seccomp_unavailable", profile=kind)
        return None
    if kind == "Localhost":
        profile = seccomp.load_file(sc.seccomp.localhost_ref, f"{field}.localhost_ref")
    else:
        profile = options.seccomp_profile or seccomp.builtin()
    return seccomp.render(profile, bounding)


def _apparmor(sc: SecurityContext, options: SpecOptions) -> str | None:
    """``process.apparmorProfile`` (module docstring), None for none."""
    if sc.privileged:
        return None
    enabled = (options.apparmor_enabled if options.apparmor_enabled is not None
               else apparmor.enabled())
    return apparmor.process_profile(sc.apparmor, default=options.apparmor_profile,
                                    host_enabled=enabled, loaded=options.apparmor_loaded,
                                    field=f"{_SC}.apparmor")


def _selinux(container_id: str, spec: ContainerSpec, options: SpecOptions) -> None:
    """SELinux options are not applied: say so once per container."""
    if not any(spec.security.selinux_options):
        return
    enabled = (options.selinux_enabled if options.selinux_enabled is not None
               else os.path.exists("/sys/fs/selinux/enforce"))
    _log.info("container.selinux_options_ignored", container_id=container_id,
              container=spec.name, selinux_enabled=enabled,
              options=":".join(spec.security.selinux_options),
              reason="SELinux is enabled but moorage does not label containers" if enabled
              else "SELinux is disabled on this host")


# -- namespaces -----------------------------------------------------------------------------------


def _namespaces(
    sc: SecurityContext, sandbox: SandboxView, options: SpecOptions, target_pid_ns: str | None
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    if sandbox.user_ns:
        # The pod's user namespace first: runc joins it before the others (they, and the
        # pod's PID namespace, are owned by it).
        out.append({"type": "user", "path": sandbox.user_ns})
    mode = sc.pid_mode
    if mode == CONTAINER:
        out.append({"type": "pid"})
    elif mode == POD:
        if not sandbox.pid_ns:
            raise InvalidArgument(
                f"{_SC}.namespace_options.pid: POD, but the pod sandbox has no shared PID namespace"
            )
        out.append({"type": "pid", "path": sandbox.pid_ns})
    elif mode == TARGET:
        if not target_pid_ns:
            raise InvalidArgument(
                f"{_SC}.namespace_options.target_id: PID namespace of container "
                f"{sc.target_id!r} not found"
            )
        out.append({"type": "pid", "path": target_pid_ns})
    elif mode != NODE:
        raise InvalidArgument(f"{_SC}.namespace_options.pid: unknown mode {mode}")
    for kind, path in (
        ("network", sandbox.net_ns),
        ("ipc", sandbox.ipc_ns),
        ("uts", sandbox.uts_ns),
    ):
        if path:
            out.append({"type": kind, "path": path})
    out.append({"type": "mount"})
    if _layout(options).version == 2 and not sc.privileged:
        out.append({"type": "cgroup"})
    return out


# -- mounts ---------------------------------------------------------------------------------------


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _mount_of(path: str, mountinfo: str) -> tuple[str, list[str]] | None:
    """The mount holding ``path`` (the deepest mountpoint above it; of several on one point
    the last, which is on top) and its optional fields (``shared:N``, ``master:N``...)."""
    best: tuple[str, list[str]] | None = None
    for line in mountinfo.splitlines():
        left, sep, _ = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 6:
            continue
        point = _unescape(fields[4])
        under = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if under and (best is None or len(point) >= len(best[0])):
            best = (point, fields[6:])
    return best


def _read_mountinfo(options: SpecOptions) -> str:
    try:
        return Path(options.mountinfo).read_text()
    except OSError as e:
        raise FailedPrecondition(f"read {options.mountinfo}: {e.strerror}") from None


def _check_propagation(src: str, wanted: str, field: str, mountinfo: str) -> None:
    found = _mount_of(src, mountinfo)
    tags = found[1] if found else []
    shared = any(t.startswith("shared:") for t in tags)
    slave = any(t.startswith("master:") for t in tags)
    point = found[0] if found else "?"
    if wanted == "rshared" and not shared:
        raise InvalidArgument(
            f"{field}: propagation BIDIRECTIONAL needs a shared mount, but {src!r} is on "
            f"mount {point!r}, which is not shared"
        )
    if wanted == "rslave" and not (shared or slave):
        raise InvalidArgument(
            f"{field}: propagation HOST_TO_CONTAINER needs a shared or slave mount, but "
            f"{src!r} is on mount {point!r}, which is neither"
        )


def _clean_container_path(path: str, field: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"{field}: {path!r} is not an absolute path")
    return "/" + posixpath.normpath(path).lstrip("/")


def _oci_mappings(mappings: Iterable[IdMapping]) -> list[dict[str, int]]:
    return [
        {"containerID": m.container_id, "hostID": m.host_id, "size": m.length} for m in mappings
    ]


def _cri_mounts(
    mounts: tuple[Mount, ...], options: SpecOptions
) -> tuple[list[dict[str, Any]], str]:
    """The CRI mounts as OCI mounts, and the rootfs propagation they need ("" for none)."""
    out: list[dict[str, Any]] = []
    root_propagation = ""
    mountinfo: str | None = None
    for i, m in enumerate(mounts):
        field = f"config.mounts[{i}]"
        if m.uid_mappings or m.gid_mappings:
            # The container manager makes idmapped mounts itself (runc 1.1 cannot) and
            # hands over their paths without mappings.
            raise FailedPrecondition(
                f"{field}.uidMappings: idmapped mount of {m.host_path!r} was not prepared"
            )
        dest = _clean_container_path(m.container_path, f"{field}.container_path")
        if m.image:
            # An image volume, mounted by the container manager: read-only, private,
            # whatever propagation says (as CRI-O's and containerd's).
            if not m.host_path:
                raise FailedPrecondition(f"{field}.image: image volume {m.image!r} was not "
                                         "mounted")
            out.append({"destination": dest, "type": "bind", "source": m.host_path,
                        "options": ["rbind", "rprivate", "ro", "nosuid", "nodev"]})
            continue
        if not m.host_path or "\0" in m.host_path:
            raise InvalidArgument(f"{field}.host_path: {m.host_path!r} is not a path")
        if not os.path.exists(m.host_path):
            raise InvalidArgument(f"{field}.host_path: {m.host_path!r} does not exist")
        src = os.path.realpath(m.host_path)
        if m.recursive_read_only:
            _check_rro(m, field, options)
        opts = ["rbind"]
        if m.propagation == "private":
            opts.append("rprivate")
        elif m.propagation in ("rslave", "rshared"):
            if mountinfo is None:
                mountinfo = _read_mountinfo(options)
            _check_propagation(src, m.propagation, f"{field}.propagation", mountinfo)
            opts.append(m.propagation)
            if m.propagation == "rshared":
                root_propagation = "rshared"
            elif root_propagation != "rshared":
                root_propagation = "rslave"
        else:
            raise InvalidArgument(f"{field}.propagation: unknown value {m.propagation!r}")
        if m.recursive_read_only:
            opts.append("rro")
        else:
            opts.append("ro" if m.readonly else "rw")
        out.append({"destination": dest, "type": "bind", "source": src, "options": opts})
    return out, root_propagation


def _check_rro(m: Mount, field: str, options: SpecOptions) -> None:
    """A recursive read-only mount is read-only, private, and needs the kernel and the
    runtime to have it (the CRI's rules, CRI-O's and containerd's answers)."""
    if not m.readonly:
        raise InvalidArgument(
            f"{field}.recursive_read_only: needs readonly (a recursive read-only mount "
            f"conflicts with a read-write one; host_path {m.host_path!r})"
        )
    if m.propagation != "private":
        raise InvalidArgument(
            f"{field}.recursive_read_only: needs private propagation, got {m.propagation} "
            f"(host_path {m.host_path!r})"
        )
    if not options.rro_supported:
        raise InvalidArgument(
            f"{field}.recursive_read_only: recursive read-only mounts are not supported by "
            "this runtime handler (they need a kernel with mount_setattr, Linux 5.12, and an "
            f"OCI runtime whose features list the rro mount option; host_path "
            f"{m.host_path!r})"
        )


def _pod_mounts(sandbox: SandboxView, readonly_rootfs: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "destination": "/dev/shm",
            "type": "bind",
            "source": sandbox.shm_path or "/dev/shm",
            "options": ["rbind", "rprivate", "nosuid", "nodev", "noexec", "rw"],
        }
    ]
    if sandbox.files_dir:
        mode = "ro" if readonly_rootfs else "rw"
        for name in ("hostname", "hosts", "resolv.conf"):
            source = os.path.join(sandbox.files_dir, name)
            if not os.path.isfile(source):
                raise FailedPrecondition(f"pod sandbox {sandbox.id}: {source} is missing")
            out.append(
                {
                    "destination": f"/etc/{name}",
                    "type": "bind",
                    "source": source,
                    "options": ["bind", "rprivate", "nosuid", "nodev", "noexec", mode],
                }
            )
    return out


def mount_depth(destination: str) -> int:
    """How deep a mount's destination is (parents sort first)."""
    return len([p for p in destination.split("/") if p])


def _mounts(
    spec: ContainerSpec, sandbox: SandboxView, options: SpecOptions
) -> tuple[list[dict[str, Any]], str]:
    sc = spec.security
    cri, root_propagation = _cri_mounts(spec.mounts, options)
    cri_paths = {m["destination"] for m in cri}
    own = defaults.mounts(privileged=sc.privileged) + _pod_mounts(sandbox, sc.readonly_rootfs)
    kept = []
    for m in own:
        dest = m["destination"]
        if dest in cri_paths:
            continue
        if any(dest.startswith(p + "/") for p in ("/dev", "/sys") if p in cri_paths):
            continue
        kept.append(m)
    return sorted(kept + cri, key=lambda m: mount_depth(m["destination"])), root_propagation


# -- devices --------------------------------------------------------------------------------------


def _device_entry(path: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "path": path,
        "type": "c" if stat.S_ISCHR(st.st_mode) else "b",
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def _is_device(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)


def host_devices(root: str = "/dev") -> list[dict[str, Any]]:
    """Every char and block device below ``root`` (runc's HostDevices: symbolic links,
    ``console`` and the pts/shm/fd/mqueue directories left out), as OCI devices."""
    out: list[dict[str, Any]] = []

    def walk(directory: str) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.name not in defaults.HOST_DEVICE_SKIP_DIRS:
                    walk(entry.path)
                continue
            if entry.name in defaults.HOST_DEVICE_SKIP_NAMES or not _is_device(st):
                continue
            if st.st_rdev == 0:
                continue
            out.append(_device_entry(entry.path, st))

    walk(root)
    return out


def _cri_devices(devices: tuple[Device, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(linux.devices, device cgroup allow rules) of the CRI devices."""
    nodes: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    for i, d in enumerate(devices):
        field = f"config.devices[{i}]"
        dest = _clean_container_path(d.container_path, f"{field}.container_path")
        access = d.permissions or "rwm"
        if not _PERMISSIONS_RE.fullmatch(access):
            raise InvalidArgument(
                f"{field}.permissions: {d.permissions!r} is not made of r, w and m"
            )
        try:
            st = os.stat(d.host_path)
        except FileNotFoundError:
            raise InvalidArgument(f"{field}.host_path: {d.host_path!r} does not exist") from None
        except OSError as e:
            raise InvalidArgument(f"{field}.host_path: {d.host_path!r}: {e.strerror}") from None
        found: list[tuple[str, os.stat_result]] = []
        if _is_device(st):
            found.append((dest, st))
        elif stat.S_ISDIR(st.st_mode):
            base = os.path.realpath(d.host_path)
            for dirpath, _dirs, names in os.walk(base):
                for name in sorted(names):
                    host = os.path.join(dirpath, name)
                    try:
                        child = os.stat(host, follow_symlinks=False)
                    except OSError:
                        continue
                    if _is_device(child):
                        rel = os.path.relpath(host, base)
                        found.append((posixpath.join(dest, rel), child))
        else:
            raise InvalidArgument(
                f"{field}.host_path: {d.host_path!r} is not a device (nor a directory of them)"
            )
        for path, dst in found:
            node = _device_entry(path, dst)
            nodes.append(node)
            rules.append(
                {
                    "allow": True,
                    "type": node["type"],
                    "major": node["major"],
                    "minor": node["minor"],
                    "access": access,
                }
            )
    return nodes, rules


# -- resources ---------------------------------------------------------------------------------


def oci_resources(
    res: ContainerResources, options: SpecOptions, sandbox: SandboxView | None = None,
    container_id: str = "",
) -> dict[str, Any]:
    """``linux.resources`` without the device rules: CPU, memory, pids, hugepages, unified.

    Also the document of ``runc update --resources`` (UpdateContainerResources). Shaped
    to what the node can enforce below the pod's cgroup (``sandbox``; without it, the
    node's root).
    """
    if res.cgroup.cpu_shares < 0:
        raise InvalidArgument(f"{_RES}.cpu_shares: {res.cgroup.cpu_shares} is negative")
    if res.cgroup.cpu_period < 0:
        raise InvalidArgument(f"{_RES}.cpu_period: {res.cgroup.cpu_period} is negative")
    if res.cgroup.memory_limit < -1:
        raise InvalidArgument(
            f"{_RES}.memory_limit_in_bytes: invalid value {res.cgroup.memory_limit}")
    cgroups.check_resources(res.cgroup, _RES)
    layout = _layout(options)
    pod = sandbox.cgroup_parent if sandbox else ""
    ids = {"container_id": container_id} if container_id else {}
    c = layout.fit(res.cgroup, pod, _RES, **ids)
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if c.cpu_shares:
        cpu["shares"] = c.cpu_shares
    if c.cpu_quota:
        cpu["quota"] = c.cpu_quota
    if c.cpu_period:
        cpu["period"] = c.cpu_period
    if c.cpuset_cpus:
        cpu["cpus"] = c.cpuset_cpus
    if c.cpuset_mems:
        cpu["mems"] = c.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    if c.memory_limit:
        memory["limit"] = c.memory_limit
    swap = c.memory_swap_limit or c.memory_limit
    if swap and layout.swap(pod):
        memory["swap"] = swap
    if memory:
        out["memory"] = memory
    if c.pids_limit:
        out["pids"] = {"limit": c.pids_limit}
    if c.hugepage_limits:
        out["hugepageLimits"] = [{"pageSize": size, "limit": limit}
                                 for size, limit in c.hugepage_limits.items()]
    if c.unified:
        out["unified"] = dict(c.unified)
    return out


def _oom_score_adj(res: ContainerResources, options: SpecOptions) -> int:
    adj = res.oom_score_adj
    if not -1000 <= adj <= 1000:
        raise InvalidArgument(f"{_RES}.oom_score_adj: {adj} is not in [-1000, 1000]")
    if options.restrict_oom_score_adj:
        adj = max(adj, _daemon_oom_score_adj(options))
    return adj


# -- the spec -------------------------------------------------------------------------------------


def _annotations(
    container_id: str, spec: ContainerSpec, sandbox: SandboxView, image: ImageView
) -> dict[str, str]:
    out = dict(spec.annotations)
    out.update(
        {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": spec.name,
            "io.kubernetes.cri.sandbox-id": sandbox.id,
            "io.kubernetes.cri.sandbox-name": sandbox.name,
            "io.kubernetes.cri.sandbox-namespace": sandbox.namespace,
            "io.kubernetes.cri.sandbox-uid": sandbox.uid,
            "io.kubernetes.cri.image-name": image.name,
            "io.kubernetes.pod.name": sandbox.name,
            "io.kubernetes.pod.namespace": sandbox.namespace,
            "io.kubernetes.pod.uid": sandbox.uid,
        }
    )
    return out


def build_spec(
    *,
    container_id: str,
    spec: ContainerSpec,
    sandbox: SandboxView,
    image: ImageView,
    rootfs: Path,
    user: ResolvedUser,
    options: SpecOptions,
    extra_env: Mapping[str, str] | None = None,
    target_pid_ns: str | None = None,
) -> dict[str, Any]:
    """The ``config.json`` document of a container (rules in the module docstring).

    ``target_pid_ns`` is the PID namespace path (``/proc/<pid>/ns/pid``) of the container
    named by ``security.target_id``, for pid mode TARGET; the caller finds it.
    """
    _check_id(container_id)
    sc = spec.security
    if sc.privileged and not sandbox.privileged:
        raise InvalidArgument(
            f"{_SC}.privileged: the pod sandbox {sandbox.id} was not created privileged"
        )
    apparmor_profile = _apparmor(sc, options)
    _selinux(container_id, spec, options)
    available = (
        options.all_capabilities if options.all_capabilities is not None else host_capabilities()
    )
    caps = capabilities(sc, options.default_capabilities, available)
    seccomp_doc = _seccomp(sc, options, caps["bounding"])

    process: dict[str, Any] = {
        "terminal": spec.tty,
        "user": {
            "uid": user.uid,
            "gid": user.gid,
            "additionalGids": list(user.additional_gids),
        },
        "args": process_args(spec, image),
        "env": _env(spec, sandbox, image, user, extra_env or {}),
        "cwd": _cwd(spec, image),
        "capabilities": caps,
        "noNewPrivileges": sc.no_new_privs,
        "oomScoreAdj": _oom_score_adj(spec.resources, options),
    }
    if apparmor_profile is not None:
        process["apparmorProfile"] = apparmor_profile

    mounts, root_propagation = _mounts(spec, sandbox, options)
    devices, rules = _cri_devices(spec.devices)
    resources = oci_resources(spec.resources, options, sandbox, container_id)
    if sc.privileged:
        by_path = {d["path"]: d for d in host_devices(options.host_dev)}
        by_path.update({d["path"]: d for d in devices})
        devices = list(by_path.values())
        resources["devices"] = [{"allow": True, "access": "rwm"}]
        masked: list[str] = []
        readonly: list[str] = []
    else:
        resources["devices"] = [*(dict(r) for r in defaults.DEVICE_RULES), *rules]
        masked = list(defaults.MASKED_PATHS if sc.masked_paths is None else sc.masked_paths)
        readonly = list(defaults.READONLY_PATHS if sc.readonly_paths is None else sc.readonly_paths)

    linux: dict[str, Any] = {
        "resources": resources,
        "cgroupsPath": cgroups_path(container_id, sandbox, options.cgroup_driver),
        "namespaces": _namespaces(sc, sandbox, options, target_pid_ns),
        "devices": devices,
        "maskedPaths": masked,
        "readonlyPaths": readonly,
    }
    if root_propagation:
        linux["rootfsPropagation"] = root_propagation
    if sandbox.user_ns:
        # runc 1.1 needs the mappings even to join a user namespace by path (for the
        # owner of what it creates: /dev/pts, cgroup files); they are the pod's.
        linux["uidMappings"] = _oci_mappings(sandbox.uid_mappings)
        linux["gidMappings"] = _oci_mappings(sandbox.gid_mappings)
    if seccomp_doc is not None:
        linux["seccomp"] = seccomp_doc

    doc: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(rootfs), "readonly": sc.readonly_rootfs},
    }
    if sandbox.uts_ns and not sandbox.host_network and sandbox.hostname:
        doc["hostname"] = sandbox.hostname
    doc["mounts"] = mounts
    doc["annotations"] = _annotations(container_id, spec, sandbox, image)
    doc["linux"] = linux
    return doc
