"""The pod cgroup: where it lives (cgroupfs or systemd driver), creating it, limits, removal.

Both cgroup versions are handled with plain file operations on the mounted hierarchies:

- **v1** (legacy, or hybrid with cgroup2 at ``<root>/unified``): the pod cgroup is a directory
  of the same relative path in every v1 hierarchy (``cpu``, ``cpuacct``, ``memory``, ``pids``,
  ``cpuset``, ``blkio``, ``devices``, ``freezer``, ``hugetlb``, ``name=systemd``... as
  mounted) and, on a hybrid host, in the cgroup2 tree too (runc joins it there as well, for
  process tracking only: no limits are written there).
- **v2** (unified): one directory; controllers are enabled in the ``cgroup.subtree_control``
  of each ancestor, as runc does.

Limits follow runc's translation of the OCI ``LinuxResources`` (which is what kubelet's CRI
``LinuxContainerResources`` becomes): the same files, the same v1 -> v2 conversions, the
same write order where the kernel cares.

The systemd driver: :func:`pod_cgroup_path` converts a slice name to its path; the slice is
a unit of systemd's (:class:`PodSlice`), made over D-Bus where kubelet has not made it, its
limits set as unit properties and in the files. Containers get a transient scope each from
the OCI runtime (``--systemd-cgroup``), as with CRI-O. The daemon refuses the systemd driver
at start when PID 1 is not systemd.

What the node can enforce is probed with the hierarchies (:meth:`Layout.detect`, at daemon
start and on SIGHUP): the page sizes of ``/sys/kernel/mm/hugepages``, swap accounting, and
on v2 the root's controllers. :meth:`Layout.fit` then shapes a request to the node, for pod
cgroups and containers alike, as CRI-O and containerd do: what kubelet sends by default but
the node cannot enforce (hugepage limits without a hugetlb controller or of a page size the
node lacks, swap without swap accounting, ``unified`` on cgroup v1) is dropped with one debug
line; a limit that needs a controller the pod cgroup lacks (cpuset without cpuset
delegation, a ``unified`` key of a controller not enabled) is a FailedPrecondition naming
the field, before anything is created (runc would refuse it anyway, less clearly).

Everything here blocks: call it off the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import posixpath
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moorage import log
from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.util import systemd

__all__ = [
    "DEFAULT_CGROUPFS_PARENT",
    "DEFAULT_SYSTEMD_PARENT",
    "HUGEPAGES_DIR",
    "V1_CONTROLLERS",
    "V2_CONTROLLERS",
    "Layout",
    "PodCgroup",
    "PodSlice",
    "Resources",
    "check_resources",
    "container_cgroup_path",
    "cpu_weight",
    "hugepage_sizes",
    "memory_swap_v2",
    "pod_cgroup_path",
    "systemd_properties",
    "systemd_slice_path",
]

Driver = Literal["cgroupfs", "systemd"]

#: Parents of pods that come without ``linux.cgroup_parent`` (CRI-O uses "/crio" and
#: "system.slice"): each such pod gets ``/moorage/<id>`` or ``moorage-pod<id>.slice``.
DEFAULT_CGROUPFS_PARENT = "/moorage"
DEFAULT_SYSTEMD_PARENT = "moorage.slice"

#: Controller names a cgroup v1 mount can carry (its super options); named hierarchies
#: (``name=systemd``) are hierarchies too.
V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "debug",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)
#: The v2 controllers a pod cgroup's ancestors enable for it, in this order.
V2_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids")
#: One directory per huge page size the kernel has (``hugepages-2048kB``...).
HUGEPAGES_DIR = Path("/sys/kernel/mm/hugepages")

_log = log.get("moorage.sandbox.cgroups")


@dataclass(frozen=True)
class Resources:
    """CRI ``LinuxContainerResources`` of a pod; 0 and "" mean "not set".

    Negative values mean "unlimited" where the kernel has such a value (quota, memory, swap,
    pids), as in the OCI spec.
    """

    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit: int = 0
    memory_swap_limit: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    pids_limit: int = 0
    #: page size as CRI gives it ("2MB", "1GB") -> limit in bytes
    hugepage_limits: Mapping[str, int] = field(default_factory=dict)
    #: cgroup v2 file name -> value, written as given (v2 only)
    unified: Mapping[str, str] = field(default_factory=dict)


# -- what the machine has -------------------------------------------------------------------


def _unescape(field_: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


@dataclass(frozen=True)
class Layout:
    """The cgroup hierarchies of this machine.

    ``version`` is 2 when cgroup2 is mounted at ``root`` itself (unified), else 1.
    ``v1_controllers`` maps each v1 controller name (and ``name=<x>`` of named hierarchies)
    to its mountpoint; co-mounted controllers share one. ``unified`` is the cgroup2
    mountpoint: ``root`` on v2, ``<root>/unified`` on a hybrid host, None on pure v1.

    What the node can enforce (probed by :meth:`detect`): ``hugepage_sizes``, the CRI names
    (``2MB``, ``1GB``) of the huge page sizes the kernel has; ``swap_accounting``, whether
    the memory controller accounts swap (v1 ``memory.memsw.*``, v2 ``memory.swap.max``);
    ``v2_controllers``, the controllers of the v2 root (``cgroup.controllers``).
    """

    root: Path
    version: int
    v1_controllers: Mapping[str, Path] = field(default_factory=dict)
    unified: Path | None = None
    hugepage_sizes: frozenset[str] = frozenset()
    swap_accounting: bool = False
    v2_controllers: frozenset[str] = frozenset()

    @classmethod
    def detect(
        cls,
        root: Path = Path("/sys/fs/cgroup"),
        mountinfo: Path = Path("/proc/self/mountinfo"),
        hugepages: Path = HUGEPAGES_DIR,
        own_cgroup: Path = Path("/proc/self/cgroup"),
    ) -> Layout:
        """Read ``mountinfo`` and keep the cgroup mounts at or below ``root``; probe what
        they can enforce (huge page sizes from ``hugepages``, swap accounting, on v2 from
        the cgroup of this process as ``own_cgroup`` names it, as containerd and kubelet
        look)."""
        layout = cls.from_mountinfo(mountinfo.read_text(), root)
        v2: frozenset[str] = frozenset()
        if layout.version == 2:
            assert layout.unified is not None
            v2 = frozenset(_read(layout.unified / "cgroup.controllers").split())
        return dataclasses.replace(
            layout, hugepage_sizes=hugepage_sizes(hugepages),
            swap_accounting=layout._probe_swap(own_cgroup), v2_controllers=v2)

    def _probe_swap(self, own_cgroup: Path) -> bool:
        if self.version == 1:
            memory = self.v1_controllers.get("memory")
            return memory is not None and (memory / "memory.memsw.limit_in_bytes").exists()
        assert self.unified is not None
        # memory.swap.max exists in every non-root cgroup with the memory controller when
        # swap is accounted: this process's own, else any child of the root that has one.
        own = ""
        for line in _read(own_cgroup).splitlines():
            if line.startswith("0::"):
                own = line[3:].strip("/")
        candidates = [self.unified / own] if own else []
        with contextlib.suppress(OSError):
            candidates += sorted(p for p in self.unified.iterdir() if p.is_dir())
        for d in candidates:
            if (d / "memory.max").exists():
                return (d / "memory.swap.max").exists()
        return False

    def describe(self) -> dict[str, object]:
        """What the node can enforce, for a log line."""
        return {"version": self.version, "controllers": sorted(self.controllers("")),
                "hugepage_sizes": sorted(self.hugepage_sizes, key=_page_bytes),
                "swap_accounting": self.swap_accounting}

    def controllers(self, path: str) -> frozenset[str]:
        """The controllers a cgroup at ``path`` (relative to the roots, such as a pod
        cgroup) and those below it can use: on v1 the mounted ones; on v2 those its parent
        enabled for it (its ``cgroup.controllers``), or the root's while it does not exist."""
        if self.version == 1:
            return frozenset(c for c in self.v1_controllers if not c.startswith("name="))
        assert self.unified is not None
        rel = path.strip("/")
        if rel:
            text = _read(self.unified / rel / "cgroup.controllers", missing="\0")
            if text != "\0":
                return frozenset(text.split())
        return self.v2_controllers

    def swap(self, path: str) -> bool:
        """Swap is accounted for the cgroup at ``path`` (v2: its own ``memory.swap.max``
        where it has the memory controller; else the node's)."""
        if self.version == 2 and path.strip("/"):
            assert self.unified is not None
            d = self.unified / path.strip("/")
            if (d / "memory.max").exists():
                return (d / "memory.swap.max").exists()
        return self.swap_accounting

    def fit(self, res: Resources, path: str, field_: str = "linux.resources",
            **ids: str) -> Resources:
        """``res`` as this node can enforce it in the cgroup at ``path`` or below it (the
        module docstring says what is dropped and what refused). One debug line lists what
        was dropped; ``ids`` go into it. FailedPrecondition names the field of a limit that
        needs a controller ``path`` lacks."""
        available = self.controllers(path)

        def need(controller: str, what: str) -> None:
            if controller not in available:
                raise FailedPrecondition(
                    f"{field_}.{what}: the {controller} controller is not available to cgroup "
                    f"{path or '/'} on this node (not mounted, or not enabled by its parent)")

        if res.cpu_shares or res.cpu_quota or res.cpu_period:
            need("cpu", "cpu_shares")
        if res.memory_limit or res.memory_swap_limit:
            need("memory", "memory_limit_in_bytes")
        if res.cpuset_cpus or res.cpuset_mems:
            need("cpuset", "cpuset_cpus" if res.cpuset_cpus else "cpuset_mems")
        if res.pids_limit:
            need("pids", "pids_limit")
        dropped: list[str] = []
        hugepages = dict(res.hugepage_limits)
        if hugepages and "hugetlb" not in available:
            dropped.append(f"hugepage_limits {sorted(hugepages)}: no hugetlb controller")
            hugepages = {}
        unknown = sorted(size for size in hugepages if size not in self.hugepage_sizes)
        if unknown:
            dropped.append(f"hugepage_limits {unknown}: page sizes this node does not have")
            hugepages = {k: v for k, v in hugepages.items() if k not in unknown}
        unified = dict(res.unified)
        if unified and self.version == 1:
            dropped.append(f"unified {sorted(unified)}: cgroup v1")
            unified = {}
        for key, value in list(unified.items()):
            controller = key.partition(".")[0]
            if key == "memory.swap.max" and value.strip() in ("0", "max") and not (
                    "memory" in available and self.swap(path)):
                dropped.append(f"unified {key}={value}: no swap accounting")
                del unified[key]
            elif controller != "cgroup":
                need(controller, f"unified[{key!r}]")
        if dropped:
            _log.debug("cgroup.resources_dropped", cgroup=path or "/", dropped=dropped, **ids)
        return dataclasses.replace(res, hugepage_limits=hugepages, unified=unified)

    @classmethod
    def from_mountinfo(cls, text: str, root: Path = Path("/sys/fs/cgroup")) -> Layout:
        root = Path(posixpath.normpath(str(root)))
        # mountpoint -> (fstype, super options); a later mount on the same point hides the
        # earlier one.
        mounts: dict[Path, tuple[str, list[str]]] = {}
        for line in text.splitlines():
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            lf, rf = left.split(), right.split()
            if len(lf) < 5 or len(rf) < 3:
                continue
            point = Path(_unescape(lf[4]))
            fstype, super_opts = rf[0], rf[2].split(",")
            mounts[point] = (fstype, super_opts)
        v1: dict[str, Path] = {}
        unified: Path | None = None
        for point, (fstype, opts) in mounts.items():
            if point != root and root not in point.parents:
                continue
            if fstype == "cgroup2":
                if unified is None or point == root:
                    unified = point
            elif fstype == "cgroup":
                for opt in opts:
                    if opt in V1_CONTROLLERS or opt.startswith("name="):
                        v1.setdefault(opt, point)
        if unified == root:
            return cls(root=root, version=2, v1_controllers={}, unified=root)
        if v1:
            return cls(root=root, version=1, v1_controllers=v1, unified=unified)
        if unified is not None:
            return cls(root=root, version=2, v1_controllers={}, unified=unified)
        raise FailedPrecondition(f"no cgroup or cgroup2 filesystem is mounted at or below {root}")

    def hierarchies(self) -> list[Path]:
        """Mountpoints where a pod cgroup gets a directory (each v1 hierarchy once, then the
        hybrid cgroup2 tree; or the one v2 tree)."""
        if self.version == 2:
            assert self.unified is not None
            return [self.unified]
        points: list[Path] = []
        for point in self.v1_controllers.values():
            if point not in points:
                points.append(point)
        if self.unified is not None:
            points.append(self.unified)
        return points


# -- where the pod cgroup is ----------------------------------------------------------------

_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\-]+")


def systemd_slice_path(slice_name: str) -> str:
    """The cgroup path of a systemd slice, by runc's ``ExpandSlice`` rules.

    ``"a-b-c.slice"`` -> ``"/a.slice/a-b.slice/a-b-c.slice"``; ``"-.slice"`` (the root slice)
    -> ``"/"``. The name must end in ``.slice`` with something before it, have no ``/``, and
    no empty ``-``-separated component (``a--b.slice``, ``-a.slice``, ``a-.slice`` are
    invalid). We also require systemd's unit name characters and length (at most 255).
    """
    suffix = ".slice"
    if (
        len(slice_name) <= len(suffix)
        or not slice_name.endswith(suffix)
        or "/" in slice_name
        or len(slice_name) > 255
        or not _UNIT_CHARS.fullmatch(slice_name)
    ):
        raise InvalidArgument(f"cgroup_parent: {slice_name!r} is not a valid systemd slice name")
    stem = slice_name[: -len(suffix)]
    if stem == "-":
        return "/"
    path, prefix = "", ""
    for component in stem.split("-"):
        if not component:
            raise InvalidArgument(
                f"cgroup_parent: {slice_name!r} is not a valid systemd slice name "
                "(empty component between '-')"
            )
        path += f"/{prefix}{component}{suffix}"
        prefix += f"{component}-"
    return path


def container_cgroup_path(cgroups_path: str) -> str:
    """The cgroup path (relative to each hierarchy's root) of an OCI ``linux.cgroupsPath``.

    cgroupfs: the path itself (``/kubepods/pod<uid>/moorage-<id>``). systemd: runc's
    ``slice:prefix:name`` means the scope ``<prefix>-<name>.scope`` in the slice's path
    (``kubepods-pod1.slice:moorage:abc`` ->
    ``/kubepods.slice/kubepods-pod1.slice/moorage-abc.scope``).
    """
    if ":" in cgroups_path:
        slice_name, prefix, name = [*cgroups_path.split(":"), "", ""][:3]
        parent = systemd_slice_path(slice_name or "system.slice").rstrip("/")
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return f"{parent}/{unit}"
    return "/" + cgroups_path.lstrip("/")


def _check_cgroup_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise InvalidArgument(f"{what}: {path!r} must be an absolute cgroup path")
    if any(part in (".", "..") for part in path.split("/")):
        raise InvalidArgument(f"{what}: {path!r} must not contain '.' or '..' components")
    if "\0" in path or "\n" in path:
        raise InvalidArgument(f"{what}: {path!r} contains a NUL or newline character")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise InvalidArgument(f"{what}: {path!r} is the root cgroup, not a pod cgroup")
    return norm


def pod_cgroup_path(cgroup_parent: str, driver: Driver) -> str:
    """The pod cgroup's path relative to each hierarchy root, from ``linux.cgroup_parent``.

    - cgroupfs: an absolute path such as ``/kubepods/burstable/pod<uid>`` (normalized; no
      ``.``/``..`` components; not ``/``).
    - systemd: a slice name such as ``kubepods-burstable-pod<uid>.slice``, expanded to its
      path (:func:`systemd_slice_path`); the root slice ``-.slice`` is refused.

    An empty parent gives the driver's default parent, as CRI-O does (it uses ``/crio`` and
    ``system.slice``; we use :data:`DEFAULT_CGROUPFS_PARENT` and
    :data:`DEFAULT_SYSTEMD_PARENT`). That parent is shared by every pod without one: the
    caller must not remove it with one of those pods.
    """
    what = "linux.cgroup_parent"
    if driver == "cgroupfs":
        return _check_cgroup_path(cgroup_parent or DEFAULT_CGROUPFS_PARENT, what)
    if driver == "systemd":
        try:
            path = systemd_slice_path(cgroup_parent or DEFAULT_SYSTEMD_PARENT)
        except InvalidArgument as e:
            raise InvalidArgument(
                f"{what}: {cgroup_parent!r} is not a systemd slice name such as "
                "'kubepods-burstable-pod<uid>.slice' (the systemd cgroup driver is configured)"
            ) from e
        return _check_cgroup_path(path, what)
    raise InvalidArgument(f"cgroup driver {driver!r} is neither 'cgroupfs' nor 'systemd'")


# -- conversions ----------------------------------------------------------------------------


def cpu_weight(shares: int) -> int:
    """cgroup v2 ``cpu.weight`` from v1 ``cpu.shares`` (runc's and kubelet's linear map).

    ``1 + ((shares - 2) * 9999) // 262142`` with shares clamped to the v1 range [2, 262144],
    so 2 -> 1, 1024 -> 39, 262144 -> 10000. 0 (not set) -> 0.
    """
    if shares == 0:
        return 0
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def memory_swap_v2(swap_limit: int, memory_limit: int) -> int:
    """cgroup v2 ``memory.swap.max`` from the v1-style memory+swap limit (runc's conversion).

    Returns -1 for "max", 0 for "do not write". v2 limits swap alone, v1 memory plus swap.
    """
    if memory_limit == -1 and swap_limit == 0:
        return -1  # unlimited memory without a swap value: unlimited swap too
    if swap_limit in (-1, 0):
        return swap_limit
    if memory_limit in (0, -1):
        raise InvalidArgument(
            "linux.resources.memory_swap_limit_in_bytes: a swap limit needs a memory limit"
        )
    if memory_limit < 0:
        raise InvalidArgument(
            f"linux.resources.memory_limit_in_bytes: invalid value {memory_limit}"
        )
    if swap_limit < memory_limit:
        raise InvalidArgument(
            f"linux.resources.memory_swap_limit_in_bytes: {swap_limit} is below the memory "
            f"limit {memory_limit} (it is memory plus swap)"
        )
    return swap_limit - memory_limit


_PAGE_SIZE_RE = re.compile(r"[0-9]+[KMGTP]?B")
_UNITS = ("KB", "MB", "GB", "TB", "PB")


def hugepage_sizes(directory: Path = HUGEPAGES_DIR) -> frozenset[str]:
    """The huge page sizes the kernel has, named as kubelet and runc name them: each
    ``hugepages-<n>kB`` entry of ``directory`` in the largest binary unit that divides it
    (``hugepages-2048kB`` -> ``2MB``, ``hugepages-1048576kB`` -> ``1GB``, ``64kB`` -> ``64KB``).
    None where the directory is missing (no huge pages in this kernel)."""
    out = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            m = re.fullmatch(r"hugepages-([0-9]+)kB", entry)
            if not m:
                continue
            size, unit = int(m.group(1)), 0
            while size >= 1024 and size % 1024 == 0 and unit < len(_UNITS) - 1:
                size //= 1024
                unit += 1
            out.add(f"{size}{_UNITS[unit]}")
    return frozenset(out)


def _page_bytes(size: str) -> int:
    m = re.fullmatch(r"([0-9]+)([KMGTP]?)B", size)
    if not m:
        return 0
    return int(m.group(1)) << (10 * ("KMGTP".index(m.group(2)) + 1) if m.group(2) else 0)


def check_resources(res: Resources, field_: str) -> None:
    """InvalidArgument, naming the field under ``field_``, for what no node accepts: a
    page size not like ``2MB``, a negative hugepage limit, a ``unified`` key that is not a
    cgroup file name (``<controller>.<name>``), swap rules broken (:func:`memory_swap_v2`)."""
    for size, limit in res.hugepage_limits.items():
        if not _PAGE_SIZE_RE.fullmatch(size):
            raise InvalidArgument(f"{field_}.hugepage_limits: page size {size!r} is not like '2MB'")
        if limit < 0:
            raise InvalidArgument(f"{field_}.hugepage_limits: limit {limit} for {size} is negative")
    for key in res.unified:
        if (not key or "/" in key or key.startswith(".") or "\0" in key
                or "." not in key.strip(".")):
            raise InvalidArgument(f"{field_}.unified: {key!r} is not a cgroup file name "
                                  "(<controller>.<name>)")
    try:
        memory_swap_v2(res.memory_swap_limit, res.memory_limit)  # the same rules on v1
    except InvalidArgument as e:
        raise InvalidArgument(e.message.replace("linux.resources", field_, 1)) from None


def _max(value: int) -> str:
    return "max" if value < 0 else str(value)


# -- the systemd driver's unit properties ----------------------------------------------------

#: cgroup v2 files of ``unified`` that systemd has a unit property for (the rest are written
#: to the files only, as runc does).
_UNIFIED_PROPERTIES = {"memory.min": "MemoryMin", "memory.low": "MemoryLow",
                       "memory.high": "MemoryHigh", "memory.max": "MemoryMax",
                       "memory.swap.max": "MemorySwapMax", "pids.max": "TasksMax"}


def _limit_property(value: int) -> tuple[str, int]:
    return ("t", systemd.INFINITY if value < 0 else value)


def cpu_quota_per_sec(quota: int, period: int) -> int:
    """systemd's ``CPUQuotaPerSecUSec`` from a CFS quota and period, rounded up to systemd's
    granularity of 10 ms per second (runc's conversion); INFINITY for no quota."""
    if quota < 0:
        return systemd.INFINITY
    per_sec = quota * 1_000_000 // (period or 100_000)
    return -(-per_sec // 10_000) * 10_000


def cpuset_bits(cpus: str, what: str) -> bytes:
    """systemd's ``AllowedCPUs``/``AllowedMemoryNodes`` bit mask from a cpuset list
    ("0-2,5"): byte i holds CPUs 8i..8i+7, lowest bit first."""
    mask = 0
    for part in cpus.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise InvalidArgument(f"{what}: {cpus!r} is not a list of ranges like '0-2,5'")
        for n in range(int(low), int(high or low) + 1):
            mask |= 1 << n
    return mask.to_bytes((mask.bit_length() + 7) // 8 or 1, "little")


def systemd_properties(res: Resources) -> list[systemd.Property]:
    """The unit properties that express ``res`` to systemd (kubelet's and runc's systemd
    drivers set the same): systemd then writes those files itself and keeps them when it
    applies the unit's settings again. hugetlb and the ``unified`` files systemd has no
    property for are written to the files only."""
    props: list[systemd.Property] = []
    if res.cpu_shares:
        props.append(("CPUWeight", ("t", cpu_weight(res.cpu_shares))))
    if res.cpu_quota:
        props.append(("CPUQuotaPerSecUSec",
                      ("t", cpu_quota_per_sec(res.cpu_quota, res.cpu_period))))
    if res.cpu_period:
        props.append(("CPUQuotaPeriodUSec", ("t", res.cpu_period)))
    if res.memory_limit:
        props.append(("MemoryMax", _limit_property(res.memory_limit)))
    if res.memory_limit or res.memory_swap_limit:
        swap = memory_swap_v2(res.memory_swap_limit, res.memory_limit)
        if swap or res.memory_swap_limit > 0:
            props.append(("MemorySwapMax", _limit_property(swap)))
    if res.pids_limit:
        props.append(("TasksMax", _limit_property(res.pids_limit)))
    if res.cpuset_cpus:
        props.append(("AllowedCPUs",
                      ("ay", cpuset_bits(res.cpuset_cpus, "linux.resources.cpuset_cpus"))))
    if res.cpuset_mems:
        props.append(("AllowedMemoryNodes",
                      ("ay", cpuset_bits(res.cpuset_mems, "linux.resources.cpuset_mems"))))
    for key, value in res.unified.items():
        name = _UNIFIED_PROPERTIES.get(key)
        if name is None:
            continue
        if value.strip() == "max":
            props.append((name, ("t", systemd.INFINITY)))
        elif value.strip().isdigit():
            props.append((name, ("t", int(value))))
        else:
            raise InvalidArgument(f"linux.resources.unified: {key} = {value!r} is not a "
                                  "number of bytes or 'max'")
    return props


# -- the pod cgroup -------------------------------------------------------------------------


class PodCgroup:
    """One pod cgroup at relative ``path`` in every hierarchy of ``layout``."""

    #: rmdir retries on EBUSY (a killed process can linger a moment), as runc does.
    RMDIR_TRIES = 5
    RMDIR_DELAY = 0.01

    def __init__(self, layout: Layout, path: str) -> None:
        self.layout = layout
        self.path = _check_cgroup_path(path, "pod cgroup path")
        self._rel = self.path.lstrip("/")

    def __repr__(self) -> str:
        return f"PodCgroup({self.path!r}, v{self.layout.version})"

    def dirs(self) -> list[Path]:
        """The pod cgroup's directory in each hierarchy."""
        return [point / self._rel for point in self.layout.hierarchies()]

    def procs_files(self) -> list[Path]:
        """Where to write a pid to move a process into the pod cgroup (all of them)."""
        return [d / "cgroup.procs" for d in self.dirs()]

    # -- create ---------------------------------------------------------------------------

    def create(self) -> list[Path]:
        """Create the missing directories; return those created, parents first.

        Existing directories (kubelet made them) are kept and not returned. v1 cpuset
        directories get ``cpuset.cpus``/``cpuset.mems`` copied from their parent where empty
        (a task cannot join an empty cpuset). v2: each ancestor enables the controllers
        that the pod cgroup can use in its ``cgroup.subtree_control`` (the pod cgroup's own
        subtree_control is left to runc, which enables it when it creates a container's
        cgroup below). On failure the directories created so far are removed again.
        """
        created: list[Path] = []
        try:
            for point in self.layout.hierarchies():
                self._mkdirs(point, created, enable=self.layout.version == 2)
                if self.layout.version == 1 and point == self.layout.v1_controllers.get("cpuset"):
                    self._cpuset_inherit(point)
        except BaseException:
            with contextlib.suppress(FailedPrecondition):
                self.remove(created)
            raise
        return created

    def _mkdirs(self, point: Path, created: list[Path], *, enable: bool) -> None:
        """mkdir -p below ``point``, appending what it creates to ``created`` as it goes;
        with ``enable`` (v2), each ancestor enables controllers before its child is made."""
        if not point.is_dir():
            raise FailedPrecondition(f"cgroup hierarchy {point} is missing")
        current = point
        for part in self._rel.split("/"):
            if enable:
                self._enable_controllers(current)
            current = current / part
            try:
                os.mkdir(current, 0o755)
            except FileExistsError:
                continue
            except OSError as e:
                raise FailedPrecondition(f"create cgroup {current}: {e.strerror}") from None
            created.append(current)

    def enable_controllers(self) -> None:
        """v2: each ancestor of the pod cgroup enables in its ``cgroup.subtree_control`` the
        controllers its children can use, as :meth:`create` does for the cgroups it makes
        (for a slice systemd made, which enables only the controllers it manages itself)."""
        if self.layout.version != 2:
            return
        assert self.layout.unified is not None
        for directory in self._ancestry(self.layout.unified)[:-1]:
            self._enable_controllers(directory)

    def _ancestry(self, point: Path) -> list[Path]:
        """``point`` and every directory down to the pod cgroup, top first."""
        out = [point]
        for part in self._rel.split("/"):
            out.append(out[-1] / part)
        return out

    def _cpuset_inherit(self, point: Path) -> None:
        chain = self._ancestry(point)
        for parent, child in itertools.pairwise(chain):
            for name in ("cpuset.cpus", "cpuset.mems"):
                if _read(child / name).strip():
                    continue
                _write(child / name, _read(parent / name).strip())

    @staticmethod
    def _enable_controllers(directory: Path) -> None:
        """Enable in ``directory``'s subtree_control what its children can use of
        :data:`V2_CONTROLLERS` and is not enabled yet."""
        available = _read(directory / "cgroup.controllers").split()
        enabled = set(_read(directory / "cgroup.subtree_control").split())
        wanted = [f"+{c}" for c in V2_CONTROLLERS if c in available and c not in enabled]
        if not wanted:
            return
        target = directory / "cgroup.subtree_control"
        try:
            _write(target, " ".join(wanted))
        except FailedPrecondition:
            # One by one, as runc: some may be refused (not delegated, or processes in the
            # ancestor); a limit on a controller left out fails later, naming its file.
            for one in wanted:
                with contextlib.suppress(FailedPrecondition):
                    _write(target, one)

    # -- limits ---------------------------------------------------------------------------

    def apply(self, res: Resources) -> None:
        """Write the limits of ``res`` (what is set) into the pod cgroup, as
        :meth:`Layout.fit` shapes them to the node.

        A write the kernel refuses raises FailedPrecondition naming the file and the value.
        """
        check_resources(res, "linux.resources")
        res = self.layout.fit(res, self.path)
        if self.layout.version == 2:
            self._apply_v2(res)
        else:
            self._apply_v1(res)

    def _v1_dir(self, controller: str, value: object) -> Path:
        point = self.layout.v1_controllers.get(controller)
        if point is None:
            raise FailedPrecondition(
                f"cgroup v1 controller {controller!r} is not mounted on this host "
                f"(needed to set {value})"
            )
        return point / self._rel

    def _apply_v1(self, res: Resources) -> None:
        if res.cpu_shares or res.cpu_period or res.cpu_quota:
            d = self._v1_dir("cpu", "cpu limits")
            if res.cpu_shares:
                _write(d / "cpu.shares", str(res.cpu_shares))
            # The period first; if the kernel refuses it against the old quota (EINVAL),
            # the quota first and the period again (runc's order).
            period_pending = False
            if res.cpu_period:
                try:
                    _write(d / "cpu.cfs_period_us", str(res.cpu_period))
                except _WriteError as e:
                    if not (e.errno == errno.EINVAL and res.cpu_quota):
                        raise
                    period_pending = True
            if res.cpu_quota:
                _write(d / "cpu.cfs_quota_us", str(res.cpu_quota))
                if period_pending:
                    _write(d / "cpu.cfs_period_us", str(res.cpu_period))
        if res.memory_limit or res.memory_swap_limit:
            self._memory_v1(self._v1_dir("memory", "memory limits"), res)
        if res.pids_limit:
            _write(self._v1_dir("pids", "pids.max") / "pids.max", _max(res.pids_limit))
        if res.cpuset_cpus or res.cpuset_mems:
            d = self._v1_dir("cpuset", "cpuset")
            if res.cpuset_cpus:
                _write(d / "cpuset.cpus", res.cpuset_cpus)
            if res.cpuset_mems:
                _write(d / "cpuset.mems", res.cpuset_mems)
        if res.hugepage_limits:
            d = self._v1_dir("hugetlb", "hugepage limits")
            for size, limit in res.hugepage_limits.items():
                _write(d / f"hugetlb.{size}.limit_in_bytes", str(limit))

    @staticmethod
    def _memory_v1(d: Path, res: Resources) -> None:
        memory, swap = res.memory_limit, res.memory_swap_limit
        memsw = d / "memory.memsw.limit_in_bytes"
        has_memsw = memsw.exists()
        if memory == -1 and swap == 0 and has_memsw:
            swap = -1  # unlimited memory means unlimited memory+swap (runc)
        if not has_memsw:
            swap = 0  # no swap accounting in this kernel: nothing to limit
        # memory.limit_in_bytes <= memory.memsw.limit_in_bytes at every moment: when the
        # new memory+swap limit is above the current memory limit, it goes first.
        swap_first = False
        if memory and swap:
            try:
                current = int(_read(d / "memory.limit_in_bytes").strip())
            except ValueError:
                current = -1
            swap_first = swap == -1 or (current >= 0 and current < swap)
        if swap_first:
            _write(memsw, str(swap))
        if memory:
            _write(d / "memory.limit_in_bytes", str(memory))
        if swap and not swap_first:
            _write(memsw, str(swap))

    def _apply_v2(self, res: Resources) -> None:
        d = self.layout.unified
        assert d is not None
        d = d / self._rel
        if res.cpu_quota or res.cpu_period:
            value = str(res.cpu_quota) if res.cpu_quota > 0 else "max"
            if res.cpu_period:
                value += f" {res.cpu_period}"
            _write(d / "cpu.max", value)
        if res.cpu_shares:
            _write(d / "cpu.weight", str(cpu_weight(res.cpu_shares)))
        if res.memory_limit or res.memory_swap_limit:
            swap = memory_swap_v2(res.memory_swap_limit, res.memory_limit)
            # A swap limit equal to the memory limit (what kubelet sends when the pod may
            # not swap) is "no swap": 0, written (runc does the same).
            if swap or res.memory_swap_limit > 0:
                value = _max(swap)
                target = d / "memory.swap.max"
                try:
                    _write(target, value)
                except _WriteError as e:
                    # No swap accounting: "max" or "0" then ask for nothing (runc).
                    if not (e.errno == errno.ENOENT and value in ("max", "0")):
                        raise
            if res.memory_limit:
                _write(d / "memory.max", _max(res.memory_limit))
        if res.pids_limit:
            _write(d / "pids.max", _max(res.pids_limit))
        if res.cpuset_cpus:
            _write(d / "cpuset.cpus", res.cpuset_cpus)
        if res.cpuset_mems:
            _write(d / "cpuset.mems", res.cpuset_mems)
        for size, limit in res.hugepage_limits.items():
            _write(d / f"hugetlb.{size}.max", str(limit))
        for key, value in res.unified.items():
            _write(d / key, value)

    # -- remove ---------------------------------------------------------------------------

    def remove(self, created: Sequence[Path]) -> None:
        """Remove the directories in ``created`` (as :meth:`create` returned), deepest first.

        Kills nothing: a directory that still holds processes (or child cgroups) stays, and
        FailedPrecondition names it, after every other directory was tried. Missing is fine.
        A parent this pod created that now holds other pods' cgroups is theirs too: it stays,
        without a retry or a failure.
        """
        failures: list[str] = []
        own = set(self.dirs())
        for directory in sorted(created, key=lambda p: len(p.parts), reverse=True):
            if any(directory in d.parents for d in own) and _others(directory, set(created)):
                continue
            problem = self._rmdir(directory)
            if problem:
                failures.append(problem)
        if failures:
            raise FailedPrecondition("pod cgroup not removed: " + "; ".join(failures))

    def _rmdir(self, directory: Path) -> str | None:
        delay = self.RMDIR_DELAY
        for attempt in range(self.RMDIR_TRIES):
            pids = members(directory)
            if pids:
                return f"{directory} still holds processes {', '.join(map(str, pids[:5]))}"
            try:
                os.rmdir(directory)
                return None
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == self.RMDIR_TRIES - 1:
                    return f"{directory}: {e.strerror}"
            time.sleep(delay)
            delay *= 2
        return f"{directory}: busy"


class PodSlice:
    """A pod's slice with the systemd driver: a unit of systemd's. kubelet makes it (a
    transient slice) before RunPodSandbox; where it has not, moorage does the same over
    D-Bus and stops it at removal. Limits are set as unit properties, so that systemd writes
    them and keeps them when it applies the unit's settings again (it writes its own values,
    the defaults for what it was not told, whenever it realizes the slice), and then in the
    files too, for what systemd has no property for (hugetlb, most ``unified`` keys) and
    for the exact CPU quota (systemd rounds it to 10 ms per second), as runc does.
    """

    def __init__(self, layout: Layout, name: str) -> None:
        self.name = name
        self.cgroup = PodCgroup(layout, systemd_slice_path(name))

    def __repr__(self) -> str:
        return f"PodSlice({self.name!r})"

    def exists(self) -> bool:
        with systemd.Manager() as manager:
            return manager.active_state(self.name) == "active"

    def create(self, description: str, res: Resources | None) -> None:
        """Start the slice as a transient unit with ``res`` (kubelet's properties for its
        pod slices: accounting on, no default dependencies)."""
        props: list[systemd.Property] = [
            ("Description", ("s", description)), ("DefaultDependencies", ("b", False)),
            *((name, ("b", True)) for name in ("CPUAccounting", "MemoryAccounting",
                                               "IOAccounting", "TasksAccounting")),
        ]
        if res is not None:
            props += systemd_properties(res)
        with systemd.Manager() as manager:
            manager.start_transient_unit(self.name, props)
        # systemd enables in the ancestors only the controllers it manages; hugetlb too, as
        # kubelet's libcontainer does for the slices it makes, so that the pod's and its
        # containers' hugepage limits can be applied.
        self.cgroup.enable_controllers()
        if res is not None:
            self.cgroup.apply(res)

    def apply(self, res: Resources) -> None:
        props = systemd_properties(res)  # refuses bad values before anything changes
        with systemd.Manager() as manager:
            manager.set_properties(self.name, props)
        self.cgroup.apply(res)

    def remove(self) -> None:
        """Stop the slice (systemd removes its cgroup); a slice systemd no longer has is
        removed already."""
        with systemd.Manager() as manager:
            manager.stop_unit(self.name)


#: The prefix of our cgroups below a pod cgroup: each container's (runc makes it) and the
#: infra process's.
OUR_PREFIX = "moorage-"


def _others(directory: Path, ours: set[Path]) -> bool:
    """Whether the cgroup ``directory`` has child cgroups other than ``ours``."""
    try:
        with os.scandir(directory) as entries:
            return any(e.is_dir(follow_symlinks=False) and Path(e.path) not in ours
                       for e in entries)
    except OSError:
        return False


def members(directory: Path) -> list[int]:
    """The pids in the cgroup ``directory`` (none if it is gone)."""
    return [int(p) for p in _read(directory / "cgroup.procs", missing="").split()]


def kill_members(directory: Path) -> None:
    """SIGKILL every process in the cgroup ``directory`` (blocking; the caller's rmdir
    retries while they exit)."""
    for pid in members(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- file helpers -----------------------------------------------------------------------------


class _WriteError(FailedPrecondition):
    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_


def _read(path: Path, missing: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return missing
    except OSError as e:
        raise FailedPrecondition(f"read {path}: {e.strerror}") from None


def _write(path: Path, value: str) -> None:
    """Write one cgroup file (no O_CREAT: the kernel makes the files, a missing one is an
    unsupported setting)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as e:
        raise _WriteError(f"write {value!r} to {path}: {e.strerror}", e.errno) from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise _WriteError(f"write {value!r} to {path}: {e.strerror}", e.errno) from None
    finally:
        os.close(fd)
