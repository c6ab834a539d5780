"""CNI network configuration files: parsing, validation and choosing the default network.

The config dir holds ``*.conflist``, ``*.conf`` and ``*.json`` files, read in file-name order.
A single-plugin config (``.conf``, or a ``.json`` without ``plugins``) is wrapped into a
list of one, as libcni does. A file that cannot be used is skipped with a reason; the reasons
end up in the NetworkReady condition so an operator sees why the node is not ready.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CONFIG_SUFFIXES: tuple[str, ...] = (".conflist", ".conf", ".json")
#: Config files larger than this are refused (a config is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20

# libcni's rules (pkg/utils): names and container ids start with an alphanumeric and go on
# with alphanumerics, '_', '.' and '-'.
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says why."""


def version_tuple(version: str) -> tuple[int, int, int]:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"cniVersion {version!r} is not a version (want MAJOR.MINOR.PATCH)")
    return int(parts[0]), int(parts[1]), int(parts[2])


def at_least(version: str, minimum: str) -> bool:
    return version_tuple(version) >= version_tuple(minimum)


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


@dataclass(frozen=True, eq=False)
class NetworkConfigList:
    """One network: a name, a spec version and the plugins run in order."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    disable_check: bool = False
    disable_gc: bool = False
    source: str = ""
    #: The list document as used (a single-plugin config already wrapped), for the cache.
    document: dict[str, Any] = field(default_factory=dict)

    @property
    def plugin_types(self) -> tuple[str, ...]:
        return tuple(str(p["type"]) for p in self.plugins)


def _read_bool(doc: Mapping[str, Any], key: str) -> bool:
    value = doc.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{key} must be true or false, not {value!r}")


def _choose_version(doc: Mapping[str, Any]) -> str:
    """``cniVersion``, or the highest supported of ``cniVersions`` (spec 1.1) and it."""
    declared: list[str] = []
    version = doc.get("cniVersion")
    if version is not None:
        if not isinstance(version, str):
            raise ConfigError(f"cniVersion must be a string, not {version!r}")
        declared.append(version)
    versions = doc.get("cniVersions")
    if versions is not None:
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            raise ConfigError("cniVersions must be a list of strings")
        declared.extend(versions)
    if not declared:
        raise ConfigError("cniVersion is missing")
    usable = [v for v in declared if v in SUPPORTED_VERSIONS]
    if not usable:
        shown = ", ".join(repr(v) for v in declared)
        raise ConfigError(
            f"cniVersion {shown} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})"
        )
    return max(usable, key=version_tuple)


def _check_plugin(plugin: Any, where: str) -> dict[str, Any]:
    if not isinstance(plugin, dict):
        raise ConfigError(f"{where} is not a JSON object")
    kind = plugin.get("type")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{where} has no 'type'")
    if "/" in kind or kind in (".", ".."):
        raise ConfigError(f"{where} has type {kind!r}: a plugin type is a file name, not a path")
    caps = plugin.get("capabilities", {})
    if not isinstance(caps, dict) or not all(isinstance(v, bool) for v in caps.values()):
        raise ConfigError(f"{where} ({kind}): capabilities must map names to true or false")
    return plugin


def parse_list(doc: Mapping[str, Any], source: str = "") -> NetworkConfigList:
    """A network configuration list (``.conflist``) from its JSON document."""
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("network has no 'name'")
    if not valid_name(name):
        raise ConfigError(f"network name {name!r} has characters other than [a-zA-Z0-9_.-]")
    version = _choose_version(doc)
    plugins = doc.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise ConfigError(f"network {name!r} has no 'plugins' list")
    checked = tuple(
        _check_plugin(p, f"plugin {i} of network {name!r}") for i, p in enumerate(plugins)
    )
    return NetworkConfigList(
        name=name,
        cni_version=version,
        plugins=checked,
        disable_check=_read_bool(doc, "disableCheck"),
        disable_gc=_read_bool(doc, "disableGC"),
        source=source,
        document=dict(doc),
    )


def wrap_single(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A single-plugin config as a list document of one plugin (libcni ConfListFromConf)."""
    wrapped: dict[str, Any] = {"name": doc.get("name"), "plugins": [dict(doc)]}
    for key in ("cniVersion", "cniVersions"):
        if key in doc:
            wrapped[key] = doc[key]
    return wrapped


def parse_bytes(data: bytes, filename: str) -> NetworkConfigList:
    """A config file's content; ``.conflist`` must be a list, the others may be either."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError("not a JSON object")
    if filename.endswith(".conflist") or "plugins" in doc:
        return parse_list(doc, filename)
    _check_plugin(doc, "the plugin config")
    return parse_list(wrap_single(doc), filename)


def load_file(path: Path) -> NetworkConfigList:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}") from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES} bytes")
    return parse_bytes(data, str(path))


Snapshot = tuple[tuple[str, int, int, int], ...] | None


def config_files(conf_dir: Path) -> list[os.DirEntry[str]]:
    """Regular files (or links to them) with a config suffix, sorted by name."""
    entries = []
    with os.scandir(conf_dir) as it:
        for entry in it:
            if not entry.name.endswith(CONFIG_SUFFIXES):
                continue
            try:
                if not entry.is_file():
                    continue
            except OSError:
                continue
            entries.append(entry)
    entries.sort(key=lambda e: e.name)
    return entries


def snapshot(conf_dir: Path) -> Snapshot:
    """What decides whether the dir must be read again: names, mtimes, sizes, inodes.

    None when the directory does not exist or cannot be listed.
    """
    try:
        entries = config_files(conf_dir)
    except OSError:
        return None
    rows = []
    for entry in entries:
        try:
            st = entry.stat()  # follows a link, so a retargeted link is seen
        except OSError:
            continue
        rows.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(rows)


@dataclass(frozen=True)
class DirScan:
    """Every usable network of a config dir in file order, and why the others were skipped."""

    conf_dir: Path
    exists: bool
    networks: tuple[NetworkConfigList, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()  # (file name, reason)

    def select(self, default_network: str = "") -> tuple[NetworkConfigList | None, str]:
        """The default network, or None and the not-ready message."""
        if default_network:
            for net in self.networks:
                if net.name == default_network:
                    return net, ""
            found = ", ".join(f"{n.name} ({Path(n.source).name})" for n in self.networks)
            msg = (
                f"default CNI network {default_network!r} not found in {self.conf_dir}"
                f" (valid networks: {found or 'none'})"
            )
            return None, msg + self._refusals()
        if self.networks:
            return self.networks[0], ""
        if not self.exists:
            return None, f"CNI config dir {self.conf_dir} does not exist"
        if not self.refused:
            return None, (
                f"no CNI network config found in {self.conf_dir}"
                " (has the network provider started?)"
            )
        return None, f"no valid CNI network config in {self.conf_dir}" + self._refusals()

    def _refusals(self) -> str:
        if not self.refused:
            return ""
        return ": " + "; ".join(f"{name} skipped: {why}" for name, why in self.refused)


def scan(conf_dir: Path) -> DirScan:
    try:
        entries = config_files(conf_dir)
    except FileNotFoundError:
        return DirScan(conf_dir, exists=False)
    except OSError as e:
        return DirScan(conf_dir, exists=True, refused=((str(conf_dir), f"cannot list: {e}"),))
    networks: list[NetworkConfigList] = []
    refused: list[tuple[str, str]] = []
    for entry in entries:
        try:
            networks.append(load_file(Path(entry.path)))
        except ConfigError as e:
            refused.append((entry.name, str(e)))
    return DirScan(conf_dir, True, tuple(networks), tuple(refused))


def find_plugin(plugin_type: str, plugin_dirs: Sequence[Path]) -> Path | None:
    """The first executable file named ``plugin_type`` in the plugin dirs, in order."""
    if not plugin_type or "/" in plugin_type:
        return None
    for directory in plugin_dirs:
        candidate = directory / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None
