"""A runtime handler: the adapter around runc, crun or any OCI runtime command line.

Every call is one spawn of ``<binary> --root <root> <command>`` (``moorage.util.proc``:
fork and exec in a worker thread, never on the event loop; never ``preexec_fn``: the daemon
runs grpc threads), in its own session so that a timeout can kill the runtime and every
helper it started as one process group.

Control commands (start, kill, delete, state, update, pause, resume, ...) are bounded by
``command_timeout`` (60 s by default); when it passes, the process group is killed and
``DeadlineExceeded`` names the command.  ``runtime create`` is not here: the per-container
monitor runs it (``argv()`` builds its command line).

``exec_sync`` (ExecSync, exec probes) runs ``runtime exec [--user] [--cwd] [--env]...
--pid-file <tmp> <id> <cmd...>``: the command-line form, in which runc takes the rest of the
process (environment, capabilities, apparmor/selinux labels, rlimits, no_new_privileges)
from the container's own ``config.json``, as kubelet expects of an exec.  See
``exec_sync`` for output caps, timeouts and how the process is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorage import log
from moorage.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from moorage.util.proc import DEVNULL, PIPE, Process, spawn

_log = log.get("moorage.oci")

#: ExecSync output cap per stream: CRI-O's and conmon-rs's 16 MiB (CVE-2022-1708), which is
#: also kubelet's gRPC message limit; the old dockershim capped exec output the same way.
MAX_EXEC_OUTPUT = 16 * 1024 * 1024

#: How long ``exec_sync`` lets the runtime exit by itself after its command was killed
#: (it reaps the command and drains the pipes) before killing it too.
_EXEC_REAP_GRACE = 2.0

# Messages that mean "nothing to do" for kill and delete (runc, crun and youki wordings).
_GONE = re.compile(
    r"does not exist|not found|no such file or directory|no such container",
    re.IGNORECASE,
)
_NOT_RUNNING = re.compile(
    r"not running|no such process|process already finished|container .*is stopped|"
    r"\bESRCH\b",
    re.IGNORECASE,
)

#: Cleanups that outlive a cancelled call (a reference keeps each task alive).
_background: set[asyncio.Future[None]] = set()

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9_+.][A-Za-z0-9_+.\-]*$")
_SIGNAL_NAME = re.compile(r"^[A-Za-z0-9+]+$")


class OciRuntimeError(FailedPrecondition):
    """An OCI runtime command failed (or the runtime binary is missing).

    ``message`` carries the runtime's own error text (parsed from its stderr); the raw
    stderr, the exit code and the command are kept for logs.
    """

    def __init__(
        self,
        message: str,
        *,
        handler: str,
        command: Sequence[str] = (),
        exit_code: int | None = None,
        stderr: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.handler = handler
        self.command = list(command)
        self.exit_code = exit_code
        self.stderr = stderr


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    #: True only from ``exec_sync(..., raise_on_timeout=False)``; exit_code is then -1.
    timed_out: bool = False
    #: stdout or stderr went past ``max_output``; the rest was read and thrown away.
    truncated: bool = False


def parse_runc_error(stderr: bytes) -> str:
    """The error message in a runtime's stderr.

    runc logs through logrus: JSON lines (``{"level":"error","msg":"..."}`` with
    ``--log-format json``) or text lines (``time="..." level=error msg="..."``); crun prints
    ``crun: <message>``; anything else is taken as plain text.  Error-level messages win over
    others; the last one is returned (runc prints the fatal error last).
    """
    text = stderr.decode("utf-8", "replace")
    errors: list[str] = []
    others: list[str] = []
    plain: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        level, msg = _parse_log_line(line)
        if msg is None:
            plain.append(line)
        elif level in ("error", "fatal", "panic"):
            errors.append(msg)
        else:
            others.append(msg)
    if errors:
        return errors[-1]
    if plain:
        return "; ".join(plain)
    if others:
        return others[-1]
    return ""


_LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def _parse_log_line(line: str) -> tuple[str | None, str | None]:
    """(level, msg) of one logrus line, or (None, None) when it is not one."""
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            return None, None
        if isinstance(obj, dict) and isinstance(obj.get("msg"), str):
            level = obj.get("level")
            return (level if isinstance(level, str) else None), obj["msg"].strip()
        return None, None
    if "msg=" not in line or "level=" not in line:
        if line.startswith("crun: "):
            return "error", line[len("crun: ") :].strip()
        return None, None
    fields: dict[str, str] = {}
    for key, value in _LOGFMT_FIELD.findall(line):
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        fields[key] = value
    if "msg" not in fields:
        return None, None
    return fields.get("level"), fields["msg"].strip()


def _check_id(container_id: str) -> None:
    if not container_id or not _CONTAINER_ID.match(container_id):
        raise InvalidArgument(f"invalid container id {container_id!r}")


class OciRuntime:
    """One runtime handler: a binary plus its state directory (``--root``)."""

    def __init__(
        self,
        name: str,
        binary: str,
        root: Path,
        *,
        systemd_cgroup: bool = False,
        command_timeout: float = 60.0,
        create_timeout: float = 240.0,
        exec_dir: Path | None = None,
    ) -> None:
        """``binary``: a path, or a name looked up in PATH at first use ("" means ``name``).

        ``exec_dir`` holds exec_sync's short-lived pid files (default: the temp dir).
        """
        self.name = name
        self.binary = binary or name
        self.root = root
        self.systemd_cgroup = systemd_cgroup
        self.command_timeout = command_timeout
        #: How long the monitor lets ``create`` run (it runs the command, not us).
        self.create_timeout = create_timeout
        self.exec_dir = exec_dir
        self._resolved: str | None = None
        self._features: dict[str, Any] | None = None
        self._version: str | None = None

    def __repr__(self) -> str:
        return f"OciRuntime({self.name!r}, {self.binary!r}, root={str(self.root)!r})"

    # ------------------------------------------------------------------ command lines

    @property
    def global_args(self) -> list[str]:
        return ["--root", str(self.root), *self.cgroup_args]

    @property
    def cgroup_args(self) -> list[str]:
        """The global options of the cgroup driver (``--systemd-cgroup``), which every
        command that makes or changes a cgroup needs, the monitor's ``create`` too."""
        return ["--systemd-cgroup"] if self.systemd_cgroup else []

    def binary_path(self) -> str:
        """The runtime binary's path (looked up in PATH once)."""
        if self._resolved is not None:
            return self._resolved
        if "/" in self.binary:
            path: str | None = self.binary
            if not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
                path = None
        else:
            path = shutil.which(self.binary)
        if path is None:
            where = "" if "/" in self.binary else " in PATH"
            raise OciRuntimeError(
                f"runtime handler {self.name!r}: binary {self.binary!r} not found{where} "
                "or not executable",
                handler=self.name,
            )
        self._resolved = path
        return path

    def argv(self, *args: str) -> list[str]:
        """``[binary, *global_args, *args]``, e.g. for the monitor's ``create``."""
        return [self.binary_path(), *self.global_args, *args]

    # ------------------------------------------------------------------ control commands

    async def _run(
        self,
        *args: str,
        stdin: bytes | None = None,
        timeout: float | None = None,
        global_args: bool = True,
    ) -> tuple[int, bytes, bytes]:
        """Run one runtime command; (exit code, stdout, stderr).  Bounded by a timeout."""
        argv = self.argv(*args) if global_args else [self.binary_path(), *args]
        limit = self.command_timeout if timeout is None else timeout
        try:
            proc = await spawn(
                argv,
                stdin=PIPE if stdin is not None else DEVNULL,
                stdout=PIPE,
                stderr=PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise OciRuntimeError(
                f"runtime handler {self.name!r}: cannot run {argv[0]}: {e.strerror or e}",
                handler=self.name,
                command=argv,
            ) from e
        try:
            async with asyncio.timeout(limit if limit and limit > 0 else None):
                out, err = await proc.communicate(stdin)
        except BaseException as e:
            await _kill_group_and_wait(proc)
            if isinstance(e, TimeoutError):
                raise DeadlineExceeded(
                    f"runtime handler {self.name!r}: `{_show(args)}` did not finish "
                    f"within {limit:g}s"
                ) from None
            raise
        code = proc.returncode
        assert code is not None
        _log.debug("oci command", handler=self.name, args=list(args), exit_code=code)
        return code, out, err

    async def _check(
        self, *args: str, stdin: bytes | None = None, ignore: re.Pattern[str] | None = None
    ) -> bytes:
        """Run a command; raise ``OciRuntimeError`` unless it succeeds (or ``ignore`` matches
        its error message, which then yields ``b""``)."""
        code, out, err = await self._run(*args, stdin=stdin)
        if code == 0:
            return out
        msg = parse_runc_error(err) or f"exit status {code}"
        if ignore is not None and ignore.search(msg):
            return b""
        raise OciRuntimeError(
            f"runtime handler {self.name!r}: `{_show(args)}` failed: {msg}",
            handler=self.name,
            command=self.argv(*args),
            exit_code=code,
            stderr=err,
        )

    async def version(self) -> str:
        """The runtime's version (``runc --version`` first line: "runc version 1.1.5")."""
        if self._version is None:
            code, out, err = await self._run("--version", global_args=False)
            if code != 0:
                raise OciRuntimeError(
                    f"runtime handler {self.name!r}: --version failed: "
                    f"{parse_runc_error(err) or f'exit status {code}'}",
                    handler=self.name,
                    exit_code=code,
                    stderr=err,
                )
            first = out.decode("utf-8", "replace").strip().splitlines()
            line = first[0] if first else ""
            m = re.search(r"version\s+(\S+)", line)
            self._version = m.group(1) if m else line.strip()
        return self._version

    async def features(self) -> dict[str, Any]:
        """``<runtime> features`` (runc >= 1.1, crun >= 1.5): {} when the runtime has no
        such command, prints no JSON object, or cannot be run at all.  Cached until
        :meth:`forget_features`."""
        if self._features is None:
            result: dict[str, Any] = {}
            try:
                code, out, _err = await self._run("features")
            except (OciRuntimeError, DeadlineExceeded) as e:
                _log.warning("oci.features_failed", handler=self.name, error=e.message)
                code, out = 1, b""
            if code == 0:
                with contextlib.suppress(ValueError):
                    parsed = json.loads(out)
                    if isinstance(parsed, dict):
                        result = parsed
            self._features = result
        return self._features

    def forget_features(self) -> None:
        """Drop what ``features`` and ``version`` learnt: the next call asks the binary
        again (SIGHUP: the runtime may have been upgraded)."""
        self._features = None
        self._version = None

    async def supports_mount_option(self, option: str) -> bool:
        """Whether ``features()`` lists ``option`` (e.g. "rro") in mountOptions."""
        options = (await self.features()).get("mountOptions") or []
        return isinstance(options, list) and option in options

    async def start(self, container_id: str) -> None:
        _check_id(container_id)
        await self._check("start", container_id)

    async def kill(
        self, container_id: str, signal: int | str, *, all_processes: bool = False
    ) -> None:
        """Send ``signal`` (a number, "KILL" or "SIGKILL"); a stopped or missing container
        is not an error."""
        _check_id(container_id)
        if isinstance(signal, int):
            if signal <= 0:
                raise InvalidArgument(f"invalid signal {signal}")
            sig = str(signal)
        else:
            sig = signal.strip()
            if not sig or not _SIGNAL_NAME.match(sig):
                raise InvalidArgument(f"invalid signal {signal!r}")
        args = ["kill"]
        if all_processes:
            args.append("--all")
        args += [container_id, sig]
        await self._check(*args, ignore=_GONE_OR_NOT_RUNNING)

    async def delete(self, container_id: str, *, force: bool = False) -> None:
        """Delete the runtime's record (and cgroup); a missing container is fine."""
        _check_id(container_id)
        args = ["delete"]
        if force:
            args.append("--force")
        await self._check(*args, container_id, ignore=_GONE)

    async def state(self, container_id: str) -> dict[str, Any] | None:
        """``<runtime> state`` (status: creating/created/running/paused/stopped); None when
        the runtime does not know the container."""
        _check_id(container_id)
        code, out, err = await self._run("state", container_id)
        if code != 0:
            msg = parse_runc_error(err) or f"exit status {code}"
            if _GONE.search(msg):
                return None
            raise OciRuntimeError(
                f"runtime handler {self.name!r}: `state {container_id}` failed: {msg}",
                handler=self.name,
                command=self.argv("state", container_id),
                exit_code=code,
                stderr=err,
            )
        try:
            state = json.loads(out)
        except ValueError as e:
            raise OciRuntimeError(
                f"runtime handler {self.name!r}: `state {container_id}` printed no JSON",
                handler=self.name,
                stderr=err,
            ) from e
        if not isinstance(state, dict):
            raise OciRuntimeError(
                f"runtime handler {self.name!r}: `state {container_id}` printed "
                f"{type(state).__name__}, not an object",
                handler=self.name,
            )
        return state

    async def ps(self, container_id: str) -> list[int]:
        """Host PIDs of the container's processes (``ps --format json``)."""
        _check_id(container_id)
        out = await self._check("ps", "--format", "json", container_id)
        try:
            pids = json.loads(out or b"null")
        except ValueError:
            pids = None
        return [int(p) for p in pids] if isinstance(pids, list) else []

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply OCI ``linux.resources`` (``update --resources -``, JSON on stdin)."""
        _check_id(container_id)
        data = json.dumps(resources).encode()
        await self._check("update", "--resources", "-", container_id, stdin=data)

    async def pause(self, container_id: str) -> None:
        _check_id(container_id)
        await self._check("pause", container_id)

    async def resume(self, container_id: str) -> None:
        _check_id(container_id)
        await self._check("resume", container_id)

    # ------------------------------------------------------------------ exec

    async def exec_sync(
        self,
        container_id: str,
        cmd: Sequence[str],
        *,
        timeout: float | None,
        max_output: int = MAX_EXEC_OUTPUT,
        env: Sequence[str] = (),
        cwd: str | None = None,
        user: str | None = None,
        raise_on_timeout: bool = True,
    ) -> ExecResult:
        """Run ``cmd`` in the container, wait, and return its exit code and output.

        * ``timeout`` in seconds; 0 or None means none.
        * stdout and stderr are read concurrently, each kept up to ``max_output`` bytes;
          the rest is read and thrown away (so the command never blocks on a full pipe)
          and ``truncated`` is set.
        * The exit code is the runtime's exit status, which for runc and crun is the
          command's (128+N when it died of signal N).
        * If the runtime fails before the command starts (container not running, no such
          executable, ...), ``OciRuntimeError`` carries the runtime's message.
        * On timeout (or cancellation) everything is killed: the runtime's exec'd process
          lives inside the container in its own session (runc's init calls setsid) and is
          a direct child of the runtime (CLONE_PARENT), so killing the runtime is not
          enough.  The runtime is stopped (SIGSTOP, so its children's PIDs stay put), each
          of its children and their process groups get SIGKILL, the runtime is continued so
          it reaps them and exits, and after a short grace its process group is killed and
          reaped.  Then, as containerd does (kubelet maps a DEADLINE_EXCEEDED ExecSync to a
          probe timeout), ``DeadlineExceeded`` is raised; with
          ``raise_on_timeout=False`` an ``ExecResult(exit_code=-1, timed_out=True)`` with
          the output so far is returned instead (CRI-O's answer).
          Not covered: a process that moved itself into another session and keeps running.
        """
        _check_id(container_id)
        if not cmd:
            raise InvalidArgument("exec command is empty")
        if max_output < 0:
            raise InvalidArgument(f"invalid max_output {max_output}")
        for item in env:
            if "=" not in item:
                raise InvalidArgument(f"exec environment entry {item!r} has no '='")
        limit = timeout if timeout and timeout > 0 else None
        binary = self.binary_path()
        tmpdir = tempfile.mkdtemp(prefix="moorage-exec-", dir=self.exec_dir)
        pid_file = os.path.join(tmpdir, "pid")
        args = ["exec", "--pid-file", pid_file]
        if user:
            args += ["--user", user]
        if cwd:
            args += ["--cwd", cwd]
        for item in env:
            args += ["--env", item]
        args += [container_id, *cmd]
        argv = [binary, *self.global_args, *args]
        loop = asyncio.get_running_loop()
        out = _CappedSink(max_output, loop)
        err = _CappedSink(max_output, loop)
        transports: list[asyncio.BaseTransport] = []
        fds: list[int] = []
        try:
            r_out, w_out = os.pipe2(os.O_CLOEXEC)
            fds += [r_out, w_out]
            r_err, w_err = os.pipe2(os.O_CLOEXEC)
            fds += [r_err, w_err]
            try:
                proc = await spawn(
                    argv,
                    stdin=DEVNULL,
                    stdout=w_out,
                    stderr=w_err,
                    start_new_session=True,
                )
            except OSError as e:
                raise OciRuntimeError(
                    f"runtime handler {self.name!r}: cannot run {binary}: {e.strerror or e}",
                    handler=self.name,
                    command=argv,
                ) from e
            for fd in (w_out, w_err):
                fds.remove(fd)
                os.close(fd)
            try:
                async with asyncio.timeout(limit):
                    for fd, sink in ((r_out, out), (r_err, err)):
                        fds.remove(fd)
                        pipe = os.fdopen(fd, "rb", buffering=0)
                        transport, _ = await loop.connect_read_pipe(_factory(sink), pipe)
                        transports.append(transport)
                    await out.done
                    await err.done
                    code = await proc.wait()
            except BaseException as e:
                cleanup = asyncio.ensure_future(_kill_exec(proc))
                _background.add(cleanup)
                cleanup.add_done_callback(_background.discard)
                # Cancelled again while cleaning up: the cleanup goes on in the background.
                await asyncio.shield(cleanup)
                if not isinstance(e, TimeoutError):
                    raise
                _log.info(
                    "exec timed out", handler=self.name, container=container_id, timeout=limit
                )
                if raise_on_timeout:
                    raise DeadlineExceeded(
                        f"command {_show(cmd)!r} in container {container_id} timed out "
                        f"after {limit:g}s"
                    ) from None
                return ExecResult(
                    -1,
                    out.data(),
                    err.data(),
                    timed_out=True,
                    truncated=out.truncated or err.truncated,
                )
            started = _pid_written(pid_file)
        finally:
            for t in transports:
                t.close()
            for fd in fds:
                os.close(fd)
            shutil.rmtree(tmpdir, ignore_errors=True)
        if code < 0:  # the runtime itself died of a signal
            code = 128 - code
        if not started:
            stderr = err.data()
            msg = parse_runc_error(stderr) or f"exit status {code}"
            raise OciRuntimeError(
                f"runtime handler {self.name!r}: exec in container {container_id} failed: {msg}",
                handler=self.name,
                command=argv,
                exit_code=code,
                stderr=stderr,
            )
        return ExecResult(code, out.data(), err.data(), truncated=out.truncated or err.truncated)


_GONE_OR_NOT_RUNNING = re.compile(f"{_GONE.pattern}|{_NOT_RUNNING.pattern}", re.IGNORECASE)


def _show(args: Sequence[str]) -> str:
    return " ".join(args)


def _pid_written(pid_file: str) -> bool:
    try:
        with open(pid_file, "rb") as f:
            return f.read().strip().isdigit()
    except OSError:
        return False


class _CappedSink(asyncio.Protocol):
    """Reads a pipe to EOF, keeping the first ``cap`` bytes."""

    def __init__(self, cap: int, loop: asyncio.AbstractEventLoop) -> None:
        self.cap = cap
        self.buf = bytearray()
        self.truncated = False
        self.done: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        if room > 0:
            self.buf += data[:room]
        if len(data) > room:
            self.truncated = True

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data(self) -> bytes:
        return bytes(self.buf)


def _factory(sink: _CappedSink) -> Callable[[], _CappedSink]:
    return lambda: sink


async def _kill_group_and_wait(proc: Process) -> None:
    """SIGKILL the command's whole process group, then reap the command. The group is
    killed even when the command itself already exited: a child it left behind (one still
    holding its stdout, which is why the command did not finish) is in that group. The
    group's id cannot belong to anyone else while one of its members lives."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all of its threads'), from /proc."""
    kids: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    have_children_files = False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids.update(int(x) for x in f.read().split())
            have_children_files = True
        except OSError:
            continue
    if have_children_files:
        return sorted(kids)
    # Kernels without CONFIG_PROC_CHILDREN: scan every process's parent.
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat_fields(int(name))
        if st is not None and st[1] == pid:
            kids.add(int(name))
    return sorted(kids)


def _stat_fields(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[1]), int(rest[2])
    except (IndexError, ValueError):
        return None


async def _kill_exec(proc: Process) -> None:
    """Kill an exec: the command in the container (and its process group), then the runtime."""
    if proc.returncode is None:
        runtime_pid = proc.pid
        # Freeze the runtime's group so its children cannot be reaped (their PIDs stay
        # theirs) and no new child appears while we look.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(runtime_pid, signal.SIGSTOP)
        try:
            for _ in range(100):  # the stop lands asynchronously; wait for it (briefly)
                st = _stat_fields(runtime_pid)
                if st is None or st[0] in ("T", "Z", "X"):
                    break
                await asyncio.sleep(0.001)
            for child in _children(runtime_pid):
                st = _stat_fields(child)
                if st is not None and st[2] == child:  # a group leader: runc init setsid()s
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child, signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(runtime_pid, signal.SIGCONT)
        # Let the runtime reap its children and exit; then make sure.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXEC_REAP_GRACE):
                await proc.wait()
    await _kill_group_and_wait(proc)
