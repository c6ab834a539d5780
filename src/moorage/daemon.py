"""The daemon: wiring from config to stores to the gRPC server, the socket, and signals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import gc
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from moorage import __version__, config, log, metrics
from moorage.container import apparmor, cdi, seccomp
from moorage.container.manager import ContainerManager
from moorage.container.manager import Paths as ContainerPaths
from moorage.container.spec import SpecOptions
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import MoorageError
from moorage.events import ContainerEvent, EventBroadcaster, watch_containers
from moorage.image import registries
from moorage.image.pinned import PinnedImages
from moorage.image.policy import PolicyFiles
from moorage.image.pull import Puller
from moorage.image.registry import RegistryClient
from moorage.image.store import ImageStore
from moorage.monitor.client import MonitorClient
from moorage.network import CNIManager
from moorage.oci.runtime import OciRuntime
from moorage.sandbox import cgroups
from moorage.sandbox.manager import Paths, SandboxManager
from moorage.server import rpc
from moorage.server.front import Front
from moorage.server.image import ImageService
from moorage.server.runtime import RuntimeService
from moorage.storage import container_fs_usage
from moorage.storage.overlay import ContainerStorage
from moorage.streaming import StreamingConfig, StreamingServer
from moorage.streaming.backend import ContainerBackend
from moorage.util import systemd

_log = log.get("moorage.daemon")


class StartError(Exception):
    """The daemon cannot start; the message says why."""


def _probe_socket(path: Path) -> None:
    """Refuse a socket a live daemon serves; remove a stale one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartError(f"listen path {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartError(f"listen socket {path}: cannot probe it: {e.strerror}") from e
        _log.info("daemon.stale_socket_removed", path=str(path))
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise StartError(f"another daemon is already serving on {path}")


def _lock(runroot: Path) -> int:
    """Hold ``<runroot>/moorage.lock`` for the daemon's life: one daemon per state dir."""
    runroot.mkdir(parents=True, exist_ok=True, mode=0o711)
    fd = os.open(runroot / "moorage.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise StartError(f"another moorage daemon is running with runroot {runroot}") from e
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _systemd_is_init() -> bool:
    return Path("/run/systemd/system").is_dir()


#: image.* keys that a SIGHUP applies.
LIVE_IMAGE_KEYS = ("registries_conf", "pinned_images", "signature_policy",
                   "signature_policy_dir")
#: runtime.* keys that a SIGHUP applies (with default_runtime).
CONFINEMENT_KEYS = ("seccomp_use_default_when_empty", "seccomp_profile", "apparmor_profile")


def _confinement(runtime: config.RuntimeConfig) -> dict[str, Any]:
    """The SpecOptions fields of the seccomp and AppArmor settings: the seccomp profile
    read and checked, the AppArmor default profile loaded (or found loaded), as CRI-O does
    at start and on reload. Blocking; MoorageError naming the key when unusable."""
    profile = (seccomp.load_file(runtime.seccomp_profile, "runtime.seccomp_profile")
               if runtime.seccomp_profile else None)
    name = runtime.apparmor_profile
    if apparmor.enabled() and name != apparmor.UNCONFINED:
        if name == apparmor.DEFAULT_PROFILE:
            apparmor.ensure_default(name)
        elif name not in apparmor.loaded_profiles():
            raise MoorageError(f"runtime.apparmor_profile: AppArmor profile {name!r} is not "
                               "loaded")
    return {"seccomp_profile": profile,
            "seccomp_use_default_when_empty": runtime.seccomp_use_default_when_empty,
            "apparmor_profile": name}


def _oci_runtime(cfg: config.Config, name: str) -> OciRuntime:
    handler = cfg.runtimes[name]
    return OciRuntime(name, handler.runtime_path or name, cfg.runtime_root(name),
                      systemd_cgroup=cfg.runtime.cgroup_manager == "systemd",
                      command_timeout=handler.command_timeout,
                      create_timeout=handler.create_timeout)


class Daemon:
    def __init__(self, cfg: config.Config,
                 reload: Callable[[], config.Config] | None = None) -> None:
        self.cfg = cfg
        self._reload = reload
        self._tasks: list[asyncio.Task[None]] = []
        self.server: grpc.aio.Server | None = None
        self.front: Front | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self.events = EventBroadcaster[ContainerEvent](on_lost=metrics.record_events_lost)
        self._lock_fd = -1
        self._stopping = asyncio.Event()

    def info(self) -> dict[str, Any]:
        return {"config": config.as_info(self.cfg), "version": __version__}

    async def start(self) -> None:
        cfg = self.cfg
        listen = cfg.api.listen
        listen.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        _probe_socket(listen)
        await self.build()
        await self.serve_grpc()
        # Everything made so far (modules, grpc, protobuf descriptors, recovered state)
        # lives as long as the daemon: out of the cyclic GC's full collections, which
        # otherwise stall the event loop for tens of ms (docs/performance.md).
        gc.collect()
        gc.freeze()

    async def build(self) -> None:
        """Everything but the gRPC server: state loaded and reconciled (also for wipe)."""
        cfg = self.cfg
        self._lock_fd = _lock(cfg.runroot)
        cfg.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            reg_conf = registries.RegistriesConfig.load(cfg.image.registries_conf)
        except Exception as e:
            raise StartError(f"registries_conf {cfg.image.registries_conf}: {e}") from e
        self.store = ImageStore(cfg.root / "images", reg_conf)
        self.store.pinned = PinnedImages(cfg.image.pinned_images)
        await asyncio.to_thread(self.store.load)
        self.client = RegistryClient(
            certs_dir=cfg.image.registries_certs_dir,
            stall_timeout=cfg.image.pull_progress_timeout,
            max_manifest_size=cfg.image.max_manifest_size,
        )
        puller = Puller(
            self.store, self.client,
            max_concurrent_downloads=cfg.image.max_concurrent_downloads,
            max_manifest_size=cfg.image.max_manifest_size,
            max_layer_size=cfg.image.max_layer_size,
            max_layer_entries=cfg.image.max_layer_entries,
            policies=PolicyFiles(cfg.image.signature_policy, cfg.image.signature_policy_dir),
        )
        overlay_dir = cfg.root / "overlay"
        if cfg.runtime.cgroup_manager == "systemd" and not _systemd_is_init():
            raise StartError('runtime.cgroup_manager = "systemd" needs systemd as the init '
                             "system; this host has none: use cgroupfs")
        self.cni = CNIManager(cfg.network.cni_config_dir, cfg.network.cni_plugin_dirs,
                              cfg.root / "network" / "cni-cache", cfg.network.cni_default_network,
                              plugin_timeout=cfg.network.cni_timeout)
        layout = await asyncio.to_thread(cgroups.Layout.detect)
        _log.info("daemon.cgroups", **layout.describe())
        self.sandboxes = SandboxManager(
            Paths(cfg.root / "sandboxes", cfg.runroot / "sandboxes", cfg.runroot / "ns"),
            self.cni, layout,
            cgroup_driver=cfg.runtime.cgroup_manager, handlers=list(cfg.runtimes),
            default_handler=cfg.runtime.default_runtime,
            infra_command=cfg.runtime.infra_command,
        )
        runtimes = {name: _oci_runtime(cfg, name) for name in cfg.runtimes}
        self.monitor = MonitorClient(cfg.runroot)
        await self.monitor.ensure_server()
        try:
            confinement = await asyncio.to_thread(_confinement, cfg.runtime)
        except MoorageError as e:
            raise StartError(e.message) from e
        memory_root = layout.v1_controllers.get("memory") if layout.version == 1 else (
            layout.unified)
        self.containers = ContainerManager(
            ContainerPaths(cfg.root / "containers", cfg.runroot / "containers"),
            images=self.store, sandboxes=self.sandboxes,
            storage=ContainerStorage(overlay_dir), monitor=self.monitor, runtimes=runtimes,
            spec_options=SpecOptions(
                cgroup_driver=cfg.runtime.cgroup_manager, cgroups=layout,
                restrict_oom_score_adj=cfg.runtime.restrict_oom_score_adj,
                **confinement,
            ),
            cdi_registry=cdi.Registry(cfg.cdi.spec_dirs),
            memory_cgroup_root=Path(memory_root) if memory_root else None,
            log_max_line=cfg.runtime.log_max_line_size,
        )
        await self.containers.probe_runtimes()
        watch_containers(self.events, self.containers, self.sandboxes)
        metrics.track_containers(self.containers, self.events)
        await self.sandboxes.recover()
        await self.containers.recover()
        self.store.layers_in_use = self.containers.layers_in_use
        self.store.images_in_use = self.containers.images_in_use
        await self.store.collect()
        self.puller = puller

    async def serve_grpc(self) -> None:
        cfg = self.cfg
        listen = cfg.api.listen
        overlay_dir = cfg.root / "overlay"

        async def container_fs() -> Any:
            return await container_fs_usage(overlay_dir)

        self.streaming = StreamingServer(ContainerBackend(self.containers), StreamingConfig(
            address=cfg.api.stream_address, port=cfg.api.stream_port,
            tls_cert=cfg.api.stream_tls_cert, tls_key=cfg.api.stream_tls_key))
        try:
            await self.streaming.start()
        except (OSError, ValueError) as e:
            raise StartError(f"streaming server on {cfg.api.stream_address}:"
                             f"{cfg.api.stream_port}: {e}") from e
        self.runtime_service = RuntimeService(cfg.runtime.cgroup_manager, self.info,
                                              self.sandboxes, self.containers,
                                              list(cfg.runtimes), self.events,
                                              self.streaming)
        handlers = (
            rpc.generic_handler(self.runtime_service, pb.DESCRIPTOR.services_by_name[
                "RuntimeService"], asyncio.get_running_loop()),
            rpc.generic_handler(ImageService(self.store, self.puller, container_fs),
                                pb.DESCRIPTOR.services_by_name["ImageService"],
                                asyncio.get_running_loop()),
        )

        async def serve() -> grpc.aio.Server:  # on the front's loop
            server = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", cfg.api.grpc_max_recv_msg_size),
                ("grpc.max_send_message_length", cfg.api.grpc_max_send_msg_size),
            ])
            server.add_generic_rpc_handlers(handlers)
            old_umask = os.umask(0o777 & ~cfg.api.socket_mode)
            try:
                if server.add_insecure_port(f"unix:{listen}") == 0:
                    raise StartError(f"cannot listen on {listen}")
                await server.start()
            finally:
                os.umask(old_umask)
            return server

        self.front = Front()
        self.front.start()
        self.server = await self.front.run(serve())
        os.chmod(listen, cfg.api.socket_mode)
        if cfg.metrics.enable:
            self.metrics_server = metrics.MetricsServer(cfg.metrics.host, cfg.metrics.port)
            try:
                await self.metrics_server.start()
            except OSError as e:
                raise StartError(f"metrics endpoint {cfg.metrics.host}:{cfg.metrics.port}: "
                                 f"{e.strerror or e}") from e
        _log.info("daemon.started", listen=str(listen), version=__version__, root=str(cfg.root),
                  runroot=str(cfg.runroot), images=len(self.store.images()),
                  sandboxes=len(self.sandboxes.select()),
                  containers=len(self.containers.select()))

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve(self) -> None:
        systemd.take_environment()  # before any child (the monitor server, runtimes) starts
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        await self.start()
        systemd.notify("READY=1")
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._tasks.append(loop.create_task(self._watchdog(interval)))
        await self._stopping.wait()
        systemd.notify("STOPPING=1")
        await self.stop()

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def request_reload(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self.reload()))

    async def reload(self) -> None:
        """SIGHUP: apply what can change live; say which other changes need a restart."""
        if self._reload is None:
            return
        try:
            new = await asyncio.to_thread(self._reload)
        except config.ConfigError as e:
            _log.error("daemon.reload_failed", error=str(e))
            return
        old, changed = self.cfg, []
        relog = new.log_level != old.log_level or new.log_format != old.log_format
        if relog:
            changed.append("log_level")
        # registries.conf is re-read whether or not its path changed.
        try:
            conf = await asyncio.to_thread(registries.RegistriesConfig.load,
                                           new.image.registries_conf)
        except Exception as e:
            _log.error("daemon.reload_failed", key="image.registries_conf", error=str(e))
            return
        if conf != self.store.registries_conf:
            self.store.registries_conf = conf
            changed.append("image.registries_conf")
        if new.image.pinned_images != old.image.pinned_images:
            self.store.pinned = PinnedImages(new.image.pinned_images)
            changed.append("image.pinned_images")
        policy_keys = ("signature_policy", "signature_policy_dir")
        if any(getattr(new.image, k) != getattr(old.image, k) for k in policy_keys):
            # The files themselves are read again whenever they change, SIGHUP or not.
            self.puller.policies = PolicyFiles(new.image.signature_policy,
                                               new.image.signature_policy_dir)
            changed += [f"image.{k}" for k in policy_keys
                        if getattr(new.image, k) != getattr(old.image, k)]
        if new.cdi != old.cdi:
            self.containers.cdi.dirs = tuple(new.cdi.spec_dirs)
            changed.append("cdi.spec_dirs")
        if new.runtimes != old.runtimes or new.runtime.default_runtime != (
                old.runtime.default_runtime):
            for name in new.runtimes:
                self.containers.runtimes.setdefault(name, _oci_runtime(new, name))
            self.sandboxes.handlers = set(new.runtimes)
            self.sandboxes.default_handler = new.runtime.default_runtime
            self.runtime_service.handlers = list(new.runtimes)
            changed.append("runtimes")
        # Each handler's binary is asked for its features again: an upgraded runc may
        # have gained (or a replaced one lost) what Status advertises.
        await self.containers.probe_runtimes()
        try:
            confinement = await asyncio.to_thread(_confinement, new.runtime)
        except MoorageError as e:
            _log.error("daemon.reload_failed", key="runtime seccomp/apparmor", error=str(e))
            return
        # What the node's cgroups can enforce is probed again (a hugetlb hierarchy mounted
        # since, huge pages of a new size): new pods and containers get it.
        try:
            layout = await asyncio.to_thread(cgroups.Layout.detect)
        except (OSError, MoorageError) as e:
            _log.error("daemon.reload_failed", key="cgroups", error=str(e))
            return
        if layout != self.sandboxes.layout:
            changed.append("cgroups")
            _log.info("daemon.cgroups", **layout.describe())
        self.sandboxes.layout = layout
        self.containers.spec_options = dataclasses.replace(self.containers.spec_options,
                                                           cgroups=layout, **confinement)
        changed += [f"runtime.{k}" for k in CONFINEMENT_KEYS
                    if getattr(new.runtime, k) != getattr(old.runtime, k)
                    or (k == "seccomp_profile" and new.runtime.seccomp_profile)]
        live = {"log_level", "log_format", "image", "runtimes", "runtime", "cdi"}
        old_data, new_data = old.model_dump(), new.model_dump()
        restart = sorted(k for k in new_data if k not in live and new_data[k] != old_data[k])
        restart += sorted(f"runtime.{k}" for k, v in new_data["runtime"].items()
                          if k not in ("default_runtime", *CONFINEMENT_KEYS)
                          and v != old_data["runtime"][k])
        restart += sorted(f"image.{k}" for k, v in new_data["image"].items()
                          if k not in LIVE_IMAGE_KEYS and v != old_data["image"][k])
        self.cfg = new.model_copy(update={k: getattr(old, k) for k in ("api", "root", "runroot",
                                                                       "network")})
        # The reload's own event is written under the more verbose of the two levels.
        quieter = log.LEVELS[new.log_level] > log.LEVELS[old.log_level]
        if relog and not quieter:
            log.setup(new.log_level, new.log_format)
        _log.info("daemon.reloaded", changed=changed, needs_restart=restart)
        if relog and quieter:
            log.setup(new.log_level, new.log_format)

    async def stop(self) -> None:
        _log.info("daemon.stopping")
        for task in self._tasks:
            task.cancel()
        self.events.close()  # ends GetContainerEvents streams, so the grace is not waited out
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.front is not None:
            if self.server is not None:
                await self.front.run(self.server.stop(grace=5))
            self.front.stop()
        with contextlib.suppress(AttributeError):
            await self.streaming.stop()  # ends every session, killing its exec
        with contextlib.suppress(AttributeError):
            await self.client.close()
        with contextlib.suppress(AttributeError):
            await self.monitor.close()
        if self.server is not None:
            self.cfg.api.listen.unlink(missing_ok=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        _log.info("daemon.stopped")


async def wipe(cfg: config.Config, images: bool) -> tuple[int, int, int]:
    """Remove every pod and container (and image): the node starts clean. Refused (by the
    state lock) while a daemon runs."""
    d = Daemon(cfg)
    await d.build()
    try:
        pods = d.sandboxes.select()
        containers = d.containers.select()
        for c in containers:
            await d.containers.remove(c.id)
        for sb in pods:
            await d.sandboxes.remove(sb.id)
        removed_images = 0
        if images:
            for image in d.store.images():
                await d.store.remove(image.id)
                removed_images += 1
        return len(pods), len(containers), removed_images
    finally:
        await d.stop()


#: How long a thread may hold the interpreter lock while another waits for it (Python's
#: default: 5 ms). The gRPC thread (``server/front.py``) needs it a few times per call;
#: while the event loop or a worker thread computes, each of those waits would be up to
#: this long.
SWITCH_INTERVAL = 0.001


def run(cfg: config.Config, reload: Callable[[], config.Config] | None = None) -> None:
    log.setup(cfg.log_level, cfg.log_format)
    sys.setswitchinterval(SWITCH_INTERVAL)
    asyncio.run(Daemon(cfg, reload).serve())
