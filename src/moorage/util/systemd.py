"""Talking to systemd: sd_notify(3) without libsystemd (READY, STOPPING, WATCHDOG, STATUS over
$NOTIFY_SOCKET), and its manager's D-Bus API for the systemd cgroup driver (transient
slices, their properties, stopping them), over the system bus with jeepney.

The D-Bus calls block: call them off the event loop. Each :class:`Manager` is one
connection, for one short sequence of calls.
"""

from __future__ import annotations

import os
import socket
import time
from types import TracebackType
from typing import Any

from jeepney import DBusAddress, MatchRule, Properties, new_method_call  # type: ignore[import-untyped]
from jeepney.bus_messages import message_bus  # type: ignore[import-untyped]
from jeepney.io.blocking import open_dbus_connection  # type: ignore[import-untyped]
from jeepney.low_level import MessageType  # type: ignore[import-untyped]
from jeepney.wrappers import DBusErrorResponse  # type: ignore[import-untyped]

from moorage.errors import FailedPrecondition

#: A unit property as systemd's D-Bus API takes it: (name, (D-Bus signature, value)).
Property = tuple[str, tuple[str, Any]]
#: systemd's "no limit" for the 64-bit properties (MemoryMax, TasksMax, CPUQuotaPerSecUSec).
INFINITY = 2**64 - 1
#: How long a job (starting or stopping a unit) may take.
JOB_TIMEOUT = 30.0

_MANAGER = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                       interface="org.freedesktop.systemd1.Manager")
_NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"


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


class Manager:
    """systemd's manager (``org.freedesktop.systemd1.Manager``) on the system bus.

    ``with Manager() as systemd: ...``. Errors are FailedPrecondition naming the unit and
    systemd's answer.
    """

    def __init__(self) -> None:
        try:
            self._conn = open_dbus_connection(bus="SYSTEM")
        except (OSError, ValueError) as e:
            raise FailedPrecondition(
                f"cannot reach systemd on the D-Bus system bus (the systemd cgroup driver "
                f"needs it): {e}") from None
        # Job results come as JobRemoved signals, which systemd sends to subscribers.
        self._jobs_rule = MatchRule(type="signal", interface=_MANAGER.interface,
                                    member="JobRemoved", path=_MANAGER.object_path)
        self._call(message_bus.AddMatch(self._jobs_rule), "subscribe to job results")
        self._call(new_method_call(_MANAGER, "Subscribe"), "subscribe to job results")

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def _call(self, message: Any, what: str) -> tuple[Any, ...]:
        try:
            reply = self._conn.send_and_get_reply(message, timeout=JOB_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise FailedPrecondition(f"systemd: {what}: {e or 'timed out'}") from None
        if reply.header.message_type == MessageType.error:
            raise _SystemdError(what, DBusErrorResponse(reply))
        return tuple(reply.body)

    def _job(self, message: Any, what: str) -> None:
        """Call a method that returns a job, and wait for the job to end "done"."""
        with self._conn.filter(self._jobs_rule, bufsize=1000) as removed:
            (job,) = self._call(message, what)
            deadline = time.monotonic() + JOB_TIMEOUT
            while True:
                try:
                    signal = self._conn.recv_until_filtered(
                        removed, timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise FailedPrecondition(f"systemd: {what}: no result in "
                                             f"{JOB_TIMEOUT:.0f} s") from None
                _id, path, _unit, result = signal.body
                if path == job:
                    break
        if result != "done":
            raise FailedPrecondition(f"systemd: {what}: the job ended {result!r}")

    def start_transient_unit(self, name: str, properties: list[Property]) -> None:
        """Create and start the transient unit ``name`` (a slice or a scope)."""
        self._job(new_method_call(_MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                                  (name, "replace", properties, [])),
                  f"start transient unit {name}")

    def set_properties(self, name: str, properties: list[Property]) -> None:
        """Set properties of a unit until it stops (``systemctl set-property --runtime``)."""
        if properties:
            self._call(new_method_call(_MANAGER, "SetUnitProperties", "sba(sv)",
                                       (name, True, properties)),
                       f"set properties of {name} ({', '.join(p[0] for p in properties)})")

    def stop_unit(self, name: str) -> None:
        """Stop ``name``; a unit systemd does not have is stopped already."""
        try:
            self._job(new_method_call(_MANAGER, "StopUnit", "ss", (name, "replace")),
                      f"stop {name}")
        except _SystemdError as e:
            if e.name != _NO_SUCH_UNIT:
                raise

    def active_state(self, name: str) -> str:
        """The unit's ActiveState ("active", "inactive", ...); "" when systemd has no such
        unit loaded."""
        try:
            (path,) = self._call(new_method_call(_MANAGER, "GetUnit", "s", (name,)),
                                 f"look up {name}")
        except _SystemdError as e:
            if e.name == _NO_SUCH_UNIT:
                return ""
            raise
        unit = DBusAddress(path, bus_name=_MANAGER.bus_name,
                           interface="org.freedesktop.systemd1.Unit")
        ((_sig, state),) = self._call(Properties(unit).get("ActiveState"),
                                      f"read the state of {name}")
        return str(state)


class _SystemdError(FailedPrecondition):
    def __init__(self, what: str, error: DBusErrorResponse) -> None:
        detail = error.data[0] if error.data and isinstance(error.data[0], str) else error.name
        super().__init__(f"systemd: {what}: {detail}")
        self.name: str = error.name
