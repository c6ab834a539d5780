"""Container lifecycle: create, start, stop, remove, status, lists, update, logs, exec.

A container is built in steps (record, writable layer, OCI spec, the monitor running
``<runtime> create``); a failure undoes what was built, and a record left in the
``creating`` state by a killed daemon is cleaned at the next start. Exits are learnt from
the monitor (its exit file, awaited through a pidfd), so they are right even when they
happen while the daemon is down.

Reads are served from memory; each container's mutations are serialised by its own lock.
What is saved is also published (``state.published``) for the CRI read path's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moorage import log
from moorage.container import cdi
from moorage.container import spec as specgen
from moorage.container.model import (
    Container,
    ContainerResources,
    ContainerSpec,
    ImageView,
    ImageVolume,
    SandboxView,
    State,
)
from moorage.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MoorageError,
    NotFound,
)
from moorage.image.store import ImageStore
from moorage.monitor.client import CreateRequest, ExitStatus, MonitorClient
from moorage.oci.runtime import ExecResult, OciRuntime
from moorage.sandbox import cgroups, userns
from moorage.sandbox.manager import SandboxManager
from moorage.sandbox.model import Mode, Sandbox
from moorage.sandbox.model import State as SandboxState
from moorage.state import records
from moorage.state.published import Published, get_by_id
from moorage.storage.overlay import ContainerStorage, check_image_sub_path
from moorage.util import codec, idmap
from moorage.util.crash import crashpoint
from moorage.util.fs import (
    atomic_write,
    discard_tree,
    empty_trash,
    prepare_beneath,
)
from moorage.util.idmap import MappedUserNamespace

_log = log.get("moorage.container")
KIND = "container"
#: Where a container's idmapped CRI mounts are attached, below its state dir.
IDMAPPED_DIR = "idmapped"
#: How long Stop waits for the exit after SIGKILL before it gives up.
KILL_WAIT = 10.0


@dataclass(frozen=True)
class ContainerFilter:
    id: str = ""
    state: State | None = None
    sandbox_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Paths:
    records: Path  # <root>/containers
    run: Path  # <runroot>/containers: bundles, monitor sockets, exit files


class ContainerManager:
    def __init__(
        self,
        paths: Paths,
        *,
        images: ImageStore,
        sandboxes: SandboxManager,
        storage: ContainerStorage,
        monitor: MonitorClient,
        runtimes: dict[str, OciRuntime],
        spec_options: specgen.SpecOptions,
        cdi_registry: cdi.Registry,
        memory_cgroup_root: Path | None,
        log_max_line: int,
    ) -> None:
        self.log_max_line = log_max_line
        self.cdi = cdi_registry
        self.paths = paths
        self.images = images
        self.sandboxes = sandboxes
        self.storage = storage
        self.monitor = monitor
        self.runtimes = runtimes
        self.spec_options = spec_options
        self.memory_cgroup_root = memory_cgroup_root
        self._containers: dict[str, Container] = {}
        self._published = Published[Container]()
        self._by_key: dict[str, str] = {}
        self._building: dict[str, asyncio.Task[Container]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._exited: dict[str, asyncio.Event] = {}
        #: Containers whose runtime state and rootfs mount are being (or were) released
        #: since their exit; the task's result says whether that worked.
        self._released: dict[str, asyncio.Task[bool]] = {}
        #: Set while ``runtime start`` of the container runs; done when it has returned.
        self._starting: dict[str, asyncio.Future[None]] = {}
        #: Where removed containers' state dirs wait for ``_empty_trash``: next to
        #: ``paths.run`` (same filesystem), which then holds only live state dirs.
        self._trash = paths.run.with_name(f"{paths.run.name}-trash")
        self._trash_dirty = False
        self._trash_task: asyncio.Task[None] | None = None
        #: Called with (event, container) on created/started/stopped/deleted.
        self.listeners: list[Callable[[str, Container], None]] = []
        sandboxes.on_stop.append(self._on_sandbox_stop)
        sandboxes.userns_runtime = self._runtime_has_userns
        sandboxes.userns_storage_dir = storage.containers

    # -- reads ---------------------------------------------------------------------------

    def get(self, id_or_prefix: str) -> Container:
        return get_in(self._containers, id_or_prefix)

    def find(self, id_or_prefix: str) -> Container | None:
        try:
            return self.get(id_or_prefix)
        except NotFound:
            return None

    def select(self, flt: ContainerFilter | None = None) -> list[Container]:
        return select_in(self._containers, flt)

    def published(self) -> Mapping[str, Container]:
        """Every container as last saved, by id, for readers on other threads (the CRI
        read path): copies that never change, in a mapping that is replaced, never
        modified (``state.published``). Read them with :func:`get_in` and
        :func:`select_in`."""
        return self._published.items

    def layers_in_use(self) -> set[str]:
        """The layers of every container's image and image volumes (never collected)."""
        used = {d for c in self._containers.values() for d in c.image.layers}
        used.update(d for c in self._containers.values() for v in c.image_volumes
                    for d in v.layers)
        return used

    def images_in_use(self) -> dict[str, str]:
        """The images that image volumes of containers (in any state) mount, each with
        one such container: RemoveImage refuses them, as CRI-O does."""
        return {v.image_id: c.id for c in self._containers.values() for v in c.image_volumes}

    def state_dir(self, c: Container) -> Path:
        return self.paths.run / c.id

    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    def _save(self, c: Container) -> Awaitable[None]:
        # Snapshot here, encode in the thread: changes to c after this call stay out. The
        # same copy is what readers on other threads see from now on.
        snap = codec.snapshot(c)
        self._published.put(snap)
        return asyncio.to_thread(
            records.writer(self.paths.records / f"{c.id}.json", KIND, lambda: _record(snap))
        )

    def _emit(self, event: str, c: Container) -> None:
        for listener in self.listeners:
            try:
                listener(event, c)
            except Exception:
                _log.exception("container.listener_failed", event=event)

    # -- CreateContainer -----------------------------------------------------------------

    def sandbox_view(self, sb: Sandbox) -> SandboxView:
        pinned = self.sandboxes.pinned(sb)
        spec = sb.spec
        pid_ns = f"/proc/{sb.infra_pid}/ns/pid" if sb.infra_pid else None
        return SandboxView(
            id=sb.id, name=spec.name, namespace=spec.namespace, uid=spec.uid,
            cgroup_parent=sb.cgroup_path, net_ns=pinned.net, ipc_ns=pinned.ipc,
            uts_ns=pinned.uts, pid_ns=pid_ns, files_dir=sb.files_dir,
            shm_path=sb.shm_path or None,
            hostname=spec.hostname if not spec.host_network else "",
            log_directory=spec.log_directory, privileged=spec.privileged,
            host_network=spec.host_network, host_pid=spec.pid == Mode.NODE,
            user_ns=pinned.user, uid_mappings=spec.userns.uids if pinned.user else (),
            gid_mappings=spec.userns.gids if pinned.user else (),
        )

    async def _runtime_has_userns(self, handler: str) -> bool:
        """Whether the handler's runtime can join a user namespace (its ``features``)."""
        runtime = self.runtimes.get(handler)
        if runtime is None:
            return False
        linux = (await runtime.features()).get("linux")
        namespaces = (linux.get("namespaces") if isinstance(linux, dict) else None) or []
        return "user" in namespaces

    async def rro_supported(self, handler: str) -> bool:
        """Whether containers of ``handler`` can have recursive read-only mounts: the
        kernel has ``mount_setattr`` and the handler's runtime lists ``rro`` among the
        mount options of its ``features`` (a runtime without that command has none)."""
        runtime = self.runtimes.get(handler)
        if runtime is None or not idmap.mount_setattr_available():
            return False
        return await runtime.supports_mount_option("rro")

    async def probe_runtimes(self) -> None:
        """Ask every handler's runtime for its ``features`` again (at start and on
        SIGHUP) and log what each handler can do."""
        for runtime in self.runtimes.values():
            runtime.forget_features()
        await asyncio.gather(*(rt.features() for rt in self.runtimes.values()))
        for name in sorted(self.runtimes):
            _log.info("container.runtime_features", handler=name,
                      recursive_read_only_mounts=await self.rro_supported(name),
                      user_namespaces=await self._runtime_has_userns(name))

    async def create(self, sandbox_id: str, spec: ContainerSpec) -> Container:
        if not spec.name:
            raise InvalidArgument("config.metadata.name is required")
        if not spec.image:
            raise InvalidArgument("config.image.image is required")
        sb = self.sandboxes.get(sandbox_id)
        if sb.state != SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sb.id} is not ready")
        if spec.userns is not None and not userns.same(spec.userns, sb.spec.userns):
            raise InvalidArgument(
                f"{userns.FIELD}: the container's user namespace options (mode "
                f"{spec.userns.mode.name}) differ from those of its pod sandbox {sb.id} (mode "
                f"{sb.spec.userns.mode.name}): containers share their pod's user namespace"
            )
        key = (f"{spec.name}_{sb.spec.name}_{sb.spec.namespace}_{sb.spec.uid}_"
               f"{spec.attempt}")
        building = self._building.get(key)
        if building is not None:
            return await asyncio.shield(building)
        existing_id = self._by_key.get(key)
        if existing_id is not None:
            existing = self._containers[existing_id]
            if not existing.delivered:
                existing.delivered = True
                return existing
            raise AlreadyExists(
                f"container {spec.name!r} (attempt {spec.attempt}) already exists in pod "
                f"sandbox {sb.id} as {existing_id}"
            )
        image = self.images.find(spec.image)
        if image is None:
            raise NotFound(f"config.image.image: image {spec.image!r} is not present; pull it")
        view = ImageView(id=image.id, ref=image.id, name=spec.image,
                         config=image.config.container_config, layers=image.layers)
        c = Container(id=secrets.token_hex(32), sandbox_id=sb.id, spec=spec, image=view,
                      created_at=time.time_ns(), runtime_handler=sb.runtime_handler,
                      resources=spec.resources, image_volumes=self._image_volumes(spec))
        if spec.log_path:
            c.log_path = _log_path(sb.spec.log_directory, spec.log_path)
        # Known from here on (as "creating"): its images' layers are in use, and the
        # images of its image volumes cannot be removed under it.
        self._containers[c.id] = c
        self._by_key[key] = c.id
        task = asyncio.get_running_loop().create_task(self._build(c, key, sb))
        self._building[key] = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            c.delivered = False
            raise

    async def _build(self, c: Container, key: str, sb: Sandbox) -> Container:
        log_ = _log.bind(container_id=c.id, name=c.spec.name, pod_sandbox_id=sb.id)
        begun = time.monotonic()
        try:
            async with self._lock(c.id):
                await self._save(c)
                crashpoint("container.create.recorded")
                try:
                    await self._create(c, sb)
                except BaseException as e:
                    log_.warning("container.create_failed",
                                 error=e.message if isinstance(e, MoorageError) else repr(e))
                    await asyncio.shield(self._destroy(c))
                    raise
            log_.info("container.created", duration_ms=_ms_since(begun))
            self._emit("created", c)
            return c
        finally:
            self._building.pop(key, None)

    def _image_volumes(self, spec: ContainerSpec) -> tuple[ImageVolume, ...]:
        """The images of the image volumes of ``spec``: pulled already (kubelet pulls them
        first), else NotFound naming the mount, as for the container's own image."""
        out = []
        for i, m in enumerate(spec.mounts):
            if not m.image:
                continue
            check_image_sub_path(m.image_sub_path, f"config.mounts[{i}].image_sub_path")
            image = self.images.find(m.image)
            if image is None:
                raise NotFound(
                    f"config.mounts[{i}].image: image {m.image!r} is not present; pull it")
            out.append(ImageVolume(index=i, image_id=image.id, layers=image.layers))
        return tuple(out)

    async def _create(self, c: Container, sb: Sandbox) -> None:
        state_dir = self.state_dir(c)
        c.bundle = str(state_dir)
        view = self.sandbox_view(sb)
        options = replace(self.spec_options,
                          rro_supported=await self.rro_supported(c.runtime_handler))
        # Everything up to the runtime's own create is blocking file work: one thread hop.
        await asyncio.to_thread(self._prepare, c, sb, view, options,
                                self._target_pid_ns(c.spec))
        crashpoint("container.create.prepared")
        runtime = self.runtimes[c.runtime_handler]
        created = await self.monitor.create(CreateRequest(
            id=c.id, bundle=str(state_dir), runtime=runtime.binary_path(),
            runtime_root=str(runtime.root), runtime_args=runtime.cgroup_args,
            state_dir=str(state_dir),
            log_path=c.log_path or str(state_dir / "ctr.log"), tty=c.spec.tty,
            stdin=c.spec.stdin, stdin_once=c.spec.stdin_once, log_max_line=self.log_max_line,
            cgroup_memory_dir=self._memory_dir(c), timeout=runtime.create_timeout,
        ))
        crashpoint("container.create.runtime_created")
        c.pid, c.monitor_pid = created.pid, created.monitor_pid
        c.extra["monitor_start"] = _start_time(created.monitor_pid)
        c.state = State.CREATED
        await self._save(c)
        crashpoint("container.create.saved")
        self._watch(c)

    def _prepare(self, c: Container, sb: Sandbox, view: SandboxView,
                 options: specgen.SpecOptions, target_pid_ns: str | None) -> None:
        """The bundle of ``c`` (in a thread): state dir, log dir, writable layer, user,
        ``config.json``; what it made is recorded on ``c`` or found by ``_destroy``."""
        state_dir = self.state_dir(c)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if c.spec.log_path:
            _prepare_log(sb.spec.log_directory, c.spec.log_path)
        layers = [self.images.layer_path(d) for d in c.image.layers]
        with _open_userns(view) as mapped:
            # With a user namespace: idmapped layers, and the CRI mounts that ask for it
            # idmapped here (runc 1.1 cannot), handed to the spec without their mappings.
            rootfs = self.storage.create(
                c.id, layers, volumes=specgen.image_volumes(c.image), userns=mapped)
            runtime_spec = self._mount_images(c, mapped)
            runtime_spec = self._idmapped_mounts(runtime_spec, view, mapped, state_dir)
        user = specgen.resolve_user(rootfs.merged, c.spec, c.image)
        doc = specgen.build_spec(
            container_id=c.id, spec=runtime_spec, sandbox=view, image=c.image,
            rootfs=rootfs.merged, user=user, options=options,
            target_pid_ns=target_pid_ns,
        )
        # CDI devices edit the finished spec, as CRI-O and containerd apply them last.
        cdi.apply(doc, self.cdi.resolve(cdi.requested(c.spec.cdi_devices,
                                                      c.spec.annotations)))
        process_user = doc["process"]["user"]
        c.user = {"uid": process_user["uid"], "gid": process_user["gid"],
                  "additional_gids": sorted(process_user.get("additionalGids", [])),
                  "username": user.username}
        c.extra["cgroups_path"] = doc.get("linux", {}).get("cgroupsPath", "")
        # Under the runroot: a reboot empties it, and a container whose record is still
        # "creating" is destroyed at the next start, so no fsync is owed.
        atomic_write(state_dir / "config.json", json.dumps(doc).encode(), 0o600,
                     durable=False)

    def _mount_images(self, c: Container, mapped: MappedUserNamespace | None
                      ) -> ContainerSpec:
        """``c.spec`` with each image volume mounted (a read-only overlay of its image's
        layers below the container's storage, idmapped like the root filesystem in a pod
        with a user namespace) and its mount pointed at it, mappings cleared (the layers
        carry them); ``c.image_volumes`` record where. The storage's removal unmounts
        them, found on disk, so a failure or a kill -9 half-way leaves nothing behind."""
        if not c.image_volumes:
            return c.spec
        mounts = list(c.spec.mounts)
        mounted = []
        for volume in c.image_volumes:
            m = mounts[volume.index]
            source = self.storage.mount_image(
                c.id, volume.index, [self.images.layer_path(d) for d in volume.layers],
                sub_path=m.image_sub_path, userns=mapped)
            mounted.append(replace(volume, source=str(source)))
            mounts[volume.index] = replace(m, host_path=str(source), uid_mappings=(),
                                           gid_mappings=())
        c.image_volumes = tuple(mounted)
        return replace(c.spec, mounts=tuple(mounts))

    def _idmapped_mounts(self, spec: ContainerSpec, view: SandboxView,
                         mapped: MappedUserNamespace | None, state_dir: Path) -> ContainerSpec:
        """``spec`` with each CRI mount that has uid/gid mappings replaced by a bind of an
        idmapped mount made here, at ``<state_dir>/idmapped/<index>`` (unmounted by
        :func:`_unmount_idmapped` before the state dir goes)."""
        if not any(m.uid_mappings or m.gid_mappings for m in spec.mounts):
            return spec
        mounts = list(spec.mounts)
        base = state_dir / IDMAPPED_DIR
        for i, m in enumerate(mounts):
            if not (m.uid_mappings or m.gid_mappings):
                continue
            field = f"config.mounts[{i}]"
            if mapped is None:
                raise InvalidArgument(
                    f"{field}.uidMappings: an idmapped mount needs a pod with a user namespace")
            if (m.uid_mappings, m.gid_mappings) != (view.uid_mappings, view.gid_mappings):
                raise InvalidArgument(
                    f"{field}.uidMappings/gidMappings: only the pod's own mappings are "
                    "supported for idmapped mounts")
            if not m.host_path or "\0" in m.host_path or not os.path.exists(m.host_path):
                raise InvalidArgument(f"{field}.host_path: {m.host_path!r} does not exist")
            source = os.path.realpath(m.host_path)
            target = base / str(i)
            base.mkdir(mode=0o700, exist_ok=True)
            if os.path.isdir(source):
                target.mkdir(exist_ok=True)
            else:
                target.touch(exist_ok=True)
            try:
                fd = idmap.clone_idmapped(source, mapped.fd, recursive=True)
                try:
                    idmap.move_mount(fd, str(target))
                finally:
                    os.close(fd)
            except OSError as e:
                raise FailedPrecondition(
                    f"{field}: cannot make an idmapped mount of {m.host_path!r}: "
                    f"{e.strerror or e}") from None
            mounts[i] = replace(m, host_path=str(target), uid_mappings=(), gid_mappings=())
        return replace(spec, mounts=tuple(mounts))

    def _target_pid_ns(self, spec: ContainerSpec) -> str | None:
        if spec.security.pid_mode != int(Mode.TARGET):
            return None
        target = self.find(spec.security.target_id)
        if target is None or target.state != State.RUNNING or not target.pid:
            raise InvalidArgument(
                "config.linux.security_context.namespace_options.target_id: container "
                f"{spec.security.target_id!r} is not running"
            )
        return f"/proc/{target.pid}/ns/pid"

    def _memory_dir(self, c: Container) -> str:
        """The container's memory cgroup (the systemd driver's scope too), for OOM kills."""
        path = c.extra.get("cgroups_path", "")
        if self.memory_cgroup_root is None or not path:
            return ""
        return str(self.memory_cgroup_root / cgroups.container_cgroup_path(path).lstrip("/"))

    # -- exits ---------------------------------------------------------------------------

    def _watch(self, c: Container) -> None:
        self._exited.setdefault(c.id, asyncio.Event())
        if c.id not in self._watchers and c.monitor_pid:
            self._watchers[c.id] = asyncio.get_running_loop().create_task(self._wait(c))

    async def _wait(self, c: Container) -> None:
        try:
            status = await self.monitor.wait_exit(c.monitor_pid, self.state_dir(c))
        except Exception:
            _log.exception("container.wait_failed", container_id=c.id)
            status = None
        finally:
            self._watchers.pop(c.id, None)
        if c.id not in self._containers:
            return
        await self._record_exit(c, status)

    async def _record_exit(self, c: Container, status: ExitStatus | None) -> None:
        if c.state == State.EXITED:
            self._exited.setdefault(c.id, asyncio.Event()).set()
            return
        if status is None:
            c.exit_code, c.finished_at = 255, time.time_ns()
            # Its monitor died (SIGKILL, the OOM killer): the exit cannot be known, and a
            # container nobody watches is killed by the release, as CRI-O does when conmon
            # dies.
            c.reason = "Error"
            c.message = ("the container's monitor died without recording an exit; the "
                         "container was killed")
        else:
            c.exit_code, c.finished_at = status.exit_code, status.exited_at
            if status.oom_killed:
                c.reason = "OOMKilled"
            else:
                c.reason = "Completed" if status.exit_code == 0 else "Error"
        if not c.started_at:
            # Exited before it was started (runc create ran the init, start never came).
            c.started_at = 0
        c.state = State.EXITED
        self._release_soon(c)  # runs while the record is written
        await self._save(c)
        crashpoint("container.exit.recorded")
        self._exited.setdefault(c.id, asyncio.Event()).set()
        _log.info("container.exited", container_id=c.id, exit_code=c.exit_code, reason=c.reason)
        self._emit("stopped", c)

    def _release_soon(self, c: Container) -> None:
        if c.id not in self._released and c.id in self._containers:
            self._released[c.id] = asyncio.get_running_loop().create_task(self._release(c))

    async def _release(self, c: Container) -> bool:
        """Free what an exited container holds: the runtime's state (and so its cgroup and
        any process left in it) and the rootfs mount, as containerd does on a task's exit.
        RemoveContainer then only removes files; it redoes this when it failed (or ran in
        an earlier life of the daemon): both steps are idempotent."""
        runtime = self.runtimes.get(c.runtime_handler)
        starting = self._starting.get(c.id)
        if starting is not None:
            await starting
        try:
            if runtime is not None:
                await runtime.delete(c.id, force=True)
                crashpoint("container.release.runtime_deleted")
            await asyncio.to_thread(self.storage.unmount, c.id)
        except MoorageError as e:
            _log.warning("container.release_failed", container_id=c.id, error=e.message)
            return False
        return True

    async def _await_release(self, c: Container) -> bool:
        """Whether ``c`` was released (waits for a release under way)."""
        task = self._released.get(c.id)
        if task is None:
            return False
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return False
            raise
        except Exception:
            _log.exception("container.release_failed", container_id=c.id)
            return False

    # -- StartContainer / StopContainer --------------------------------------------------

    async def start(self, container_id: str) -> None:
        c = self.get(container_id)
        async with self._lock(c.id):
            if c.state == State.RUNNING:
                # kubelet's retry of a start that worked but whose answer it never got (a
                # daemon killed right after ``runtime start``): the container runs.
                return
            if c.state != State.CREATED:
                raise FailedPrecondition(
                    f"container {c.id} is {c.state.value}, only a created container can start"
                )
            runtime = self.runtimes[c.runtime_handler]
            # The time ``runc start`` is asked: a fast process may exit (and be recorded)
            # before the call returns, and started_at must never come after finished_at.
            begun = time.time_ns()
            # A release (``runc delete``) must wait until ``runc start`` is done with the
            # runtime's state, even when the process exited before the call returned.
            starting = self._starting[c.id] = asyncio.get_running_loop().create_future()
            try:
                await runtime.start(c.id)
                crashpoint("container.start.runtime_started")
            except MoorageError:
                status = self.monitor.read_exit(self.state_dir(c))
                if status is not None:
                    await self._record_exit(c, status)
                raise
            finally:
                del self._starting[c.id]
                starting.set_result(None)
            c.started_at = begun
            if c.state == State.CREATED:
                c.state = State.RUNNING
            await self._save(c)
            crashpoint("container.start.saved")
        _log.info("container.started", container_id=c.id)
        self._emit("started", c)

    def _stop_signal(self, c: Container) -> int:
        name = c.spec.stop_signal or str(c.image.config.get("StopSignal") or "") or "SIGTERM"
        try:
            if name.isdigit():
                return int(name)
            return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        except (KeyError, ValueError):
            return int(signal.SIGTERM)

    async def stop(self, container_id: str, timeout: int) -> None:
        c = self.find(container_id)
        if c is None:
            return
        async with self._lock(c.id):
            await self._stop_locked(c, timeout)

    async def _stop_locked(self, c: Container, timeout: int) -> None:
        if c.state not in (State.RUNNING, State.CREATED):
            return
        runtime = self.runtimes[c.runtime_handler]
        exited = self._exited.setdefault(c.id, asyncio.Event())
        if c.state == State.RUNNING and timeout > 0:
            await runtime.kill(c.id, self._stop_signal(c))
            crashpoint("container.stop.signalled")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), timeout)
        if not exited.is_set():
            # SIGKILL every process of the container: its execs go with it.
            await runtime.kill(c.id, int(signal.SIGKILL), all_processes=True)
            try:
                await asyncio.wait_for(exited.wait(), KILL_WAIT)
            except TimeoutError as e:
                raise FailedPrecondition(
                    f"container {c.id} did not exit {KILL_WAIT:.0f}s after SIGKILL"
                ) from e
        # As containerd's StopContainer: the runtime's container is deleted when it returns.
        await self._await_release(c)

    # -- RemoveContainer -----------------------------------------------------------------

    async def remove(self, container_id: str) -> None:
        c = self.find(container_id)
        if c is None:
            return
        async with self._lock(c.id):
            if c.id not in self._containers:
                return
            await self._stop_locked(c, 0)
            await self._destroy(c, strict=True)
        self._emit("deleted", c)

    async def _destroy(self, c: Container, *, strict: bool = False) -> None:
        """Remove everything of ``c``; idempotent, tolerant of half-built containers.

        ``strict`` (RemoveContainer): when the runtime cannot delete its container, raise
        before anything is removed, so the container stays listed and kubelet's retry
        finishes the removal (as CRI-O answers); otherwise (undoing a failed create) the
        failure is logged and the rest removed."""
        runtime = self.runtimes.get(c.runtime_handler)
        if runtime is not None and not await self._await_release(c):
            try:
                await runtime.delete(c.id, force=True)
            except MoorageError as e:
                _log.warning("container.runtime_delete_failed", container_id=c.id,
                             error=e.message)
                if strict:
                    raise
        watcher = self._watchers.pop(c.id, None)
        if watcher is not None:
            watcher.cancel()
        await asyncio.to_thread(self._remove_files, c)
        self._empty_trash_soon()
        self._released.pop(c.id, None)
        self._containers.pop(c.id, None)
        self._published.drop(c.id)
        for key, cid in list(self._by_key.items()):
            if cid == c.id:
                del self._by_key[key]
        self._locks.pop(c.id, None)
        self._exited.pop(c.id, None)
        _log.info("container.removed", container_id=c.id)

    def _remove_files(self, c: Container) -> None:
        """The writable layer, the state dir, then the record (in a thread).

        The two directories are only moved into trash directories (a rename each), as
        containerd leaves snapshot deletion to its garbage collector: ``_empty_trash``
        deletes them in the background, and at the next start if the daemon died first.
        """
        self.storage.remove(c.id, later=True)
        crashpoint("container.remove.layer_discarded")
        _unmount_idmapped(self.state_dir(c) / IDMAPPED_DIR)
        discard_tree(self.state_dir(c), self._trash)
        crashpoint("container.remove.state_discarded")
        (self.paths.records / f"{c.id}.json").unlink(missing_ok=True)

    def _empty_trash_soon(self) -> None:
        """Delete the trash in a background thread (one task at a time, until it stays
        empty)."""
        self._trash_dirty = True
        if self._trash_task is None or self._trash_task.done():
            self._trash_task = asyncio.get_running_loop().create_task(self._empty_trash())

    async def _empty_trash(self) -> None:
        while self._trash_dirty:
            self._trash_dirty = False
            try:
                await asyncio.to_thread(self._empty_trash_dirs)
            except (OSError, MoorageError) as e:
                _log.warning("container.trash_failed", error=str(e))
                return

    def _empty_trash_dirs(self) -> None:
        self.storage.empty_trash()
        empty_trash(self._trash)

    async def _on_sandbox_stop(self, sandbox_id: str, remove: bool) -> None:
        pod = [c for c in self._containers.values() if c.sandbox_id == sandbox_id]
        await asyncio.gather(*(self.stop(c.id, 0) for c in pod if c.state != State.CREATING))
        if remove:
            await asyncio.gather(*(self.remove(c.id) for c in pod))

    # -- the rest ------------------------------------------------------------------------

    async def update_resources(self, container_id: str, res: ContainerResources) -> None:
        c = self.get(container_id)
        async with self._lock(c.id):
            if c.state not in (State.CREATED, State.RUNNING):
                raise FailedPrecondition(f"container {c.id} is {c.state.value}: cannot update")
            sb = self.sandboxes.find(c.sandbox_id)
            doc = specgen.oci_resources(res, self.spec_options,
                                        self.sandbox_view(sb) if sb is not None else None, c.id)
            await self.runtimes[c.runtime_handler].update(c.id, doc)
            c.resources = res
            c.spec = replace(c.spec, resources=res)
            await self._save(c)

    async def reopen_log(self, container_id: str) -> None:
        c = self.get(container_id)
        if c.state != State.RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running; its log is closed")
        sb = self.sandboxes.find(c.sandbox_id) if c.spec.log_path else None
        if sb is not None:
            await asyncio.to_thread(_prepare_log, sb.spec.log_directory, c.spec.log_path)
        await self.monitor.reopen_log(self.state_dir(c))

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: float
                        ) -> ExecResult:
        c = self.get(container_id)
        if not cmd:
            raise InvalidArgument("cmd is required")
        if c.state != State.RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running")
        return await self.runtimes[c.runtime_handler].exec_sync(
            c.id, cmd, timeout=timeout or None)

    def usage(self, c: Container) -> tuple[int, int]:
        return self.storage.usage(c.id)

    # -- restart recovery ----------------------------------------------------------------

    async def recover(self) -> None:
        for d in (self.paths.records, self.paths.run):
            await asyncio.to_thread(d.mkdir, parents=True, exist_ok=True, mode=0o711)
        self._empty_trash_soon()  # what a removal before a crash left
        await asyncio.to_thread(self.storage.release_idmapped)  # what a mount before a crash left
        loaded = await asyncio.to_thread(lambda: list(records.load_all(self.paths.records, KIND)))
        for path, rec in loaded:
            c = None if isinstance(rec, records.RecordError) else _from_record(rec)
            if c is None:
                _log.warning("container.record_dropped", path=str(path), reason=str(rec)[:200])
                await asyncio.to_thread(path.unlink, missing_ok=True)
                continue
            self._containers[c.id] = c
            self._published.put(codec.snapshot(c))
            self._by_key[_key(c, self.sandboxes)] = c.id
            try:
                await self._reconcile(c)
                # A create whose answer an earlier daemon may never have sent: kubelet's
                # retry with the same name gets this container (once), as after a
                # cancelled call.
                c.delivered = c.state != State.CREATED
            except Exception as e:
                # The daemon starts all the same; the container's removal tries again.
                _log.error("container.recover_failed", container_id=c.id,
                           error=e.message if isinstance(e, MoorageError) else repr(e))

    async def _reconcile(self, c: Container) -> None:
        if c.state == State.CREATING or self.sandboxes.find(c.sandbox_id) is None:
            _log.info("container.recover_cleanup", container_id=c.id,
                      reason="half built" if c.state == State.CREATING else "pod gone")
            await self._destroy(c)
            return
        if c.state in (State.CREATED, State.RUNNING):
            status = self.monitor.read_exit(self.state_dir(c))
            if status is not None:
                await self._record_exit(c, status)
            elif c.monitor_pid and _start_time(c.monitor_pid) == c.extra.get("monitor_start"):
                if c.state == State.CREATED:
                    await self._adopt_start(c)
                self._watch(c)
            else:
                # No monitor and no exit status: the node rebooted (or the monitor was
                # killed). Never report such a container as running.
                await self._record_exit(c, None)
                c.message = "the container's monitor is gone (node rebooted?)"
                await self._save(c)

    async def _adopt_start(self, c: Container) -> None:
        """A container recorded as created that the runtime says runs: the daemon died
        between ``runtime start`` and saving the record. It is running (since about now:
        the start time was never recorded)."""
        runtime = self.runtimes.get(c.runtime_handler)
        state = await runtime.state(c.id) if runtime is not None else None
        if state is not None and state.get("status") == "running":
            c.state, c.started_at = State.RUNNING, time.time_ns()
            await self._save(c)
            _log.info("container.recover_started", container_id=c.id)


def get_in(containers: Mapping[str, Container], id_or_prefix: str) -> Container:
    """The container of an id or unique id prefix among ``containers`` (live ones, or the
    published copies); one still being built is unknown."""
    return get_by_id(containers, id_or_prefix, visible=_visible, field="container_id",
                     what="container", required="container_id is required")


def select_in(containers: Mapping[str, Container], flt: ContainerFilter | None = None
              ) -> list[Container]:
    """The containers of ``containers`` that ``flt`` selects (all when None), in order;
    never one still being built."""
    return [c for c in containers.values() if _visible(c) and (flt is None or _selects(flt, c))]


def _visible(c: Container) -> bool:
    return c.state != State.CREATING


def _selects(flt: ContainerFilter, c: Container) -> bool:
    return ((not flt.id or c.id.startswith(flt.id))
            and (flt.state is None or c.state == flt.state)
            and (not flt.sandbox_id or c.sandbox_id.startswith(flt.sandbox_id))
            and all(c.spec.labels.get(k) == v for k, v in flt.labels.items()))


def _log_path(log_directory: str, log_path: str) -> str:
    """The container's log file: kubelet's log_path below the pod's log_directory."""
    if not log_directory:
        raise InvalidArgument("config.log_path needs the pod sandbox's log_directory")
    if "\0" in log_path:
        raise InvalidArgument("config.log_path: contains a NUL byte")
    if log_path.startswith("/"):
        raise InvalidArgument(
            f"config.log_path: {log_path!r} is absolute; it must be relative to the pod "
            "sandbox's log_directory"
        )
    path = os.path.normpath(os.path.join(log_directory, log_path))
    if not path.startswith(os.path.normpath(log_directory) + "/"):
        raise InvalidArgument(
            f"config.log_path: {log_path!r} leaves the pod sandbox's log_directory"
        )
    return path


def _prepare_log(log_directory: str, log_path: str) -> None:
    """The log file's directories below ``log_directory`` (0755, as kubelet makes them),
    following no symlink planted there; the monitor opens the file itself O_NOFOLLOW."""
    try:
        prepare_beneath(Path(log_directory), os.path.normpath(log_path))
    except OSError as e:
        raise FailedPrecondition(
            f"config.log_path: cannot use {log_path!r} in {log_directory}: "
            f"{e.strerror or e}"
        ) from None


@contextlib.contextmanager
def _open_userns(view: SandboxView) -> Iterator[MappedUserNamespace | None]:
    """The pod's pinned user namespace, open for idmapped mounts; None without one."""
    if not view.user_ns:
        yield None
        return
    try:
        fd = os.open(view.user_ns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPrecondition(
            f"pod sandbox {view.id}: its user namespace {view.user_ns} is gone: {e.strerror}"
        ) from None
    try:
        yield MappedUserNamespace(fd, view.uid_mappings, view.gid_mappings)
    finally:
        os.close(fd)


def _unmount_idmapped(base: Path) -> None:
    """Detach every idmapped mount below ``base`` (they bind host volumes: the state dir
    must never be removed through one); raise if one stays mounted."""
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return
    for name in names:
        path = str(base / name)
        for _ in range(16):
            if not idmap.detach(path):
                break
        if os.path.ismount(path):
            raise FailedPrecondition(f"idmapped mount {path} stays mounted")


def _ms_since(begun: float) -> float:
    return round((time.monotonic() - begun) * 1000, 1)


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data.rsplit(b")", 1)[1].split()[19])


def _key(c: Container, sandboxes: SandboxManager) -> str:
    sb = sandboxes.find(c.sandbox_id)
    if sb is None:
        return f"{c.spec.name}_?_{c.sandbox_id}_{c.spec.attempt}"
    return f"{c.spec.name}_{sb.spec.name}_{sb.spec.namespace}_{sb.spec.uid}_{c.spec.attempt}"


def _record(c: Container) -> dict[str, Any]:
    data: dict[str, Any] = codec.to_data(replace(c, delivered=True))
    return data


def _from_record(rec: dict[str, Any]) -> Container | None:
    try:
        return codec.load(Container, rec)
    except (KeyError, TypeError, ValueError):
        return None
