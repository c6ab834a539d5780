"""CDI (Container Device Interface) devices: the spec files, the devices they define, and
their edits to a container's OCI spec (the CNCF CDI specification, versions 0.3.0 to
1.0.0; what CRI-O and containerd do through the CDI Go library).

**Requests.** ``ContainerConfig.CDI_devices`` (kubelet fills it from device plugins and DRA
drivers) and every annotation whose key starts with ``cdi.k8s.io/`` (its value a comma
separated list: the older way, which device plugins still use) name devices by their
fully qualified name ``<vendor>/<class>=<name>``. The field's come first, then the
annotations' (by key); a device named twice is applied once. A name that is not fully
qualified, or that no spec defines, is InvalidArgument naming the field (or annotation)
and the device; for a device of a spec file that is invalid the message says why.

**Spec files.** Every ``*.json`` and ``*.yaml`` file directly in the spec dirs
(``[cdi] spec_dirs``; by default ``/etc/cdi`` then ``/var/run/cdi``), JSON or YAML. A
later dir wins: a device defined in two dirs is the later dir's; defined twice in one dir
(two files) it is a conflict and neither is used. Files are read again when they change
(each request stats them; nothing to watch). Parsing is strict, as the Go library's: an
unknown field, a value of the wrong type, an unknown ``cdiVersion`` or one older than the
features the file uses (``type`` of a mount needs 0.4.0, ``hostPath`` of a device node or
a device name starting with a digit 0.5.0, annotations or a dot in the class 0.6.0,
``intelRdt`` or ``additionalGids`` 0.7.0), a ``kind`` that is not ``vendor/class``, no
device, a device without edits: the file is skipped and the reason logged. Field names
match case-insensitively, as Go's JSON decoding does.

**Edits** (the spec's own ``containerEdits`` once if any of its devices is requested, then
each device's), applied after the rest of the OCI spec is built:

- ``env``: ``KEY=VALUE`` set, replacing a variable of the same name.
- ``deviceNodes``: a ``linux.devices`` entry (replacing one at the same path), ``hostPath``
  defaulting to ``path``; a missing ``type``, ``major`` and ``minor`` are those of the host
  node (``lstat``; a type that disagrees with the host's is an error); ``uid``/``gid``
  default to the process's when not root; ``fileMode`` is left to the runtime (0666 in
  runc) unless given. Block and char devices get a device cgroup rule with
  ``permissions`` (default ``rwm``; ``none``: no rule).
- ``mounts``: replacing a mount at the same container path, then every mount is sorted by
  the depth of its destination (stable), so parents come first.
- ``hooks``: appended to the OCI hooks of their name (``prestart``, ``createRuntime``,
  ``createContainer``, ``startContainer``, ``poststart``, ``poststop``).
- ``additionalGids``: added to the process's supplementary groups (0 ignored).
- ``intelRdt``: ``linux.intelRdt`` (the runtime needs resctrl on the host).

Not supported: ``netDevices`` and the other fields of CDI 1.1.0 (such a file is invalid
here); idmapped CDI mounts in a pod with a user namespace (runc 1.1 cannot make them: the
files show as owned by the overflow id). Everything here blocks (file reads, ``lstat``):
call it off the event loop.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moorage import log
from moorage.container.spec import mount_depth
from moorage.errors import InvalidArgument

__all__ = [
    "ANNOTATION_PREFIX",
    "DEFAULT_SPEC_DIRS",
    "DeviceNode",
    "Edits",
    "Hook",
    "Mount",
    "Registry",
    "Spec",
    "apply",
    "parse_spec",
    "requested",
]

_log = log.get("moorage.container.cdi")

ANNOTATION_PREFIX = "cdi.k8s.io/"
DEFAULT_SPEC_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))
#: The versions accepted; the earliest the Go library accepts is 0.3.0.
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0")
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
              "poststop")
#: A spec file larger than this is refused (the largest vendors' stay far below).
MAX_SPEC_SIZE = 16 * 1024 * 1024

_VENDOR_OR_CLASS = re.compile(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")
_PERMISSIONS = re.compile(r"[rwm]*")
_MAX_ID = 2**32 - 1


# -- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceNode:
    path: str
    host_path: str = ""
    type: str = ""
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    permissions: str = ""
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    type: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hook:
    name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True)
class Edits:
    """CDI ``containerEdits``: of a spec, of a device, or several of them appended."""

    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    hooks: tuple[Hook, ...] = ()
    additional_gids: tuple[int, ...] = ()
    #: OCI ``linux.intelRdt`` (CDI's names are OCI's); the last one set wins.
    intel_rdt: Mapping[str, Any] | None = None

    def __add__(self, other: Edits) -> Edits:
        return Edits(
            env=self.env + other.env, device_nodes=self.device_nodes + other.device_nodes,
            mounts=self.mounts + other.mounts, hooks=self.hooks + other.hooks,
            additional_gids=self.additional_gids + other.additional_gids,
            intel_rdt=other.intel_rdt if other.intel_rdt is not None else self.intel_rdt,
        )

    def empty(self) -> bool:
        return self == Edits()


@dataclass(frozen=True)
class Spec:
    """One valid spec file."""

    path: str
    version: str
    vendor: str
    cls: str
    edits: Edits
    devices: Mapping[str, Edits] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return f"{self.vendor}/{self.cls}"


# -- parsing --------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A spec file that cannot be used; the message says where and why."""


def _fields(value: Any, where: str, known: Sequence[str]) -> dict[str, Any]:
    """An object's fields by their canonical names (matched case-insensitively, as Go's
    JSON decoder does); an unknown field is an error, null is the same as absent."""
    if not isinstance(value, dict):
        raise _Invalid(f"{where}: expected an object")
    names = {k.lower(): k for k in known}
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = names.get(str(key).lower())
        if name is None:
            raise _Invalid(f"{where}: unknown field {key!r}")
        if item is not None:
            out[name] = item
    return out


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{where}: expected a string")
    return value


def _int(value: Any, where: str, low: int = -(2**63), high: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Invalid(f"{where}: expected an integer from {low} to {high}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"{where}: expected true or false")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"{where}: expected a list of strings")
    return tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(value))


def _annotations(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(f"{where}: expected an object of strings")
    return {str(k): _str(v, f"{where}.{k}") for k, v in value.items()}


def _env(value: Any, where: str) -> tuple[str, ...]:
    env = _strings(value, where)
    for i, item in enumerate(env):
        if item.find("=") <= 0:
            raise _Invalid(f"{where}[{i}]: {item!r} is not KEY=VALUE")
    return env


def _device_node(value: Any, where: str) -> DeviceNode:
    f = _fields(value, where, ("path", "hostPath", "type", "major", "minor", "fileMode",
                               "permissions", "uid", "gid"))
    node = DeviceNode(
        path=_str(f.get("path", ""), f"{where}.path"),
        host_path=_str(f.get("hostPath", ""), f"{where}.hostPath"),
        type=_str(f.get("type", ""), f"{where}.type"),
        major=_int(f.get("major", 0), f"{where}.major", 0),
        minor=_int(f.get("minor", 0), f"{where}.minor", 0),
        file_mode=(_int(f["fileMode"], f"{where}.fileMode", 0, _MAX_ID)
                   if "fileMode" in f else None),
        permissions=_str(f.get("permissions", ""), f"{where}.permissions"),
        uid=_int(f["uid"], f"{where}.uid", 0, _MAX_ID) if "uid" in f else None,
        gid=_int(f["gid"], f"{where}.gid", 0, _MAX_ID) if "gid" in f else None,
    )
    if not node.path:
        raise _Invalid(f"{where}.path: empty")
    if node.type not in ("", "b", "c", "u", "p"):
        raise _Invalid(f"{where}.type: {node.type!r} is not b, c, u or p")
    if node.permissions != "none" and not _PERMISSIONS.fullmatch(node.permissions):
        raise _Invalid(f"{where}.permissions: {node.permissions!r} is not made of r, w, m")
    return node


def _mount(value: Any, where: str) -> Mount:
    f = _fields(value, where, ("hostPath", "containerPath", "type", "options"))
    m = Mount(host_path=_str(f.get("hostPath", ""), f"{where}.hostPath"),
              container_path=_str(f.get("containerPath", ""), f"{where}.containerPath"),
              type=_str(f.get("type", ""), f"{where}.type"),
              options=_strings(f.get("options", []), f"{where}.options"))
    if not m.host_path:
        raise _Invalid(f"{where}.hostPath: empty")
    if not m.container_path:
        raise _Invalid(f"{where}.containerPath: empty")
    return m


def _hook(value: Any, where: str) -> Hook:
    f = _fields(value, where, ("hookName", "path", "args", "env", "timeout"))
    h = Hook(name=_str(f.get("hookName", ""), f"{where}.hookName"),
             path=_str(f.get("path", ""), f"{where}.path"),
             args=_strings(f.get("args", []), f"{where}.args"),
             env=_env(f.get("env", []), f"{where}.env"),
             timeout=(_int(f["timeout"], f"{where}.timeout", 1, 2**31 - 1)
                      if "timeout" in f else None))
    if h.name not in HOOK_NAMES:
        raise _Invalid(f"{where}.hookName: {h.name!r} is not one of {', '.join(HOOK_NAMES)}")
    if not h.path:
        raise _Invalid(f"{where}.path: empty")
    return h


def _intel_rdt(value: Any, where: str) -> dict[str, Any]:
    f = _fields(value, where, ("closID", "l3CacheSchema", "memBwSchema", "enableCMT",
                               "enableMBM"))
    out: dict[str, Any] = {}
    for key in ("closID", "l3CacheSchema", "memBwSchema"):
        if key in f and _str(f[key], f"{where}.{key}"):
            out[key] = f[key]
    for key in ("enableCMT", "enableMBM"):
        if key in f and _bool(f[key], f"{where}.{key}"):
            out[key] = True
    clos = out.get("closID", "")
    if clos != "/" and (len(clos) >= 4096 or clos in (".", "..") or "/" in clos
                        or "\n" in clos):
        raise _Invalid(f"{where}.closID: {clos!r} is not a valid name")
    return out


def _edits(value: Any, where: str) -> Edits:
    f = _fields(value, where, ("env", "deviceNodes", "hooks", "mounts", "intelRdt",
                               "additionalGids"))

    def items(key: str) -> list[tuple[Any, str]]:
        raw = f.get(key, [])
        if not isinstance(raw, list):
            raise _Invalid(f"{where}.{key}: expected a list")
        return [(v, f"{where}.{key}[{i}]") for i, v in enumerate(raw)]

    gids = tuple(_int(v, w, 0, _MAX_ID) for v, w in items("additionalGids"))
    return Edits(
        env=_env(f.get("env", []), f"{where}.env"),
        device_nodes=tuple(_device_node(v, w) for v, w in items("deviceNodes")),
        mounts=tuple(_mount(v, w) for v, w in items("mounts")),
        hooks=tuple(_hook(v, w) for v, w in items("hooks")),
        additional_gids=gids,
        intel_rdt=_intel_rdt(f["intelRdt"], f"{where}.intelRdt") if "intelRdt" in f else None,
    )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _required_version(vendor_class: tuple[str, str], annotated: bool, edits: list[Edits],
                      names: list[str]) -> str:
    """The earliest spec version with every feature the file uses (the Go library's
    rules)."""
    if any(e.intel_rdt is not None or e.additional_gids for e in edits):
        return "0.7.0"
    if annotated or "." in vendor_class[1]:
        return "0.6.0"
    if any(n[:1].isdigit() for n in names) or any(
            d.host_path for e in edits for d in e.device_nodes):
        return "0.5.0"
    if any(m.type for e in edits for m in e.mounts):
        return "0.4.0"
    return "0.3.0"


def parse_spec(data: bytes, path: str) -> Spec:
    """A spec file's content (JSON for ``*.json``, else YAML), validated (module
    docstring); InvalidArgument naming the file and the reason otherwise."""
    try:
        return _parse(data, path)
    except _Invalid as e:
        raise InvalidArgument(f"CDI spec {path}: {e}") from None


def _load_yaml(data: bytes) -> Any:
    """YAML with libyaml's safe loader where PyYAML was built with it (the pure one
    otherwise); ValueError if it is not YAML. PyYAML is imported here, on nodes that have
    a YAML spec, rather than by every daemon."""
    import yaml

    try:
        return yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ValueError(str(e) or type(e).__name__) from None


def _parse(data: bytes, path: str) -> Spec:
    try:
        raw = json.loads(data) if path.endswith(".json") else _load_yaml(data)
    except ValueError as e:
        raise _Invalid(f"not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    f = _fields(raw, "spec", ("cdiVersion", "kind", "annotations", "devices",
                              "containerEdits"))
    version = _str(f.get("cdiVersion", ""), "cdiVersion").removeprefix("v")
    if version not in VERSIONS:
        raise _Invalid(f"cdiVersion {version!r} is not supported (supported: "
                       f"{', '.join(VERSIONS)})")
    kind = _str(f.get("kind", ""), "kind")
    vendor, _, cls = kind.partition("/")
    if not _VENDOR_OR_CLASS.fullmatch(vendor) or not _VENDOR_OR_CLASS.fullmatch(cls):
        raise _Invalid(f"kind {kind!r} is not <vendor>/<class> (letters, digits, '_', '-', "
                       "'.'; starting with a letter)")
    annotated = bool(_annotations(f.get("annotations", {}), "annotations"))
    edits = _edits(f.get("containerEdits", {}), "containerEdits")
    raw_devices = f.get("devices", [])
    if not isinstance(raw_devices, list) or not raw_devices:
        raise _Invalid("devices: at least one device is needed")
    devices: dict[str, Edits] = {}
    for i, item in enumerate(raw_devices):
        where = f"devices[{i}]"
        d = _fields(item, where, ("name", "annotations", "containerEdits"))
        name = _str(d.get("name", ""), f"{where}.name")
        if not _DEVICE_NAME.fullmatch(name):
            raise _Invalid(f"{where}.name: {name!r} is not a device name (letters, digits, "
                           "'_', '-', '.', ':')")
        if name in devices:
            raise _Invalid(f"{where}.name: device {name!r} is defined twice")
        annotated |= bool(_annotations(d.get("annotations", {}), f"{where}.annotations"))
        dev_edits = _edits(d.get("containerEdits", {}), f"{where}.containerEdits")
        if dev_edits.empty():
            raise _Invalid(f"{where}.containerEdits: a device needs edits")
        devices[name] = dev_edits
    needed = _required_version((vendor, cls), annotated, [edits, *devices.values()],
                               list(devices))
    if _version(needed) > _version(version):
        raise _Invalid(f"cdiVersion {version} is older than the features used need "
                       f"({needed})")
    return Spec(path=path, version=version, vendor=vendor, cls=cls, edits=edits,
                devices=devices)


# -- requests -------------------------------------------------------------------------------------


def _qualified(name: str, where: str) -> str:
    kind, sep, device = name.partition("=")
    vendor, slash, cls = kind.partition("/")
    if not (sep and slash and _VENDOR_OR_CLASS.fullmatch(vendor)
            and _VENDOR_OR_CLASS.fullmatch(cls) and _DEVICE_NAME.fullmatch(device)):
        raise InvalidArgument(f"{where}: {name!r} is not a fully qualified CDI device name "
                              "(<vendor>/<class>=<name>)")
    return name


def requested(cdi_devices: Sequence[str], annotations: Mapping[str, str]
              ) -> list[tuple[str, str]]:
    """The devices a container asks for, each with the field that named it: the
    ``CDI_devices`` first, then the ``cdi.k8s.io/`` annotations by key; each once."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    named = [(f"config.CDI_devices[{i}].name", n) for i, n in enumerate(cdi_devices)]
    for key in sorted(k for k in annotations if k.startswith(ANNOTATION_PREFIX)):
        named += [(f"config.annotations[{key!r}]", n.strip())
                  for n in annotations[key].split(",")]
    for where, name in named:
        _qualified(name, where)
        if name not in seen:
            seen.add(name)
            out.append((where, name))
    return out


# -- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    key: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    spec: Spec | None
    error: str = ""


class Registry:
    """The devices of the spec files in ``dirs`` (later dirs win); thread-safe."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = tuple(dirs)
        self._lock = threading.Lock()
        self._files: dict[str, _Loaded] = {}

    def _load(self, path: str) -> _Loaded | None:
        """The file, parsed again only when it changed; None once it is gone."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        known = self._files.get(path)
        if known is not None and known.key == key:
            return known
        try:
            if st.st_size > MAX_SPEC_SIZE:
                raise InvalidArgument(f"CDI spec {path}: larger than {MAX_SPEC_SIZE} bytes")
            with open(path, "rb") as f:
                data = f.read(MAX_SPEC_SIZE + 1)
            loaded = _Loaded(key, parse_spec(data, path))
        except OSError as e:
            loaded = _Loaded(key, None, f"CDI spec {path}: cannot read: {e.strerror or e}")
        except InvalidArgument as e:
            loaded = _Loaded(key, None, e.message)
        if loaded.spec is None:
            _log.warning("cdi.spec_invalid", path=path, error=loaded.error)
        else:
            _log.info("cdi.spec_loaded", path=path, kind=loaded.spec.kind,
                      devices=len(loaded.spec.devices))
        return loaded

    def _scan(self) -> tuple[dict[str, tuple[int, Spec]], dict[str, list[str]]]:
        """(qualified device -> (dir priority, spec), kind -> problems), read afresh."""
        devices: dict[str, tuple[int, Spec]] = {}
        problems: dict[str, list[str]] = {}
        conflicts: set[str] = set()
        files: dict[str, _Loaded] = {}
        for priority, directory in enumerate(self.dirs):
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                if not name.endswith((".json", ".yaml")):
                    continue
                path = os.path.join(directory, name)
                loaded = self._load(path)
                if loaded is None:
                    continue
                files[path] = loaded
                if loaded.spec is None:
                    problems.setdefault("", []).append(loaded.error)
                    continue
                spec = loaded.spec
                for device in spec.devices:
                    qualified = f"{spec.kind}={device}"
                    other = devices.get(qualified)
                    if other is not None and other[0] == priority:
                        conflicts.add(qualified)
                        problems.setdefault(spec.kind, []).append(
                            f"device {qualified!r} is defined by both {other[1].path} and "
                            f"{spec.path}")
                    devices[qualified] = (priority, spec)
        self._files = files
        for qualified in conflicts:
            del devices[qualified]
        return devices, problems

    def resolve(self, requests: Sequence[tuple[str, str]]) -> Edits:
        """The edits for ``requests`` (``(field, qualified name)``, from
        :func:`requested`): each spec's own edits once, before its first device's."""
        if not requests:
            return Edits()
        with self._lock:
            devices, problems = self._scan()
        edits = Edits()
        specs_seen: set[str] = set()
        for where, name in requests:
            found = devices.get(name)
            if found is None:
                kind = name.partition("=")[0]
                why = problems.get(kind, []) + problems.get("", [])
                dirs = ", ".join(str(d) for d in self.dirs) or "none configured"
                raise InvalidArgument(
                    f"{where}: unresolvable CDI device {name!r}: no valid spec file in "
                    f"{dirs} defines it" + (f" ({'; '.join(why)})" if why else ""))
            spec = found[1]
            if spec.path not in specs_seen:
                specs_seen.add(spec.path)
                edits = edits + spec.edits
            edits = edits + spec.devices[name.partition("=")[2]]
        return edits


# -- applying -------------------------------------------------------------------------------------


def _host_node(node: DeviceNode) -> DeviceNode:
    """``node`` with what it leaves out taken from the host's device node."""
    node = replace(node, host_path=node.host_path or node.path)
    if node.type and (node.major or node.type == "p"):
        return node
    try:
        st = os.lstat(node.host_path)
    except OSError as e:
        raise InvalidArgument(f"CDI device node {node.path}: host device {node.host_path!r}: "
                              f"{e.strerror or e}") from None
    if stat.S_ISBLK(st.st_mode):
        host_type = "b"
    elif stat.S_ISCHR(st.st_mode):
        host_type = "c"
    elif stat.S_ISFIFO(st.st_mode):
        host_type = "p"
    else:
        raise InvalidArgument(f"CDI device node {node.path}: {node.host_path!r} is not a "
                              "device node")
    if node.type and node.type != host_type and not (node.type == "u" and host_type == "c"):
        raise InvalidArgument(f"CDI device node {node.path}: type {node.type!r}, but the host's "
                              f"{node.host_path!r} is {host_type!r}")
    node = replace(node, type=node.type or host_type)
    if not node.major and node.type != "p":
        node = replace(node, major=os.major(st.st_rdev), minor=os.minor(st.st_rdev))
    return node


def apply(doc: dict[str, Any], edits: Edits) -> None:
    """Apply ``edits`` to the OCI spec ``doc`` in place (rules in the module docstring)."""
    process = doc.setdefault("process", {})
    user = process.setdefault("user", {})
    linux = doc.setdefault("linux", {})
    env: list[str] = process.setdefault("env", [])
    for item in edits.env:
        key = item.partition("=")[0]
        at = next((i for i, e in enumerate(env) if e.partition("=")[0] == key), None)
        if at is None:
            env.append(item)
        else:
            env[at] = item
    devices: list[dict[str, Any]] = linux.setdefault("devices", [])
    rules: list[dict[str, Any]] = linux.setdefault("resources", {}).setdefault("devices", [])
    for wanted in edits.device_nodes:
        node = _host_node(wanted)
        entry: dict[str, Any] = {"path": node.path, "type": node.type, "major": node.major,
                                 "minor": node.minor}
        if node.file_mode is not None:
            entry["fileMode"] = node.file_mode
        uid = node.uid if node.uid is not None else user.get("uid") or None
        gid = node.gid if node.gid is not None else user.get("gid") or None
        if uid is not None:
            entry["uid"] = uid
        if gid is not None:
            entry["gid"] = gid
        devices[:] = [d for d in devices if d.get("path") != node.path]
        devices.append(entry)
        access = {"": "rwm", "none": ""}.get(node.permissions, node.permissions)
        if node.type in ("b", "c", "u") and access:
            rules.append({"allow": True, "type": "b" if node.type == "b" else "c",
                          "major": node.major, "minor": node.minor, "access": access})
    if edits.mounts:
        mounts: list[dict[str, Any]] = doc.setdefault("mounts", [])
        for m in edits.mounts:
            mounts[:] = [x for x in mounts if x.get("destination") != m.container_path]
            mount: dict[str, Any] = {"destination": m.container_path, "source": m.host_path}
            if m.type:
                mount["type"] = m.type
            if m.options:
                mount["options"] = list(m.options)
            mounts.append(mount)
        mounts.sort(key=lambda x: mount_depth(str(x.get("destination", ""))))
    for h in edits.hooks:
        hook: dict[str, Any] = {"path": h.path}
        if h.args:
            hook["args"] = list(h.args)
        if h.env:
            hook["env"] = list(h.env)
        if h.timeout is not None:
            hook["timeout"] = h.timeout
        doc.setdefault("hooks", {}).setdefault(h.name, []).append(hook)
    if edits.intel_rdt is not None:
        linux["intelRdt"] = dict(edits.intel_rdt)
    gids: list[int] = user.setdefault("additionalGids", [])
    for gid in edits.additional_gids:
        if gid and gid not in gids:
            gids.append(gid)
