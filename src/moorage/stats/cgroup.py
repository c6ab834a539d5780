"""cgroup v1 and v2 readers: CPU, memory, pids and I/O of one cgroup, as plain numbers.

The parsers take file contents (strings) and are tested byte for byte over fixture trees;
the readers take directories and never raise for a missing file (a controller that is not
mounted, a kernel without a file, a cgroup that vanished): what cannot be read is ``None``.

Where the numbers come from (the same files and formulas as runc's and cAdvisor's readers),
cgroup v1 | cgroup v2:

- CPU usage: ``cpuacct.usage`` (ns) | ``cpu.stat`` usage_usec; user and system time:
  ``cpuacct.usage_user``/``usage_sys`` (else ``cpuacct.stat`` ticks) | user_usec,
  system_usec; throttling: ``cpu.stat`` nr_periods, nr_throttled, throttled_time (ns) |
  nr_periods, nr_throttled, throttled_usec.
- memory usage: ``memory.usage_in_bytes`` | ``memory.current``; working set: usage minus
  ``memory.stat`` total_inactive_file | inactive_file; RSS: total_rss | anon; page faults:
  total_pgfault, total_pgmajfault | pgfault, pgmajfault; limit: ``memory.limit_in_bytes``
  (2^62 and above: none) | ``memory.max`` ("max": none); swap: ``memory.memsw.usage_in_bytes``
  minus usage | ``memory.swap.current``; OOM kills: ``memory.oom_control`` oom_kill |
  ``memory.events`` oom_kill.
- processes: ``pids.current`` (both).
- I/O bytes and operations: ``blkio.throttle.io_service_bytes_recursive`` and
  ``io_serviced_recursive`` | ``io.stat``.
- pressure (PSI): none | ``cpu.pressure``, ``memory.pressure``, ``io.pressure``.

Everything here blocks (file reads): call it off the event loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moorage.sandbox.cgroups import Layout, container_cgroup_path

__all__ = [
    "UNLIMITED_V1",
    "CgroupLocation",
    "CgroupStats",
    "CpuSpec",
    "CpuStats",
    "IoDevice",
    "IoStats",
    "MemoryStats",
    "PidsStats",
    "Psi",
    "PsiData",
    "container_cgroup_path",
    "locate",
    "parse_blkio",
    "parse_flat",
    "parse_io_stat",
    "parse_psi",
    "read",
    "read_v1",
    "read_v2",
]

#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything at or
#: above this is taken as no limit (what kubelet and cAdvisor do).
UNLIMITED_V1 = 1 << 62
#: The v1 controllers whose directories the reader uses.
V1_READ = ("cpu", "cpuacct", "memory", "pids", "blkio")


# -- what is read -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PsiData:
    total_ns: int
    avg10: float
    avg60: float
    avg300: float


@dataclass(frozen=True)
class Psi:
    """Pressure stall information of one resource (cgroup v2 ``*.pressure``)."""

    some: PsiData
    full: PsiData | None = None


@dataclass(frozen=True)
class CpuSpec:
    """The CPU settings of the cgroup (for the ``container_spec_cpu_*`` metrics)."""

    period_us: int = 0
    quota_us: int = -1  # -1: no quota
    shares: int = 0


@dataclass(frozen=True)
class CpuStats:
    usage_ns: int
    user_ns: int | None = None
    system_ns: int | None = None
    periods: int = 0
    throttled_periods: int = 0
    throttled_ns: int = 0
    spec: CpuSpec | None = None
    psi: Psi | None = None


@dataclass(frozen=True)
class MemoryStats:
    usage: int
    working_set: int
    rss: int = 0
    cache: int = 0
    mapped_file: int = 0
    page_faults: int = 0
    major_page_faults: int = 0
    #: Faults of this cgroup alone (v1 ``pgfault`` without ``total_``); v2: the same as above.
    own_page_faults: int = 0
    own_major_page_faults: int = 0
    limit: int | None = None  # None: no limit
    reservation: int | None = None  # v1 soft limit, v2 memory.low; None: none
    max_usage: int | None = None  # v1 max_usage_in_bytes, v2 memory.peak
    failcnt: int | None = None  # v1 failcnt, v2 memory.events "max"
    kernel: int | None = None
    swap_usage: int | None = None
    swap_limit: int | None = None  # None: no limit or no swap accounting
    oom_kills: int | None = None
    psi: Psi | None = None

    @property
    def available(self) -> int | None:
        """limit - working set, when there is a limit (kubelet's definition)."""
        if self.limit is None:
            return None
        return max(self.limit - self.working_set, 0)


@dataclass(frozen=True)
class PidsStats:
    current: int
    limit: int | None = None  # None: no limit


@dataclass(frozen=True)
class IoDevice:
    major: int
    minor: int
    read_bytes: int = 0
    write_bytes: int = 0
    reads: int = 0
    writes: int = 0

    @property
    def name(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class IoStats:
    devices: tuple[IoDevice, ...] = ()
    psi: Psi | None = None


@dataclass(frozen=True)
class CgroupStats:
    timestamp_ns: int
    cpu: CpuStats | None = None
    memory: MemoryStats | None = None
    pids: PidsStats | None = None
    io: IoStats | None = None


# -- where a cgroup is ------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupLocation:
    """One cgroup's directories: each v1 controller's (v1 and hybrid hosts) or the one v2
    directory."""

    version: int
    v1: Mapping[str, Path]
    unified: Path | None = None


def locate(layout: Layout, path: str) -> CgroupLocation:
    """The directories of the cgroup at ``path`` (relative to the hierarchy roots)."""
    rel = path.strip("/")
    if layout.version == 2:
        assert layout.unified is not None
        return CgroupLocation(2, {}, layout.unified / rel)
    dirs = {c: layout.v1_controllers[c] / rel for c in V1_READ if c in layout.v1_controllers}
    return CgroupLocation(1, dirs, None)


def read(location: CgroupLocation, now_ns: int | None = None) -> CgroupStats | None:
    """Stats of the cgroup; None when it does not exist (any more)."""
    if location.version == 2:
        assert location.unified is not None
        return read_v2(location.unified, now_ns)
    return read_v1(location.v1, now_ns)


# -- parsers ------------------------------------------------------------------------------------


def parse_flat(text: str) -> dict[str, int]:
    """``key value`` lines (``cpu.stat``, ``memory.stat``, ``memory.events``, ``cpuacct.stat``,
    ``memory.oom_control``); lines that are not so are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            out[parts[0]] = int(parts[1])
        except ValueError:
            continue
    return out


def parse_psi(text: str) -> Psi | None:
    """``{cpu,memory,io}.pressure``: ``some avg10=.. avg60=.. avg300=.. total=<us>`` and the
    same for ``full``; totals become nanoseconds (the CRI's unit)."""
    found: dict[str, PsiData] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            continue
        fields: dict[str, str] = {}
        for item in rest.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        try:
            found[kind] = PsiData(
                total_ns=int(fields["total"]) * 1000, avg10=float(fields["avg10"]),
                avg60=float(fields["avg60"]), avg300=float(fields["avg300"]),
            )
        except (KeyError, ValueError):
            continue
    if "some" not in found:
        return None
    return Psi(some=found["some"], full=found.get("full"))


def _device(text: str) -> tuple[int, int] | None:
    major, sep, minor = text.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def parse_io_stat(text: str) -> tuple[IoDevice, ...]:
    """v2 ``io.stat``: ``MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N`` lines."""
    devices: dict[tuple[int, int], dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        dev = _device(parts[0])
        if dev is None:
            continue
        acc = devices.setdefault(dev, {})
        for item in parts[1:]:
            key, sep, value = item.partition("=")
            if sep and value.isdigit():
                acc[key] = acc.get(key, 0) + int(value)
    return tuple(
        IoDevice(major=d[0], minor=d[1], read_bytes=v.get("rbytes", 0),
                 write_bytes=v.get("wbytes", 0), reads=v.get("rios", 0),
                 writes=v.get("wios", 0))
        for d, v in sorted(devices.items())
    )


def parse_blkio(service_bytes: str, serviced: str) -> tuple[IoDevice, ...]:
    """v1 ``blkio.throttle.io_service_bytes[_recursive]`` and ``io_serviced[_recursive]``:
    ``MAJ:MIN Read|Write|Sync|Async|Discard|Total N`` lines, and a final ``Total N``."""
    devices: dict[tuple[int, int], dict[str, int]] = {}

    def take(text: str, prefix: str) -> None:
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3 or not parts[2].isdigit():
                continue
            dev = _device(parts[0])
            if dev is None or parts[1] not in ("Read", "Write"):
                continue
            acc = devices.setdefault(dev, {})
            key = prefix + parts[1]
            acc[key] = acc.get(key, 0) + int(parts[2])

    take(service_bytes, "bytes")
    take(serviced, "ops")
    return tuple(
        IoDevice(major=d[0], minor=d[1], read_bytes=v.get("bytesRead", 0),
                 write_bytes=v.get("bytesWrite", 0), reads=v.get("opsRead", 0),
                 writes=v.get("opsWrite", 0))
        for d, v in sorted(devices.items())
    )


# -- file helpers -------------------------------------------------------------------------------


def _text(path: Path) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # missing file or cgroup, ENODEV of a removed cgroup, EACCES...
        return None


def _int(path: Path) -> int | None:
    text = _text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _limit_v2(path: Path) -> int | None:
    text = _text(path)
    if text is None:
        return None
    value = text.strip()
    if value == "max" or not value.isdigit():
        return None
    return int(value)


def _limit_v1(value: int | None) -> int | None:
    if value is None or value < 0 or value >= UNLIMITED_V1:
        return None
    return value


def _working_set(usage: int, inactive_file: int) -> int:
    return usage - inactive_file if inactive_file < usage else 0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- cgroup v1 ----------------------------------------------------------------------------------


def read_v1(dirs: Mapping[str, Path], now_ns: int | None = None) -> CgroupStats | None:
    """Stats from the v1 controller directories ``dirs`` (controller -> the cgroup's dir);
    None when neither the cpuacct nor the memory directory exists."""
    cpuacct, memory = dirs.get("cpuacct"), dirs.get("memory")
    if not any(d is not None and d.is_dir() for d in (cpuacct, memory)):
        return None
    ts = now_ns if now_ns is not None else time.time_ns()
    return CgroupStats(
        timestamp_ns=ts,
        cpu=_cpu_v1(cpuacct, dirs.get("cpu")) if cpuacct is not None else None,
        memory=_memory_v1(memory) if memory is not None else None,
        pids=_pids(dirs["pids"]) if "pids" in dirs else None,
        io=_io_v1(dirs["blkio"]) if "blkio" in dirs else None,
    )


def _cpu_v1(cpuacct: Path, cpu: Path | None) -> CpuStats | None:
    usage = _int(cpuacct / "cpuacct.usage")
    if usage is None:
        return None
    user, system = _int(cpuacct / "cpuacct.usage_user"), _int(cpuacct / "cpuacct.usage_sys")
    if user is None or system is None:
        ticks = parse_flat(_text(cpuacct / "cpuacct.stat") or "")
        ns_per_tick = 1_000_000_000 // _CLK_TCK
        if "user" in ticks and "system" in ticks:
            user, system = ticks["user"] * ns_per_tick, ticks["system"] * ns_per_tick
    throttling: dict[str, int] = {}
    spec = None
    if cpu is not None:
        throttling = parse_flat(_text(cpu / "cpu.stat") or "")
        period, quota = _int(cpu / "cpu.cfs_period_us"), _int(cpu / "cpu.cfs_quota_us")
        shares = _int(cpu / "cpu.shares")
        if period is not None or quota is not None or shares is not None:
            spec = CpuSpec(period_us=period or 0, quota_us=quota if quota is not None else -1,
                           shares=shares or 0)
    return CpuStats(
        usage_ns=usage, user_ns=user, system_ns=system,
        periods=throttling.get("nr_periods", 0),
        throttled_periods=throttling.get("nr_throttled", 0),
        throttled_ns=throttling.get("throttled_time", 0),
        spec=spec,
    )


def _memory_v1(d: Path) -> MemoryStats | None:
    usage = _int(d / "memory.usage_in_bytes")
    if usage is None:
        return None
    stat = parse_flat(_text(d / "memory.stat") or "")
    memsw = _int(d / "memory.memsw.usage_in_bytes")
    oom = parse_flat(_text(d / "memory.oom_control") or "")
    return MemoryStats(
        usage=usage,
        working_set=_working_set(usage, stat.get("total_inactive_file", 0)),
        rss=stat.get("total_rss", 0),
        cache=stat.get("total_cache", 0),
        mapped_file=stat.get("total_mapped_file", 0),
        page_faults=stat.get("total_pgfault", 0),
        major_page_faults=stat.get("total_pgmajfault", 0),
        own_page_faults=stat.get("pgfault", 0),
        own_major_page_faults=stat.get("pgmajfault", 0),
        limit=_limit_v1(_int(d / "memory.limit_in_bytes")),
        reservation=_limit_v1(_int(d / "memory.soft_limit_in_bytes")),
        max_usage=_int(d / "memory.max_usage_in_bytes"),
        failcnt=_int(d / "memory.failcnt"),
        kernel=_int(d / "memory.kmem.usage_in_bytes"),
        swap_usage=max(memsw - usage, 0) if memsw is not None else None,
        swap_limit=_swap_limit_v1(d),
        oom_kills=oom.get("oom_kill"),
    )


def _swap_limit_v1(d: Path) -> int | None:
    """v1 limits memory+swap; the swap part is memsw limit - memory limit."""
    memsw = _limit_v1(_int(d / "memory.memsw.limit_in_bytes"))
    memory = _limit_v1(_int(d / "memory.limit_in_bytes"))
    if memsw is None or memory is None:
        return None
    return max(memsw - memory, 0)


def _pids(d: Path) -> PidsStats | None:
    current = _int(d / "pids.current")
    if current is None:
        return None
    text = _text(d / "pids.max")
    limit = None
    if text is not None and text.strip().isdigit():
        limit = int(text.strip())
    return PidsStats(current=current, limit=limit)


def _io_v1(d: Path) -> IoStats | None:
    service_bytes = _text(d / "blkio.throttle.io_service_bytes_recursive")
    serviced = _text(d / "blkio.throttle.io_serviced_recursive")
    if service_bytes is None:
        service_bytes = _text(d / "blkio.throttle.io_service_bytes")
        serviced = _text(d / "blkio.throttle.io_serviced")
    if service_bytes is None:
        return None
    return IoStats(devices=parse_blkio(service_bytes, serviced or ""))


# -- cgroup v2 ----------------------------------------------------------------------------------


def read_v2(d: Path, now_ns: int | None = None) -> CgroupStats | None:
    """Stats from the v2 cgroup directory ``d``; None when it does not exist."""
    if not d.is_dir():
        return None
    ts = now_ns if now_ns is not None else time.time_ns()
    return CgroupStats(timestamp_ns=ts, cpu=_cpu_v2(d), memory=_memory_v2(d), pids=_pids(d),
                       io=_io_v2(d))


def _psi(path: Path) -> Psi | None:
    text = _text(path)
    return parse_psi(text) if text is not None else None


def _cpu_v2(d: Path) -> CpuStats | None:
    text = _text(d / "cpu.stat")
    if text is None:
        return None
    stat = parse_flat(text)
    if "usage_usec" not in stat:
        return None
    spec = None
    cpu_max = _text(d / "cpu.max")
    weight = _int(d / "cpu.weight")
    if cpu_max is not None or weight is not None:
        quota, period = -1, 0
        parts = (cpu_max or "").split()
        if parts and parts[0].isdigit():
            quota = int(parts[0])
        if len(parts) > 1 and parts[1].isdigit():
            period = int(parts[1])
        # cAdvisor's inverse of the shares -> weight conversion.
        shares = 2 + ((weight - 1) * 262142) // 9999 if weight else 0
        spec = CpuSpec(period_us=period, quota_us=quota, shares=shares)
    return CpuStats(
        usage_ns=stat["usage_usec"] * 1000,
        user_ns=stat["user_usec"] * 1000 if "user_usec" in stat else None,
        system_ns=stat["system_usec"] * 1000 if "system_usec" in stat else None,
        periods=stat.get("nr_periods", 0),
        throttled_periods=stat.get("nr_throttled", 0),
        throttled_ns=stat.get("throttled_usec", 0) * 1000,
        spec=spec,
        psi=_psi(d / "cpu.pressure"),
    )


def _memory_v2(d: Path) -> MemoryStats | None:
    usage = _int(d / "memory.current")
    if usage is None:
        return None
    stat = parse_flat(_text(d / "memory.stat") or "")
    events = parse_flat(_text(d / "memory.events") or "")
    kernel = stat.get("kernel")
    if kernel is None and ("kernel_stack" in stat or "slab" in stat):
        kernel = stat.get("kernel_stack", 0) + stat.get("slab", 0) + stat.get("sock", 0)
    low = _int(d / "memory.low")
    return MemoryStats(
        usage=usage,
        working_set=_working_set(usage, stat.get("inactive_file", 0)),
        rss=stat.get("anon", 0),
        cache=stat.get("file", 0),
        mapped_file=stat.get("file_mapped", 0),
        page_faults=stat.get("pgfault", 0),
        major_page_faults=stat.get("pgmajfault", 0),
        own_page_faults=stat.get("pgfault", 0),
        own_major_page_faults=stat.get("pgmajfault", 0),
        limit=_limit_v2(d / "memory.max"),
        reservation=low or None,
        max_usage=_int(d / "memory.peak"),
        failcnt=events.get("max"),
        kernel=kernel,
        swap_usage=_int(d / "memory.swap.current"),
        swap_limit=_limit_v2(d / "memory.swap.max"),
        oom_kills=events.get("oom_kill"),
        psi=_psi(d / "memory.pressure"),
    )


def _io_v2(d: Path) -> IoStats | None:
    text = _text(d / "io.stat")
    psi = _psi(d / "io.pressure")
    if text is None and psi is None:
        return None
    return IoStats(devices=parse_io_stat(text or ""), psi=psi)
