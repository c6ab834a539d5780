"""Seccomp profiles: the built-in RuntimeDefault profile, profiles read from files, and their
rendering into the OCI ``linux.seccomp`` object runc applies.

Two file formats are accepted, as CRI-O (containers/common) and containerd accept them:

- the docker / containers-common format: ``archMap`` (architectures by native
  architecture), and ``syscalls`` rules that may hold ``includes`` / ``excludes``
  conditions (``caps``: the container's bounding set must hold all of them / none of
  them; ``arches``: the native architecture, by Go name such as ``amd64``;
  ``minKernel``: ``"4.8"``) and a ``comment``;
- the OCI ``linux.seccomp`` format: ``architectures`` and unconditional ``syscalls``.

A profile is checked when it is loaded (:func:`parse`): actions, argument operators,
indexes and errno values must be ones runc accepts; a mistake is an InvalidArgument that
names the file and the place in it. :func:`render` then evaluates the conditions for one
container (its capabilities, this machine's architecture and kernel) and emits only OCI
keys: comments and our own ``blocked`` table (what the built-in profile blocks and why,
kept as data next to the rules) never reach runc. ``SCMP_ACT_NOTIFY`` is refused: moorage
runs no seccomp agent.

The built-in profile (``profiles/seccomp.json``) follows Docker's default profile and
containers-common's: EPERM for everything not allowed, an allow list of the ordinary
system calls, ``clone`` only without namespace flags, ``clone3`` answering ENOSYS (libc
then falls back to ``clone``), the privileged families allowed only when the container
holds the capability that governs them (``CAP_SYS_ADMIN`` unlocks mount, unshare, setns,
clone3...), and the kernel keyring, io_uring, kexec and obsolete calls blocked.

Localhost profiles are files on the host named by an absolute path (kubelet passes
``<root-dir>/seccomp/<localhostProfile>``, and has already refused ``..`` in the name).
As in CRI-O and containerd the path is opened as given, symbolic links followed (the file
and its directories belong to the node's administrator); it must be a regular file of at
most :data:`MAX_PROFILE_SIZE` bytes. A missing file is NotFound, anything else wrong with it
InvalidArgument; both name the CRI field and the path.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import platform
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorage.errors import InvalidArgument, NotFound

__all__ = [
    "MAX_PROFILE_SIZE",
    "Profile",
    "blocked",
    "builtin",
    "host_enabled",
    "load_file",
    "parse",
    "render",
]

#: Largest profile file read (Docker's default profile is about 20 KiB).
MAX_PROFILE_SIZE = 1024 * 1024

ACTIONS = frozenset({
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG",
})
_ERRNO_ACTIONS = frozenset({"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"})  # runc: errnoRet only here
OPERATORS = frozenset({
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
})
_NAME_RE = re.compile(r"[a-z0-9_]{1,64}")
_ARCH_RE = re.compile(r"SCMP_ARCH_[A-Z0-9_]+")
_FLAG_RE = re.compile(r"SECCOMP_FILTER_FLAG_[A-Z_]+")
_KERNEL_RE = re.compile(r"(\d+)\.(\d+)")
_U64 = 2**64 - 1

#: ``uname -m`` -> (names of that architecture in ``arches`` conditions, libseccomp name).
_MACHINES: dict[str, tuple[frozenset[str], str]] = {
    "x86_64": (frozenset({"amd64", "x86_64"}), "SCMP_ARCH_X86_64"),
    "aarch64": (frozenset({"arm64", "aarch64"}), "SCMP_ARCH_AARCH64"),
    "armv7l": (frozenset({"arm"}), "SCMP_ARCH_ARM"),
    "armv6l": (frozenset({"arm"}), "SCMP_ARCH_ARM"),
    "i686": (frozenset({"386", "x86"}), "SCMP_ARCH_X86"),
    "i386": (frozenset({"386", "x86"}), "SCMP_ARCH_X86"),
    "ppc64le": (frozenset({"ppc64le"}), "SCMP_ARCH_PPC64LE"),
    "s390x": (frozenset({"s390x"}), "SCMP_ARCH_S390X"),
    "riscv64": (frozenset({"riscv64"}), "SCMP_ARCH_RISCV64"),
}


@dataclass(frozen=True)
class _Condition:
    caps: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Rule:
    names: tuple[str, ...]
    action: str
    errno_ret: int | None
    args: tuple[dict[str, Any], ...]
    includes: _Condition
    excludes: _Condition


@dataclass(frozen=True, eq=False)
class Profile:
    """A checked seccomp profile (either format); ``source`` says where it came from."""

    source: str
    default_action: str
    default_errno_ret: int | None
    #: ``archMap``: native architecture -> its sub-architectures.
    arch_map: Mapping[str, tuple[str, ...]] | None
    architectures: tuple[str, ...]
    flags: tuple[str, ...]
    rules: tuple[_Rule, ...]
    #: The built-in profile's ``blocked`` table: (names, reason).
    blocked: tuple[tuple[tuple[str, ...], str], ...] = ()


# -- reading and checking ---------------------------------------------------------------------


def _bad(where: str, what: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: {what}")


def _str_list(value: Any, where: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(where, "is not a list of strings")
    if pattern is not None:
        for v in value:
            if not pattern.fullmatch(v):
                raise _bad(where, f"{v!r} is not valid")
    return tuple(value)


def _errno(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 4096:
        raise _bad(where, f"{value!r} is not an errno number")
    return value


def _kernel_version(text: str) -> tuple[int, int] | None:
    m = _KERNEL_RE.match(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _condition(value: Any, where: str) -> _Condition:
    if value is None:
        return _Condition()
    if not isinstance(value, dict):
        raise _bad(where, "is not an object")
    min_kernel = None
    if value.get("minKernel"):
        text = value["minKernel"]
        if not isinstance(text, str) or (min_kernel := _kernel_version(text)) is None:
            raise _bad(f"{where}.minKernel", f"{text!r} is not a kernel version like '4.8'")
    return _Condition(
        caps=tuple(c.upper() for c in _str_list(value.get("caps"), f"{where}.caps")),
        arches=_str_list(value.get("arches"), f"{where}.arches"),
        min_kernel=min_kernel,
    )


def _action(value: Any, where: str) -> str:
    if value == "SCMP_ACT_NOTIFY":
        raise _bad(where, "SCMP_ACT_NOTIFY needs a seccomp agent, which moorage does not run")
    if value not in ACTIONS:
        raise _bad(where, f"unknown action {value!r}")
    return str(value)


def _args(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad(where, "is not a list")
    out = []
    for i, arg in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(arg, dict):
            raise _bad(at, "is not an object")
        index = arg.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 5:
            raise _bad(f"{at}.index", f"{index!r} is not an argument index 0-5")
        for key in ("value", "valueTwo"):
            v = arg.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U64:
                raise _bad(f"{at}.{key}", f"{v!r} is not an unsigned 64-bit number")
        if arg.get("op") not in OPERATORS:
            raise _bad(f"{at}.op", f"unknown operator {arg.get('op')!r}")
        entry: dict[str, Any] = {"index": index, "value": arg.get("value", 0)}
        if arg.get("valueTwo"):
            entry["valueTwo"] = arg["valueTwo"]
        entry["op"] = arg["op"]
        out.append(entry)
    return tuple(out)


def _rule(value: Any, where: str) -> _Rule:
    if not isinstance(value, dict):
        raise _bad(where, "is not an object")
    names = list(_str_list(value.get("names"), f"{where}.names", _NAME_RE))
    if isinstance(value.get("name"), str):  # the docker format's older single name
        if not _NAME_RE.fullmatch(value["name"]):
            raise _bad(f"{where}.name", f"{value['name']!r} is not valid")
        names.append(value["name"])
    if not names:
        raise _bad(where, "names no system call")
    action = _action(value.get("action"), f"{where}.action")
    errno_ret = _errno(value.get("errnoRet"), f"{where}.errnoRet")
    if errno_ret is not None and action not in _ERRNO_ACTIONS:
        raise _bad(f"{where}.errnoRet", f"only goes with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, "
                   f"not {action}")
    return _Rule(
        names=tuple(names), action=action, errno_ret=errno_ret,
        args=_args(value.get("args"), f"{where}.args"),
        includes=_condition(value.get("includes"), f"{where}.includes"),
        excludes=_condition(value.get("excludes"), f"{where}.excludes"),
    )


def _arch_map(value: Any, where: str) -> dict[str, tuple[str, ...]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad(where, "is not a list")
    out: dict[str, tuple[str, ...]] = {}
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("architecture"), str):
            raise _bad(at, "is not an object with an architecture")
        if not _ARCH_RE.fullmatch(entry["architecture"]):
            raise _bad(f"{at}.architecture", f"{entry['architecture']!r} is not valid")
        out[entry["architecture"]] = _str_list(entry.get("subArchitectures"),
                                               f"{at}.subArchitectures", _ARCH_RE)
    return out


def _blocked(value: Any, where: str) -> tuple[tuple[tuple[str, ...], str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad(where, "is not a list")
    out = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("reason"), str):
            raise _bad(at, "is not an object with a reason")
        out.append((_str_list(entry.get("names"), f"{at}.names", _NAME_RE), entry["reason"]))
    return tuple(out)


def parse(data: bytes | str, source: str) -> Profile:
    """A profile from its JSON text; ``source`` names it in error messages."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(source, f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _bad(source, "is not a JSON object")
    for key in ("listenerPath", "listenerMetadata"):
        if doc.get(key):
            raise _bad(f"{source}: {key}", "seccomp agents are not supported")
    default_action = _action(doc.get("defaultAction"), f"{source}: defaultAction")
    default_errno = _errno(doc.get("defaultErrnoRet"), f"{source}: defaultErrnoRet")
    if default_errno is not None and default_action not in _ERRNO_ACTIONS:
        raise _bad(f"{source}: defaultErrnoRet", f"does not go with {default_action}")
    rules = doc.get("syscalls")
    if rules is not None and not isinstance(rules, list):
        raise _bad(f"{source}: syscalls", "is not a list")
    return Profile(
        source=source,
        default_action=default_action,
        default_errno_ret=default_errno,
        arch_map=_arch_map(doc.get("archMap"), f"{source}: archMap"),
        architectures=_str_list(doc.get("architectures"), f"{source}: architectures", _ARCH_RE),
        flags=_str_list(doc.get("flags"), f"{source}: flags", _FLAG_RE),
        rules=tuple(_rule(r, f"{source}: syscalls[{i}]") for i, r in enumerate(rules or [])),
        blocked=_blocked(doc.get("blocked"), f"{source}: blocked"),
    )


def load_file(path: str, field: str) -> Profile:
    """The profile in the file ``path`` (rules in the module docstring); ``field`` is the
    request or config field that named it."""
    if not path or "\0" in path:
        raise InvalidArgument(f"{field}: {path!r} is not a path to a seccomp profile")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{field}: seccomp profile {path!r} is not an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise NotFound(f"{field}: seccomp profile {path} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"{field}: seccomp profile {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{field}: seccomp profile {path} is not a regular file")
        if st.st_size > MAX_PROFILE_SIZE:
            raise InvalidArgument(f"{field}: seccomp profile {path} is larger than "
                                  f"{MAX_PROFILE_SIZE} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_PROFILE_SIZE + 1)
    except OSError as e:
        raise InvalidArgument(f"{field}: seccomp profile {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return parse(data, f"{field}: seccomp profile {path}")


@functools.cache
def builtin() -> Profile:
    """moorage's RuntimeDefault profile (``profiles/seccomp.json``, shipped as package data)."""
    data = (importlib.resources.files("moorage.container") / "profiles" / "seccomp.json"
            ).read_bytes()
    return parse(data, "built-in seccomp profile")


def blocked() -> tuple[tuple[tuple[str, ...], str], ...]:
    """What the built-in profile blocks, and why: (system call names, reason)."""
    return builtin().blocked


@functools.cache
def host_enabled() -> bool:
    """The kernel has seccomp filters (``Seccomp:`` in ``/proc/self/status``)."""
    try:
        return any(line.startswith("Seccomp:")
                   for line in Path("/proc/self/status").read_text().splitlines())
    except OSError:
        return False


# -- rendering --------------------------------------------------------------------------------


def _native(machine: str) -> tuple[frozenset[str], str]:
    return _MACHINES.get(machine, (frozenset({machine}), ""))


def _applies(rule: _Rule, caps: frozenset[str], arch_names: frozenset[str],
             kernel: tuple[int, int] | None) -> bool:
    inc, exc = rule.includes, rule.excludes
    if inc.caps and not all(c in caps for c in inc.caps):
        return False
    if inc.arches and not arch_names.intersection(inc.arches):
        return False
    if inc.min_kernel is not None and (kernel is None or kernel < inc.min_kernel):
        return False
    if exc.caps and any(c in caps for c in exc.caps):
        return False
    if exc.arches and arch_names.intersection(exc.arches):
        return False
    return not (exc.min_kernel is not None and kernel is not None and kernel >= exc.min_kernel)


def render(profile: Profile, capabilities: Iterable[str], *, machine: str | None = None,
           kernel: str | None = None) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object of ``profile`` for a container whose bounding set
    is ``capabilities`` (``CAP_`` names), on ``machine`` (``uname -m``) with ``kernel``
    (``uname -r``); those two default to this host's."""
    arch_names, scmp_arch = _native(machine or platform.machine())
    kernel_version = _kernel_version(kernel if kernel is not None else platform.release())
    caps = frozenset(c.upper() for c in capabilities)
    out: dict[str, Any] = {"defaultAction": profile.default_action}
    if profile.default_errno_ret is not None:
        out["defaultErrnoRet"] = profile.default_errno_ret
    if profile.arch_map is not None:
        if scmp_arch in profile.arch_map:
            out["architectures"] = [scmp_arch, *profile.arch_map[scmp_arch]]
    elif profile.architectures:
        out["architectures"] = list(profile.architectures)
    if profile.flags:
        out["flags"] = list(profile.flags)
    syscalls = []
    for rule in profile.rules:
        if not _applies(rule, caps, arch_names, kernel_version):
            continue
        entry: dict[str, Any] = {"names": list(rule.names), "action": rule.action}
        if rule.errno_ret is not None:
            entry["errnoRet"] = rule.errno_ret
        if rule.args:
            entry["args"] = [dict(a) for a in rule.args]
        syscalls.append(entry)
    out["syscalls"] = syscalls
    return out
