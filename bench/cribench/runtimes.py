"""The runtimes under test, each started with its own state in the bench's temp dir, inside
the node's network namespace, and reached over its own unix socket with the same client."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench.cribench.node import Node
from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from tests.e2e.conftest import make_daemon
from tests.e2e.test_images import insecure_conf
from tests.fixtures.daemon import MIB, OOM_SCORE_CLAMP, Daemon, kill_monitor_servers
from tests.fixtures.procs import has_arg, pids_where

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"


def channel_to(socket: Path, timeout: float = 30) -> grpc.Channel:
    ch = grpc.insecure_channel(
        f"unix:{socket}",
        options=[("grpc.max_receive_message_length", 16 * MIB),
                 ("grpc.max_send_message_length", 16 * MIB)])
    grpc.channel_ready_future(ch).result(timeout=timeout)
    return ch


class Runtime:
    name = ""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.base = node.base / self.name
        self.channel: grpc.Channel | None = None
        #: The runtime's socket, once started (for clients in other processes).
        self.address = Path()
        self.rt: pb_grpc.RuntimeServiceStub
        self.img: pb_grpc.ImageServiceStub

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _connect(self, socket: Path) -> None:
        self.address = socket
        self.channel = channel_to(socket)
        self.rt = pb_grpc.RuntimeServiceStub(self.channel)
        self.img = pb_grpc.ImageServiceStub(self.channel)

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def remove_all(self) -> None:
        """Every pod this runtime runs, stopped and removed (so nothing outlives the run)."""
        if self.channel is None:
            return
        with contextlib.suppress(grpc.RpcError):
            for item in self.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=60).items:
                with contextlib.suppress(grpc.RpcError):
                    self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=item.id),
                                           timeout=120)
                    self.rt.RemovePodSandbox(
                        pb.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=120)

    def version(self) -> str:
        v = self.rt.Version(pb.VersionRequest(), timeout=10)
        return f"{v.runtime_name} {v.runtime_version}"


class Moorage(Runtime):
    """moorage from its CLI (tests/fixtures/daemon.py), optionally under cProfile."""

    name = "moorage"

    def __init__(self, node: Node, profile: Path | None = None,
                 extra_args: list[str] | None = None, config_text: str = "",
                 registries: tuple[Any, ...] = ()) -> None:
        """``extra_args``: more flags; ``config_text``: more TOML; ``registries``: more
        insecure registries (anything with a ``host``, e.g. a proxy in front of the
        node's)."""
        super().__init__(node)
        self.profile = profile
        self.extra_args = list(extra_args or [])
        self.config_text = config_text
        self.registries = registries
        self.daemon: Daemon | None = None

    def start(self) -> None:
        d = make_daemon(self.base, self.node.ns_path, self.node.cni_conf_dir,
                        ["--log-level", "info", *self.extra_args])
        d.config_text = OOM_SCORE_CLAMP + self.config_text
        assert self.node.registry is not None
        d.registries_conf_text = insecure_conf(self.node.registry, *self.registries)
        if self.profile is not None:
            d = _profiled(d, self.profile)
        d.start(timeout=60)
        self.daemon = d
        self._connect(d.socket)

    @property
    def pid(self) -> int:
        assert self.daemon is not None and self.daemon.proc is not None
        return self.daemon.proc.pid  # nsenter execs the daemon: same pid

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(timeout=60)
            # The monitor server outlives the daemon by design (a restart keeps the
            # containers): the bench's own goes with it.
            kill_monitor_servers({str(self.daemon.runroot)})
            self.daemon = None


def _profiled(d: Daemon, out: Path) -> Daemon:
    """The same daemon, run as ``python -m cProfile -o OUT -m moorage ...``."""

    class Profiled(Daemon):
        def args(self) -> list[str]:
            argv = super().args()
            i = argv.index(sys.executable)
            return [*argv[:i + 1], "-m", "cProfile", "-o", str(out), *argv[i + 1:]]

    p = Profiled(d.base, extra_args=d.extra_args, registries_conf_text=d.registries_conf_text,
                 config_text=d.config_text, policy_text=d.policy_text, netns=d.netns,
                 log_level=d.log_level)
    return p


#: Where containerd's CNI library keeps its cache of results (its default).
LIBCNI_CACHE = Path("/var/lib/cni")


class Containerd(Runtime):
    """Debian's containerd with the CRI plugin, configured like a kubeadm node but with its
    own root, state and socket, runc through containerd-shim-runc-v2, the bench's CNI
    network and a local pause image."""

    name = "containerd"

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self.proc: subprocess.Popen[bytes] | None = None
        self._made_cni_cache = False

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    def config(self) -> str:
        assert self.node.registry is not None
        host = self.node.registry.host
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        disabled = [
            "io.containerd.internal.v1.opt", "io.containerd.internal.v1.tracing",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.blockfile",
        ]
        return f"""version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = {_toml_list(disabled)}

[grpc]
  address = "{self.socket}"

[{cri}]
  sandbox_image = "{self.node.images.pause}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true

  [{cri}.cni]
    bin_dir = "{self.node.cni_bin_dir}"
    conf_dir = "{self.node.cni_conf_dir}"
    max_conf_num = 1

  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false

  [{cri}.registry.mirrors."{host}"]
    endpoint = ["http://{host}"]
"""

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # containerd's CNI library caches results there (not configurable): removed at
        # stop if this run made it.
        self._made_cni_cache = not LIBCNI_CACHE.exists()
        conf = self.base / "config.toml"
        conf.write_text(self.config())
        log = open(self.base / "containerd.log", "ab")  # noqa: SIM115 - the process's life
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={self.node.ns_path}", CONTAINERD, "--config", str(conf)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        self._connect(self.socket)
        # The CRI plugin answers only once it has initialized.
        while True:
            try:
                self.rt.Status(pb.StatusRequest(), timeout=5)
                break
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"containerd's CRI plugin did not answer ({e.code()}):\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.base / "containerd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ctr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this containerd, run inside the node namespace (it pulls itself)."""
        return subprocess.run(
            ["nsenter", f"--net={self.node.ns_path}", CTR, "--address", str(self.socket),
             "--namespace", "cribench", *args],
            capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # Shims of pods removed above are gone; a stray one (a failed removal) is ours:
        # it runs with our state dir in its command line.
        for pid in pids_where(lambda a: has_arg(a, self.state) or has_arg(a, self.socket)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base / "ctr-mnt", ignore_errors=True)
        if self._made_cni_cache:  # empty once the pods are gone; never another's entries
            for d in (LIBCNI_CACHE / "results", LIBCNI_CACHE):
                with contextlib.suppress(OSError):
                    d.rmdir()


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


RUNTIMES: dict[str, type[Runtime]] = {"moorage": Moorage, "containerd": Containerd}
