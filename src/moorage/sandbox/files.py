"""The files every pod gets: hostname, hosts, resolv.conf, and the pod's ``/dev/shm``.

Content follows what kubelet and CRI-O give a pod, so that a pod sees the same files under
moorage as under them. Everything here blocks (file I/O, mount(2)): call it off the loop.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.util.fs import atomic_write

__all__ = [
    "MAX_DNS_SEARCHES",
    "MAX_DNS_SEARCH_CHARS",
    "SHM_ANNOTATIONS",
    "SHM_DEFAULT",
    "DnsConfig",
    "hosts_file",
    "mount_shm",
    "parse_size",
    "resolv_conf",
    "shm_size",
    "unmount",
    "validate_dns",
    "validate_hostname",
    "write_pod_files",
]


@dataclass(frozen=True)
class DnsConfig:
    """CRI ``DNSConfig``: all empty means "use the host's resolv.conf"."""

    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (self.servers or self.searches or self.options)


# -- hostname -------------------------------------------------------------------------------

#: Linux's HOST_NAME_MAX.
HOSTNAME_MAX = 64
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def validate_hostname(name: str) -> None:
    """Dot-separated RFC 1123 labels (1-63 characters each), at most 64 characters in all.

    64 is the kernel's limit for sethostname(2): kubelet passes the pod's hostname (a label)
    or, with ``setHostnameAsFQDN``, its FQDN. An empty name is refused: the caller decides
    what an unset hostname means (CRI-O uses the node's hostname).
    """
    if not name:
        raise InvalidArgument("config.hostname: must not be empty")
    if len(name) > HOSTNAME_MAX:
        raise InvalidArgument(
            f"config.hostname: {name[:80]!r} is {len(name)} characters, at most "
            f"{HOSTNAME_MAX} are allowed"
        )
    if not _HOSTNAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"config.hostname: {name!r} is not a valid hostname (RFC 1123 labels of letters, "
            "digits and '-', separated by '.')"
        )


def _check_plain_hostname(name: str) -> None:
    """The lighter check for file content: a hostname the caller took from the node may be
    any name the node accepts, but it must be one printable word of at most 64 characters."""
    if (
        not name
        or len(name) > HOSTNAME_MAX
        or any(c.isspace() or not c.isprintable() for c in name)
    ):
        raise InvalidArgument(
            f"config.hostname: {name[:80]!r} must be one word of 1 to {HOSTNAME_MAX} "
            "printable characters"
        )


# -- resolv.conf ----------------------------------------------------------------------------

#: kubelet's limits on the search list (MaxDNSSearchPaths, MaxDNSSearchListChars).
MAX_DNS_SEARCHES = 32
MAX_DNS_SEARCH_CHARS = 2048
_SEARCH_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_SEARCH_RE = re.compile(rf"{_SEARCH_LABEL}(?:\.{_SEARCH_LABEL})*\.?")
_OPTION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]*")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def validate_dns(dns: DnsConfig) -> None:
    """Every value goes into resolv.conf as one word: no whitespace, no second line."""
    for i, server in enumerate(dns.servers):
        if not _is_ip(server):
            raise InvalidArgument(
                f"config.dns_config.servers[{i}]: {server!r} is not an IPv4 or IPv6 address"
            )
    if len(dns.searches) > MAX_DNS_SEARCHES:
        raise InvalidArgument(
            f"config.dns_config.searches: {len(dns.searches)} search domains, at most "
            f"{MAX_DNS_SEARCHES} are allowed"
        )
    for i, search in enumerate(dns.searches):
        if len(search) > 254 or not _SEARCH_RE.fullmatch(search):
            raise InvalidArgument(
                f"config.dns_config.searches[{i}]: {search[:80]!r} is not a valid domain name"
            )
    total = len(" ".join(dns.searches))
    if total > MAX_DNS_SEARCH_CHARS:
        raise InvalidArgument(
            f"config.dns_config.searches: the search list is {total} characters, at most "
            f"{MAX_DNS_SEARCH_CHARS} are allowed"
        )
    for i, option in enumerate(dns.options):
        if not _OPTION_RE.fullmatch(option):
            raise InvalidArgument(
                f"config.dns_config.options[{i}]: {option[:80]!r} is not a resolver option "
                "(one word such as 'ndots:5' or 'edns0')"
            )


def resolv_conf(dns: DnsConfig, host_resolv: Path = Path("/etc/resolv.conf")) -> bytes:
    """The pod's resolv.conf.

    An empty ``dns`` gives the host's file unchanged (as CRI-O does; kubelet with
    ``dnsPolicy: Default`` passes the host's values anyway); a host without one gives an empty
    file (the resolver then asks localhost). Otherwise: one ``nameserver`` line per server,
    a ``search`` line, an ``options`` line.
    """
    if dns.is_empty():
        try:
            return host_resolv.read_bytes()
        except FileNotFoundError:
            return b""
    validate_dns(dns)
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return ("\n".join(lines) + "\n").encode()


# -- hosts ----------------------------------------------------------------------------------

#: kubelet's managed hosts file (pkg/kubelet/kubelet_pods.go), byte for byte.
_MANAGED_HOSTS_HEADER = (
    "# Kubernetes-managed hosts file.\n"
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "fe00::0\tip6-mcastprefix\n"
    "fe00::1\tip6-allnodes\n"
    "fe00::2\tip6-allrouters\n"
)


def hosts_file(
    hostname: str,
    pod_ips: Sequence[str],
    host_network: bool,
    host_hosts: Path = Path("/etc/hosts"),
) -> bytes:
    """The pod's /etc/hosts.

    Host network: the host's file unchanged (kubelet does the same). Otherwise kubelet's
    managed content (its loopback and ``fe00::`` lines, as kubelet writes them) and one
    ``<ip>\\t<hostname>`` line per pod IP. A host-network pod on a host without /etc/hosts
    gets the managed content without pod lines.
    """
    if host_network:
        try:
            return host_hosts.read_bytes()
        except FileNotFoundError:
            return _MANAGED_HOSTS_HEADER.encode()
    _check_plain_hostname(hostname)
    lines = [_MANAGED_HOSTS_HEADER]
    for i, ip in enumerate(pod_ips):
        if not _is_ip(ip):
            raise InvalidArgument(f"pod_ips[{i}]: {ip!r} is not an IPv4 or IPv6 address")
        lines.append(f"{ip}\t{hostname}\n")
    return "".join(lines).encode()


def write_pod_files(
    directory: Path,
    *,
    hostname: str,
    resolv: bytes,
    hosts: bytes,
    owner: tuple[int, int] | None = None,
) -> dict[str, Path]:
    """Write ``hostname`` (with a newline), ``hosts`` and ``resolv.conf`` into ``directory``.

    Each file is written atomically (temp file, rename; no fsync: the files live under the
    runroot, which a reboot empties, with the pod that uses them) with mode 0644; the directory
    is created with mode 0755 when missing. ``owner`` (host uid, gid): the files are chowned
    to it (the root of a pod with a user namespace, so that they are root's in the pod).
    Returns the paths by file name, for the bind mounts of every container of the pod.
    """
    _check_plain_hostname(hostname)
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
    contents = {"hostname": (hostname + "\n").encode(), "hosts": hosts, "resolv.conf": resolv}
    paths: dict[str, Path] = {}
    for name, data in contents.items():
        path = directory / name
        atomic_write(path, data, mode=0o644, durable=False)
        if owner is not None:
            os.chown(path, *owner)
        paths[name] = path
    return paths


# -- /dev/shm -------------------------------------------------------------------------------

SHM_DEFAULT = 64 * 1024 * 1024
#: Where the pod's /dev/shm size is read from, first found wins: CRI-O's annotation, then our
#: own alias.
SHM_ANNOTATIONS = ("io.kubernetes.cri-o.ShmSize", "io.moorage.shm-size")

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?) ?([kKmMgGtTpP])?[iI]?[bB]?")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_INT64_MAX = (1 << 63) - 1


def parse_size(text: str) -> int:
    """A RAM size as docker/go-units ``RAMInBytes`` reads it: binary units, case-insensitive.

    ``"65536"``, ``"64k"``, ``"128Mi"``, ``"128MB"``, ``"1G"``, ``"1.5GiB"`` (fractions are
    truncated to whole bytes). Raises ``ValueError`` for anything else.
    """
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid size {text!r}")
    number, unit = m.group(1), (m.group(2) or "").lower()
    mult = _SIZE_UNITS[unit]
    value: int
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * mult + int(frac) * mult // 10 ** len(frac)
    else:
        value = int(number) * mult
    if value > _INT64_MAX:
        raise ValueError(f"size {text!r} is too large")
    return value


def shm_size(annotations: Mapping[str, str]) -> int:
    """The size of the pod's /dev/shm: from the annotation when given, else 64 MiB.

    CRI-O reads ``io.kubernetes.cri-o.ShmSize``; ``io.moorage.shm-size`` is our alias. When
    both are given, CRI-O's wins. The size must be positive (tmpfs reads 0 as "no limit").
    """
    for key in SHM_ANNOTATIONS:
        text = annotations.get(key)
        if text is None:
            continue
        try:
            size = parse_size(text.strip())
        except ValueError as e:
            raise InvalidArgument(
                f"annotations[{key!r}]: {e} (expected a size such as '64Mi', '1G' or '65536')"
            ) from None
        if size <= 0:
            raise InvalidArgument(f"annotations[{key!r}]: the shm size must be positive")
        return size
    return SHM_DEFAULT


MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def mount_shm(path: Path, size: int, owner: tuple[int, int] | None = None) -> None:
    """Create ``path`` and mount a tmpfs ``shm`` of ``size`` bytes on it (mode 1777).

    nosuid, nodev, noexec, as CRI-O mounts it. ``owner`` (host uid, gid): the tmpfs root's
    owner (the root of a pod with a user namespace). mount(2) through ctypes: no fork.
    """
    if size <= 0:
        raise InvalidArgument(f"shm size {size} must be positive")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = f"mode=1777,size={size}".encode()
    if owner is not None:
        data += f",uid={owner[0]},gid={owner[1]}".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc.mount(b"shm", os.fsencode(path), b"tmpfs", flags, data) != 0:
        err = ctypes.get_errno()
        raise FailedPrecondition(
            f"mount shm (tmpfs, {data.decode()}) on {path}: {os.strerror(err)}"
        )


def unmount(path: Path) -> None:
    """Detach the mount at ``path``; not mounted or missing is fine."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise FailedPrecondition(f"unmount {path}: {os.strerror(err)}")
