"""AppArmor: which profile a container's process runs under, and our default profile.

As CRI-O (``internal/config/apparmor``) does it:

- On a host with AppArmor enabled (``/sys/module/apparmor/parameters/enabled`` is ``Y``),
  a container that asks for nothing or for ``RuntimeDefault`` runs under the configured
  default profile (``runtime.apparmor_profile``, :data:`DEFAULT_PROFILE` unless set).
  When that is our own profile it is loaded with ``apparmor_parser`` from the template we
  ship (``profiles/apparmor.profile``) if no profile of that name is loaded yet (at daemon
  start, and again before use, since an administrator may unload it); any other
  configured name must already be loaded (FailedPrecondition naming it). The name
  ``unconfined`` turns the default off.
- ``Unconfined`` runs unconfined; ``Localhost`` runs under the named profile (the
  ``localhost/`` prefix of the older string field is stripped), which must be loaded, as
  listed in ``/sys/kernel/security/apparmor/profiles`` (FailedPrecondition naming it).
- On a host without AppArmor, RuntimeDefault and nothing mean no profile (CRI-O); a
  ``Localhost`` profile is refused (FailedPrecondition "AppArmor is not enabled on this
  host"), as kubelet refuses such a pod on such a node.
- Privileged containers get no profile (the caller does not ask).
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
from collections.abc import Collection
from pathlib import Path

from moorage import log
from moorage.container.model import SecurityProfile
from moorage.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "DEFAULT_PROFILE",
    "UNCONFINED",
    "enabled",
    "ensure_default",
    "install",
    "loaded_profiles",
    "process_profile",
    "render_default",
]

#: The name our default profile is loaded under (CRI-O's is ``crio-default``).
DEFAULT_PROFILE = "moorage-default"
UNCONFINED = "unconfined"
ENABLED_FILE = "/sys/module/apparmor/parameters/enabled"
PROFILES_FILE = "/sys/kernel/security/apparmor/profiles"

_log = log.get("moorage.apparmor")


def enabled(path: str = ENABLED_FILE) -> bool:
    """AppArmor is enabled in this kernel."""
    try:
        return Path(path).read_text().strip() == "Y"
    except OSError:
        return False


def loaded_profiles(path: str = PROFILES_FILE) -> frozenset[str]:
    """The names of the loaded profiles (lines ``<name> (<mode>)``)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    names = set()
    for line in text.splitlines():
        name, sep, _mode = line.rstrip().rpartition(" (")
        names.add(name if sep else line.strip())
    names.discard("")
    return frozenset(names)


def render_default(name: str) -> str:
    """Our default profile's text, loaded under ``name``."""
    template = (importlib.resources.files("moorage.container") / "profiles"
                / "apparmor.profile").read_text()
    return template.replace("@NAME@", name)


def _parser() -> str:
    for candidate in ("/sbin/apparmor_parser", "/usr/sbin/apparmor_parser"):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("apparmor_parser")
    if found is None:
        raise FailedPrecondition("AppArmor is enabled but apparmor_parser is not installed; it "
                                 f"is needed to load the {DEFAULT_PROFILE} profile")
    return found


def install(name: str) -> None:
    """Load (or replace) our default profile under ``name`` into the kernel."""
    try:
        out = subprocess.run([_parser(), "-Kr"], input=render_default(name).encode(),
                             capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FailedPrecondition(f"loading AppArmor profile {name!r}: {e}") from None
    if out.returncode != 0:
        raise FailedPrecondition(f"loading AppArmor profile {name!r}: apparmor_parser: "
                                 f"{out.stderr.decode(errors='replace').strip()}")
    _log.info("apparmor.profile_loaded", profile=name)


def ensure_default(name: str, loaded: Collection[str] | None = None) -> None:
    """Load our default profile as ``name`` unless a profile of that name is loaded."""
    if name not in (loaded if loaded is not None else loaded_profiles()):
        install(name)


def process_profile(profile: SecurityProfile, *, default: str, host_enabled: bool,
                    loaded: Collection[str] | None, field: str) -> str | None:
    """``process.apparmorProfile`` for a container (None: leave it out); rules in the module
    docstring. ``loaded`` stands for the loaded profiles (None: read them)."""
    if not host_enabled:
        if profile.kind == "Localhost":
            raise FailedPrecondition(f"{field}: AppArmor profile {profile.localhost_ref!r} "
                                     "requested, but AppArmor is not enabled on this host")
        return None
    if profile.kind == "Unconfined":
        return UNCONFINED
    if profile.kind == "Localhost":
        name = profile.localhost_ref.strip().removeprefix("localhost/")
        if not name:
            raise InvalidArgument(f"{field}.localhost_ref: Localhost needs a profile name")
    else:  # RuntimeDefault, or nothing asked
        name = default
    if name == UNCONFINED:
        return UNCONFINED
    if name == DEFAULT_PROFILE:
        ensure_default(name, loaded)
        return name
    if name not in (loaded if loaded is not None else loaded_profiles()):
        what = "the configured default" if profile.kind != "Localhost" else "requested"
        raise FailedPrecondition(f"{field}: AppArmor profile {name!r} ({what}) is not loaded")
    return name
