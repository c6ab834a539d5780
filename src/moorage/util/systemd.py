"""sd_notify(3) without libsystemd: READY, STOPPING, WATCHDOG and STATUS over $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket

#: What :func:`take_environment` took out of the environment.
_taken: dict[str, str] = {}
_NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def take_environment() -> None:
    """Take the service manager's variables out of ``os.environ`` (sd_notify's
    ``unset_environment``), keeping them for :func:`notify`: no child may inherit them. An
    OCI runtime that finds ``NOTIFY_SOCKET`` passes a notify socket into the container
    (runc and crun then fail to start it: the socket's path under the runtime's state
    dir is too long, and the container is no service of ours anyway)."""
    for key in _NOTIFY_VARIABLES:
        value = os.environ.pop(key, None)
        if value is not None:
            _taken[key] = value


def _variable(key: str) -> str:
    return _taken.get(key) or os.environ.get(key, "")


def notify(message: str) -> bool:
    """Send ``message`` (e.g. "READY=1") to the service manager; False when there is none."""
    address = _variable("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), target)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = _variable("WATCHDOG_USEC")
    pid = _variable("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
