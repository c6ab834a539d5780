"""What the monitor and the daemon share: file names, the request, the exit file, wire framing.

Imported by the monitor program (loaded once by the monitor server before it forks) and by
:mod:`moorage.monitor.client` in the daemon. Pure functions, no I/O beyond reading small
files. The monitor program imports only C modules of the standard library where it can
(``_socket``, ``_signal``, ``_json``...): every module imported grows the memory that monitors
share, and Python wrappers (``json``, ``socket``, ``signal``) pull in ``re``, ``enum`` and more.
So JSON is read and written here with ``_json`` directly (:func:`loads`, :func:`dumps`).

Files of one container, in its ``state_dir`` (see ``docs/monitor.md``):

=================  ==========================================================================
``pidfile``        the container's init pid, written by ``runc create --pid-file``
``monitor.pid``    the monitor's pid (decimal, newline)
``console.sock``   the console socket runc sends the pty master to (tty only; removed after)
``attach``         attach socket (``SOCK_SEQPACKET``): output frames out, stdin in
``ctl``            control socket (``SOCK_SEQPACKET``): ``resize H W``, ``reopen``
``exit``           JSON exit status, written atomically once the container has exited
=================  ==========================================================================

Server directory ``<runroot>/monitor/``: ``server.sock``, ``server.lock``, ``server.pid``,
``server.log``.
"""

from __future__ import annotations

import _json
import binascii
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Bumped on any incompatible change of the request or the reply.
PROTOCOL_VERSION = 1

SERVER_DIR = "monitor"
SERVER_SOCKET = "server.sock"
SERVER_LOCK = "server.lock"
SERVER_PID = "server.pid"
SERVER_LOG = "server.log"

PIDFILE = "pidfile"
MONITOR_PID = "monitor.pid"
CONSOLE_SOCKET = "console.sock"
ATTACH_SOCKET = "attach"
CTL_SOCKET = "ctl"
EXIT_FILE = "exit"

#: Attach output frames: one byte naming the stream, then the bytes the container wrote
#: (at most :data:`MAX_OUTPUT_FRAME` bytes in all).
STREAM_STDOUT = 1
STREAM_STDERR = 2
MAX_OUTPUT_FRAME = 64 * 1024 + 1
#: The longest stdin packet an attach client may send; the rest of a longer one is lost.
MAX_INPUT_PACKET = 8192

#: The longest request line the server reads (it is passed on as one packet).
MAX_REQUEST = 64 * 1024
#: The longest ctl request.
MAX_CTL = 256
#: How long a monitor lets ``runtime create`` run before it kills it.
DEFAULT_CREATE_TIMEOUT = 240.0
#: Linux's limit on the length of a unix socket path (sun_path minus its NUL).
SUN_PATH_MAX = 107

#: Reply kinds of a failed create: the runtime refused, the request was bad, the machine failed.
KIND_RUNTIME = "runtime"
KIND_INVALID = "invalid"
KIND_INTERNAL = "internal"
#: ``runtime create`` overran its timeout and was killed.
KIND_TIMEOUT = "timeout"

_STR_FIELDS = ("id", "bundle", "runtime", "runtime_root", "state_dir", "log_path")
_BOOL_FIELDS = ("tty", "stdin", "stdin_once")


def request_problem(req: Any) -> str | None:
    """Why a create request (the decoded JSON object) is malformed; ``None`` if it is good."""
    if not isinstance(req, dict):
        return "the request is not a JSON object"
    for name in _STR_FIELDS:
        value = req.get(name)
        if not isinstance(value, str):
            return f"field {name!r} must be a string"
        if "\0" in value:
            return f"field {name!r} contains a NUL byte"
    for name in _BOOL_FIELDS:
        if not isinstance(req.get(name, False), bool):
            return f"field {name!r} must be a boolean"
    cid = req["id"]
    if not cid or "/" in cid or cid in (".", "..") or len(cid) > 1024:
        return f"container id {cid!r} is not a valid id"
    for name in ("bundle", "runtime", "state_dir", "log_path"):
        if not os.path.isabs(req[name]):
            return f"field {name!r} must be an absolute path, not {req[name]!r}"
    args = req.get("runtime_args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) and "\0" not in a for a in args):
        return "field 'runtime_args' must be a list of strings"
    max_line = req.get("log_max_line", 16384)
    if isinstance(max_line, bool) or not isinstance(max_line, int) or max_line < 1:
        return f"field 'log_max_line' must be a positive integer, not {max_line!r}"
    cgroup = req.get("cgroup_memory_dir", "")
    if not isinstance(cgroup, str) or (cgroup and not os.path.isabs(cgroup)):
        return "field 'cgroup_memory_dir' must be empty or an absolute path"
    timeout = req.get("timeout", DEFAULT_CREATE_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        return f"field 'timeout' must be a positive number, not {timeout!r}"
    if req.get("stdin_once") and not req.get("stdin"):
        return "stdin_once needs stdin"
    return None


def _runtime(req: dict[str, Any]) -> list[str]:
    """``<runtime> [--root R] [runtime_args...]``."""
    argv = [req["runtime"]]
    if req.get("runtime_root"):
        argv += ["--root", req["runtime_root"]]
    return argv + list(req.get("runtime_args", []))


def delete_argv(req: dict[str, Any]) -> list[str]:
    """``<runtime> [--root R] [runtime_args...] delete --force <id>``."""
    return [*_runtime(req), "delete", "--force", req["id"]]


def runtime_argv(req: dict[str, Any], console_socket: str | None) -> list[str]:
    """``<runtime> [--root R] [runtime_args...] create --bundle B --pid-file P [...] <id>``."""
    argv = _runtime(req)
    argv += ["create", "--bundle", req["bundle"], "--pid-file", PIDFILE]
    if console_socket is not None:
        argv += ["--console-socket", console_socket]
    argv.append(req["id"])
    return argv


# -- JSON without the json package ---------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _ScanContext:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constant)


_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
_WHITESPACE = " \t\n\r"


def loads(text: str) -> Any:
    """``json.loads`` for one document (NaN and Infinity refused); ValueError if malformed."""
    text = text.strip(_WHITESPACE)
    try:
        doc, end = _scan(text, 0)
    except StopIteration as e:
        raise ValueError(f"not JSON at character {e.value}") from None
    if end != len(text):
        raise ValueError(f"extra data after JSON at character {end}")
    return doc


def dumps(doc: Any) -> str:
    """``json.dumps`` (ASCII) for what the monitor writes: dicts, lists, str, int, bool, None."""
    if doc is None:
        return "null"
    if doc is True:
        return "true"
    if doc is False:
        return "false"
    if isinstance(doc, int):
        return int.__repr__(doc)
    if isinstance(doc, str):
        return str(_json.encode_basestring_ascii(doc))
    if isinstance(doc, list | tuple):
        return "[" + ", ".join(dumps(item) for item in doc) + "]"
    if isinstance(doc, dict):
        return "{" + ", ".join(f"{dumps(str(k))}: {dumps(v)}" for k, v in doc.items()) + "}"
    raise TypeError(f"cannot encode {type(doc).__name__} as JSON here")


# -- exit status -----------------------------------------------------------------------------


def exit_code_of(status: int) -> tuple[int, int | None]:
    """A ``waitpid`` status as (exit code, signal): 128+signal for a signal death."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return 255, None


def encode_exit(exit_code: int, exited_at: int, oom_killed: bool, sig: int | None) -> bytes:
    doc = {"exit_code": exit_code, "exited_at": exited_at, "oom_killed": oom_killed, "signal": sig}
    return dumps(doc).encode() + b"\n"


def decode_exit(raw: bytes) -> dict[str, Any] | None:
    """The exit file's fields, checked; ``None`` if it is not a complete exit record."""
    try:
        doc = loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError too
        return None
    if not isinstance(doc, dict):
        return None
    code, at, oom, sig = (doc.get(k) for k in ("exit_code", "exited_at", "oom_killed", "signal"))
    if not _is_int(code) or not _is_int(at) or not isinstance(oom, bool):
        return None
    if sig is not None and not _is_int(sig):
        return None
    return {"exit_code": code, "exited_at": at, "oom_killed": oom, "signal": sig}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- OOM kills -------------------------------------------------------------------------------


def oom_kill_count(text: str) -> int | None:
    """The ``oom_kill`` counter of a cgroup v1 ``memory.oom_control`` or v2 ``memory.events``.

    Both files are ``key value`` lines; ``None`` if the counter is missing (kernels before
    4.13 have none in v1).
    """
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def read_oom_kills(memory_dir: str) -> int | None:
    """The memory cgroup's OOM kill count (v2 ``memory.events``, else v1 ``memory.oom_control``).

    ``None`` when there is no cgroup directory, no such file, or no counter in it.
    """
    if not memory_dir:
        return None
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(memory_dir, name)) as f:
                text = f.read()
        except OSError:
            continue
        return oom_kill_count(text)
    return None


def oom_killed(before: int | None, after: int | None) -> bool:
    """Whether the counter went up while the container ran (a missing baseline counts as 0:
    the cgroup was made for the container by ``runtime create``)."""
    if after is None:
        return False
    return after > (before or 0)


# -- ctl -------------------------------------------------------------------------------------


def parse_ctl(raw: bytes) -> tuple[str, int, int]:
    """A ctl request as (command, height, width); ValueError says why it is malformed.

    ``resize <height> <width>`` (rows, columns; each 1..65535) or ``reopen``.
    """
    words = raw.decode("ascii", "replace").split()
    if words == ["reopen"]:
        return ("reopen", 0, 0)
    if len(words) == 3 and words[0] == "resize":
        try:
            height, width = int(words[1]), int(words[2])
        except ValueError:
            raise ValueError(f"resize needs two integers, not {words[1]!r} {words[2]!r}") from None
        if not (0 < height < 65536 and 0 < width < 65536):
            raise ValueError(f"window size {height}x{width} is out of range")
        return ("resize", height, width)
    raise ValueError(f"unknown ctl request {raw[:64]!r} (resize H W | reopen)")


# -- paths and versions ----------------------------------------------------------------------


def socket_address(path: str) -> tuple[str, int | None]:
    """An address for ``path`` that fits in a unix socket address.

    A path too long for ``sun_path`` is reached through an ``O_PATH`` descriptor of its
    directory: ``/proc/self/fd/<n>/<name>``. Returns (address, descriptor to close after
    ``connect``, or ``None``).
    """
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path, None
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd


def code_digest() -> str:
    """A digest of the monitor program's source (every module here but the client).

    The server reports the digest it started with; a client whose files differ (moorage was
    upgraded) replaces the server, so new monitors run the new code.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    crc, size = binascii.crc32(b"%d" % PROTOCOL_VERSION), 0
    for name in sorted(os.listdir(here)):
        if name.endswith(".py") and name != "client.py":
            with open(os.path.join(here, name), "rb") as f:
                data = name.encode() + b"\0" + f.read()
            crc, size = binascii.crc32(data, crc), size + len(data)
    return f"{PROTOCOL_VERSION}-{size:x}-{crc:08x}"
