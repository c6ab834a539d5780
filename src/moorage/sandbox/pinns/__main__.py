"""``python -m moorage.sandbox.pinns``: create and pin a pod's namespaces, or start its infra.

See the package docstring for both commands and their output contract. Only the standard
library is imported (and only what is needed: no argparse, json or signal, whose imports
cost more than the helper's work): the helper runs once per pod and must start fast. Each
step that changes the machine is undone when a later step fails.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: no enum import
import ctypes
import os
import sys

from moorage.sandbox.pinns import (
    NAMESPACE_TYPES,
    hostname_problem,
    id_problem,
    mappings_problem,
    parse_mapping,
    sysctl_namespace,
    sysctl_problem,
)

TYPE_CHECKING = False  # mypy takes it as true; importing typing would cost milliseconds
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # the machine failed
EXIT_REFUSED = 2  # the request was refused

CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
_CLONE_FLAGS = {
    "user": CLONE_NEWUSER, "net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS
}

_MS_BIND = 4096
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_EINVAL = 22
_ENOENT = 2

_PIN_DIR_MODE = 0o700
_PIN_FILE_MODE = 0o600
#: The infra process gets this environment, not the daemon's.
_INFRA_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


class Refused(Exception):
    """The request cannot be done as asked (exit 2), as opposed to a failing machine."""


class _Libc:
    """The few libc calls that Python 3.11's ``os`` lacks."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._unshare = libc.unshare
        self._unshare.argtypes = [ctypes.c_int]
        self._setns = libc.setns
        self._setns.argtypes = [ctypes.c_int, ctypes.c_int]
        self._sethostname = libc.sethostname
        self._sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self._mount = libc.mount
        self._mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
        ]
        self._umount2 = libc.umount2
        self._umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._prctl = libc.prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int, what: str) -> None:
        self._check(self._unshare(flags), f"unshare({what})")

    def setns(self, fd: int, nstype: int, what: str) -> None:
        self._check(self._setns(fd, nstype), f"setns({what})")

    def sethostname(self, name: bytes) -> None:
        self._check(self._sethostname(name, len(name)), "sethostname")

    def bind_mount(self, src: str, dst: str) -> None:
        self._check(
            self._mount(os.fsencode(src), os.fsencode(dst), None, _MS_BIND, None),
            f"bind mount {src} on {dst}",
        )

    def detach(self, path: str) -> bool:
        """Lazily unmount ``path``; False once nothing is mounted there."""
        if self._umount2(os.fsencode(path), _MNT_DETACH) == 0:
            return True
        err = ctypes.get_errno()
        if err in (_EINVAL, _ENOENT):
            return False
        raise OSError(err, f"umount {path}: {os.strerror(err)}")

    def set_pdeathsig(self, sig: int) -> None:
        self._check(self._prctl(_PR_SET_PDEATHSIG, sig), "prctl(PR_SET_PDEATHSIG)")


# -- pin -------------------------------------------------------------------------------------


def _parse_options(
    argv: Sequence[str], *, flags: tuple[str, ...] = (), values: tuple[str, ...] = (),
    lists: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``--flag``, ``--name VALUE`` (or ``--name=VALUE``) and repeatable ``--item VALUE``
    options, keyed by name with ``_`` for ``-``; anything else is refused."""
    out: dict[str, Any] = {name.replace("-", "_"): False for name in flags}
    out.update((name.replace("-", "_"), None) for name in values)
    out.update((name.replace("-", "_"), []) for name in lists)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in flags and not eq:
            out[name.replace("-", "_")] = True
            continue
        if name not in values and name not in lists:
            raise Refused(f"unknown argument {arg!r}")
        if not eq:
            if i == len(argv):
                raise Refused(f"option --{name} needs a value")
            value = argv[i]
            i += 1
        if name in lists:
            out[name.replace("-", "_")].append(value)
        else:
            out[name.replace("-", "_")] = value
    return out


class _PinArgs:
    def __init__(self, options: dict[str, Any]) -> None:
        for required in ("dir", "id"):
            if options[required] is None:
                raise Refused(f"option --{required} is required")
        self.dir: str = options["dir"]
        self.id: str = options["id"]
        self.user: bool = options["user"]
        self.uid_map: list[str] = options["uid_map"]
        self.gid_map: list[str] = options["gid_map"]
        self.net: bool = options["net"]
        self.ipc: bool = options["ipc"]
        self.uts: bool = options["uts"]
        self.hostname: str = options["hostname"] or ""
        self.sysctl: list[str] = options["sysctl"]


def _parse_pin_args(argv: Sequence[str]) -> _PinArgs:
    """``--dir DIR --id ID [--user --uid-map C:H:L... --gid-map C:H:L...] [--net] [--ipc]
    [--uts] [--hostname NAME] [--sysctl KEY=VALUE...]`` (the package docstring)."""
    return _PinArgs(_parse_options(
        argv, flags=("user", "net", "ipc", "uts"), values=("dir", "id", "hostname"),
        lists=("uid-map", "gid-map", "sysctl"),
    ))


def _pin_sysctls(args: _PinArgs) -> list[tuple[str, str]]:
    """Parse and check every ``--sysctl``: only those of a namespace being created."""
    out: list[tuple[str, str]] = []
    for item in args.sysctl:
        key, sep, value = item.partition("=")
        if not sep:
            raise Refused(f"sysctl {item!r} is not KEY=VALUE")
        problem = sysctl_problem(key, value)
        if problem:
            raise Refused(problem)
        ns = sysctl_namespace(key)
        if ns is None:
            raise Refused(
                f"sysctl {key!r} is not namespaced (allowed: net.*, kernel.shm*, kernel.msg*, "
                "kernel.sem, fs.mqueue.*)"
            )
        if not getattr(args, ns):
            raise Refused(f"sysctl {key!r} needs a new {ns} namespace (--{ns})")
        out.append((key, value))
    return out


def _write_sysctl(key: str, value: str) -> None:
    """Write one sysctl from inside the new namespaces (so the value lands in them)."""
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise Refused(f"sysctl {key!r} does not exist in the pod's namespaces") from None
    except PermissionError:
        raise Refused(f"sysctl {key!r} is read-only") from None
    try:
        data = value.encode()
        try:
            written = os.write(fd, data)
        except OSError as e:
            raise Refused(f"sysctl {key!r}: the kernel refused {value!r}: {e.strerror}") from None
        if written != len(data):
            raise Refused(f"sysctl {key!r}: the kernel took {written} of {len(data)} bytes")
    finally:
        os.close(fd)


def _mappings(kind: str, texts: list[str]) -> list[tuple[int, int, int]]:
    out = []
    for text in texts:
        mapping = parse_mapping(text)
        if mapping is None:
            raise Refused(f"{kind}: {text!r} is not CONTAINER:HOST:LENGTH")
        out.append(mapping)
    problem = mappings_problem(kind, out)
    if problem:
        raise Refused(problem)
    return out


def _map_file(mappings: list[tuple[int, int, int]]) -> bytes:
    return "".join(f"{c} {h} {n}\n" for c, h, n in mappings).encode()


def _pin(libc: _Libc, args: _PinArgs, made: list[str]) -> dict[str, str]:
    """The pin command; every pin file it creates is appended to ``made`` before use."""
    problem = id_problem(args.id) or hostname_problem(args.hostname)
    if problem:
        raise Refused(problem)
    if not os.path.isabs(args.dir):
        raise Refused(f"pin directory {args.dir!r} is not absolute")
    types = [t for t in NAMESPACE_TYPES if getattr(args, t)]
    if not types:
        raise Refused("no namespace asked for (--user, --net, --ipc, --uts)")
    if args.hostname and not args.uts:
        raise Refused("--hostname needs a new UTS namespace (--uts)")
    if (args.uid_map or args.gid_map) and not args.user:
        raise Refused("--uid-map and --gid-map need a new user namespace (--user)")
    sysctls = _pin_sysctls(args)

    flags = 0
    for t in types:
        flags |= _CLONE_FLAGS[t]
    if args.user:
        uids = _mappings("uids", args.uid_map)
        gids = _mappings("gids", args.gid_map)
        with _UserNamespaceChild(libc, flags & ~CLONE_NEWUSER, args.hostname, sysctls) as child:
            child.map(uids, gids)
            return _bind_pins(libc, args, types, f"/proc/{child.pid}/ns", made)
    # This process is single-threaded: unshare() moves the whole process (run in a thread
    # of the daemon: that thread only, which ends after the pins are made).
    libc.unshare(flags, "+".join(types))
    _enter_setup(libc, args.hostname, sysctls)
    return _bind_pins(libc, args, types, "/proc/thread-self/ns", made)


def _enter_setup(libc: _Libc, hostname: str, sysctls: list[tuple[str, str]]) -> None:
    """Inside the new namespaces: the hostname, then the sysctls."""
    if hostname:
        libc.sethostname(hostname.encode("utf-8", "surrogateescape"))
    for key, value in sysctls:
        _write_sysctl(key, value)


class _UserNamespaceChild:
    """A forked child in a new user namespace, mapped from here, that then unshares the
    other namespaces (so the user namespace owns them) and waits until its namespaces are
    pinned: closing the pipe to it (leaving the ``with``) lets it exit; it is reaped then.

    The child reports each step on a pipe: ``b"."`` done, ``b"R"`` + message refused,
    ``b"F"`` + message failed.
    """

    def __init__(
        self, libc: _Libc, flags: int, hostname: str, sysctls: list[tuple[str, str]]
    ) -> None:
        self.libc = libc
        self.flags = flags
        self.hostname = hostname
        self.sysctls = sysctls
        self.pid = 0

    def __enter__(self) -> _UserNamespaceChild:
        up_r, self._up_w = os.pipe()  # child -> helper
        self._down_r, down_w = os.pipe()  # helper -> child
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child always leaves through os._exit)
            os.close(up_r)
            os.close(down_w)
            self._child()
        os.close(self._up_w)
        os.close(self._down_r)
        self.pid, self._up, self._down = pid, up_r, down_w
        try:
            self._expect("unshare(user)")
        except BaseException:
            self._end()
            raise
        return self

    def _child(self) -> None:  # pragma: no cover (runs in the forked child)
        code = 0
        try:
            libc = self.libc
            libc.set_pdeathsig(_signal.SIGKILL)
            libc.unshare(CLONE_NEWUSER, "user")
            os.write(self._up_w, b".")
            if os.read(self._down_r, 1) != b".":
                os._exit(1)  # the helper gave up
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            libc.set_pdeathsig(_signal.SIGKILL)  # a change of credentials cleared it
            if self.flags:
                libc.unshare(self.flags, "namespaces owned by the user namespace")
            _enter_setup(libc, self.hostname, self.sysctls)
            os.write(self._up_w, b".")
            os.read(self._down_r, 1)  # EOF: pinned (or given up)
        except Refused as e:
            code = 2
            os.write(self._up_w, b"R" + str(e).encode("utf-8", "replace")[:4000])
        except BaseException as e:
            code = 1
            message = _message(e) if isinstance(e, OSError) else repr(e)
            os.write(self._up_w, b"F" + message.encode("utf-8", "replace")[:4000])
        os._exit(code)

    def _expect(self, step: str) -> None:
        answer = os.read(self._up, 4096)
        if answer == b".":
            return
        message = answer[1:].decode("utf-8", "replace")
        if answer[:1] == b"R":
            raise Refused(message)
        if answer[:1] == b"F":
            raise OSError(f"user namespace child: {message}")
        raise OSError(f"user namespace child died during {step}")

    def map(self, uids: list[tuple[int, int, int]], gids: list[tuple[int, int, int]]) -> None:
        """Write the child's gid_map and uid_map, then let it create the other namespaces."""
        for name, mappings in (("gid_map", gids), ("uid_map", uids)):
            path = f"/proc/{self.pid}/{name}"
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                data = _map_file(mappings)
                try:
                    os.write(fd, data)
                except OSError as e:
                    raise Refused(
                        f"the kernel refused the {name} {data.decode().strip()!r}: {e.strerror}"
                    ) from None
            finally:
                os.close(fd)
        os.write(self._down, b".")
        self._expect("the creation of the namespaces")

    def _end(self) -> None:
        os.close(self._down)
        os.close(self._up)
        os.waitpid(self.pid, 0)

    def __exit__(self, *exc: object) -> None:
        self._end()


def _bind_pins(
    libc: _Libc, args: _PinArgs, types: list[str], ns_dir: str, made: list[str]
) -> dict[str, str]:
    pins: dict[str, str] = {}
    for t in types:
        type_dir = os.path.join(args.dir, t)
        os.makedirs(type_dir, mode=_PIN_DIR_MODE, exist_ok=True)
        path = os.path.join(type_dir, args.id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _PIN_FILE_MODE)
        except FileExistsError:
            raise OSError(f"pin {path} already exists") from None
        os.close(fd)
        made.append(path)
        libc.bind_mount(f"{ns_dir}/{t}", path)
        pins[t] = path
    return pins


def _undo_pins(libc: _Libc, made: Sequence[str]) -> None:
    for path in reversed(made):
        try:
            for _ in range(8):  # a pin mounted twice needs two unmounts
                if not libc.detach(path):
                    break
            os.unlink(path)
        except OSError as e:
            sys.stderr.write(f"pinns: cannot undo pin {path}: {e}\n")


# -- infra -----------------------------------------------------------------------------------


class _InfraArgs:
    def __init__(self, options: dict[str, Any]) -> None:
        self.user_ns: str | None = options["user_ns"]
        self.net_ns: str | None = options["net_ns"]
        self.ipc_ns: str | None = options["ipc_ns"]
        self.uts_ns: str | None = options["uts_ns"]
        self.cgroup_procs: list[str] = options["cgroup_procs"]


def _parse_infra_args(argv: Sequence[str]) -> tuple[_InfraArgs, list[str]]:
    """Options, then ``--``, then the command (so that its arguments need no quoting)."""
    argv = list(argv)
    if "--" not in argv:
        raise Refused("infra: no command (give it after '--')")
    cut = argv.index("--")
    options, command = argv[:cut], argv[cut + 1 :]
    parsed = _parse_options(
        options, values=("user-ns", "net-ns", "ipc-ns", "uts-ns"), lists=("cgroup-procs",))
    return _InfraArgs(parsed), command


def _become_infra(
    libc: _Libc, cgroup_procs: Sequence[str], command: Sequence[str], w: int, pod_root: bool
) -> None:
    """In the forked child (PID 1 of the new PID namespace): set up, then exec ``command``.

    ``pod_root``: become root of the user namespace joined (after the cgroups, which are
    the host's files: moving needs the host uid the process still has).
    """
    os.setsid()
    libc.set_pdeathsig(0)  # must outlive the helper and the daemon
    for procs in cgroup_procs:
        try:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")  # "0" is the writing process itself
            finally:
                os.close(fd)
        except OSError as e:
            raise OSError(e.errno, f"cannot join cgroup {procs}: {e.strerror}") from None
    if pod_root:
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        libc.set_pdeathsig(0)
    null = os.open("/dev/null", os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)  # the daemon's pipes must not stay open in the infra process
    os.closerange(3, w)
    os.closerange(w + 1, os.sysconf("SC_OPEN_MAX"))
    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):  # Python ignores them; exec would keep that
        _signal.signal(sig, _signal.SIG_DFL)
    os.chdir("/")
    try:
        os.execve(command[0], list(command), _INFRA_ENV)
    except OSError as e:
        raise OSError(e.errno, f"cannot exec {command[0]}: {e.strerror}") from None


def _infra(libc: _Libc, args: _InfraArgs, command: list[str]) -> dict[str, Any]:
    if not command or not os.path.isabs(command[0]):
        raise Refused(f"infra command {command!r} must start with an absolute path")
    namespaces = (
        ("user", args.user_ns), ("uts", args.uts_ns), ("ipc", args.ipc_ns), ("net", args.net_ns)
    )
    for nstype, path in namespaces:
        if path is None:
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            libc.setns(fd, _CLONE_FLAGS[nstype], f"{nstype} namespace {path}")
        finally:
            os.close(fd)
    libc.unshare(CLONE_NEWPID, "pid")  # only the next child enters the new PID namespace
    r, w = os.pipe()  # close-on-exec: EOF means the exec happened
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child either execs or reports and exits)
        try:
            os.close(r)
            _become_infra(libc, args.cgroup_procs, command, w, args.user_ns is not None)
        except BaseException as e:
            message = _message(e) if isinstance(e, OSError) else repr(e)
            try:
                os.write(w, message.encode("utf-8", "replace")[:4000])
            finally:
                os._exit(127)
        os._exit(127)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    if chunks:
        os.waitpid(pid, 0)
        raise OSError(f"infra process: {b''.join(chunks).decode('utf-8', 'replace')}")
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        raise OSError(f"infra process {command[0]} exited at once ({_describe(status)})")
    return {"pid": pid, "pid_ns": f"/proc/{pid}/ns/pid"}


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


# -- main ------------------------------------------------------------------------------------


def _message(e: OSError) -> str:
    """``strerror: file`` or our own message, without the ``[Errno n]`` prefix."""
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}"
    return e.strerror or str(e)


def _json_string(text: str) -> str:
    """``text`` as a JSON string, ASCII only (as ``json.dumps`` writes it by default)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code > 0xFFFF:  # a UTF-16 surrogate pair
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def _json(payload: dict[str, Any]) -> str:
    """A flat object of strings, integers and None as JSON (``json`` costs an import)."""
    items = []
    for key, value in payload.items():
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = _json_string(str(value))
        items.append(f"{_json_string(key)}: {text}")
    return "{" + ", ".join(items) + "}"


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(_json(payload) + "\n")
    sys.stdout.flush()


def run(argv: Sequence[str], *, in_thread: bool = False) -> tuple[int, dict[str, Any]]:
    """One command: (exit code, answer). ``in_thread``: called in a fresh thread of another
    program (the daemon), which the thread's namespaces die with unless pinned: only pins
    without a user namespace (``unshare(CLONE_NEWUSER)`` needs a single-threaded process)
    and no ``infra``."""
    argv = list(argv)
    made: list[str] = []
    libc: _Libc | None = None
    try:
        libc = _Libc()
        if in_thread:
            if argv[:1] == ["infra"] or "--user" in argv:
                raise Refused("infra and --user need the helper process")
        else:
            # Dying with the daemon: a half-done pin is found by the next start from its path.
            libc.set_pdeathsig(_signal.SIGKILL)
        if argv[:1] == ["infra"]:
            infra_args, command = _parse_infra_args(argv[1:])
            return EXIT_OK, _infra(libc, infra_args, command)
        return EXIT_OK, _pin(libc, _parse_pin_args(argv), made)
    except Refused as e:
        code, payload = EXIT_REFUSED, {"error": str(e)}
    except OSError as e:
        code, payload = EXIT_FAILED, {"error": _message(e)}
    except Exception as e:
        import traceback

        traceback.print_exc()
        code, payload = EXIT_FAILED, {"error": f"internal error: {type(e).__name__}: {e}"}
    if made and libc is not None:
        _undo_pins(libc, made)
    return code, payload


def main(argv: Sequence[str] | None = None) -> int:
    code, payload = run(sys.argv[1:] if argv is None else argv)
    _emit(payload)
    return code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # skip the interpreter's teardown: nothing is left to clean
