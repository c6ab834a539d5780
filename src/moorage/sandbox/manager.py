"""Pod sandbox lifecycle: RunPodSandbox, StopPodSandbox, RemovePodSandbox, status and lists.

A sandbox is built step by step (pod cgroup, pinned namespaces, network, pod files, infra
process). Each step records what it made before the next begins, so any failure undoes
every earlier step, and a daemon killed at any point leaves a record that the next start
finds and cleans (``State.CREATING``), or reconciles (a ready pod whose namespaces or infra
process vanished, e.g. after a reboot, becomes not ready and is torn down).

Reads are served from memory; each sandbox's mutations are serialised by its own lock.
What is saved is also published (``state.published``) for the CRI read path's thread.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moorage import log
from moorage.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MoorageError,
    NotFound,
)
from moorage.network import AttachRequest, CNIManager
from moorage.sandbox import cgroups, files, namespaces, userns
from moorage.sandbox.model import Mode, Sandbox, SandboxSpec, State
from moorage.state import records
from moorage.state.published import Published, get_by_id
from moorage.util import codec
from moorage.util.crash import crashpoint
from moorage.util.fs import remove_tree
from moorage.util.idmap import IdMapping, map_id

_log = log.get("moorage.sandbox")
KIND = "sandbox"
INFRA_CGROUP = f"{cgroups.OUR_PREFIX}infra"


@dataclass(frozen=True)
class SandboxFilter:
    id: str = ""
    state: State | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Paths:
    records: Path  # <root>/sandboxes
    run: Path  # <runroot>/sandboxes
    ns: Path  # <runroot>/ns


class SandboxManager:
    def __init__(
        self,
        paths: Paths,
        cni: CNIManager,
        layout: cgroups.Layout,
        *,
        cgroup_driver: str,
        handlers: Iterable[str],
        default_handler: str,
        infra_command: list[str],
    ) -> None:
        self.paths = paths
        self.cni = cni
        self.layout = layout
        self.cgroup_driver = cgroup_driver
        self.handlers = set(handlers)
        self.default_handler = default_handler
        self.infra_command = infra_command
        self._sandboxes: dict[str, Sandbox] = {}
        self._published = Published[Sandbox]()
        self._by_key: dict[str, str] = {}
        self._building: dict[str, asyncio.Task[Sandbox]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: Called with a sandbox id and whether it is being removed, when it stops or is
        #: removed: the containers of the pod hook in here.
        self.on_stop: list[Callable[[str, bool], Awaitable[None]]] = []
        #: Set by the container side: whether a runtime handler can join a user namespace,
        #: and where containers' root filesystems are mounted (for :meth:`probe_userns`).
        self.userns_runtime: Callable[[str], Awaitable[bool]] | None = None
        self.userns_storage_dir: Path | None = None
        #: Why pods cannot have a user namespace here (None: they can); see probe_userns.
        self.userns_problem: str | None = "not probed yet"

    # -- reads ---------------------------------------------------------------------------

    def get(self, id_or_prefix: str) -> Sandbox:
        return get_in(self._sandboxes, id_or_prefix)

    def find(self, id_or_prefix: str) -> Sandbox | None:
        try:
            return self.get(id_or_prefix)
        except NotFound:
            return None

    def select(self, flt: SandboxFilter | None = None) -> list[Sandbox]:
        return select_in(self._sandboxes, flt)

    def published(self) -> Mapping[str, Sandbox]:
        """Every sandbox as last saved, by id, for readers on other threads (the CRI read
        path): copies that never change, in a mapping that is replaced, never modified
        (``state.published``). Read them with :func:`get_in` and :func:`select_in`."""
        return self._published.items

    def pinned(self, sb: Sandbox) -> namespaces.PinnedNamespaces:
        """The pinned namespace paths of a sandbox (deterministic from its id and spec)."""
        spec = sb.spec

        def path(kind: str, wanted: bool) -> str | None:
            return str(self.paths.ns / kind / sb.id) if wanted else None

        return namespaces.PinnedNamespaces(
            net=path("net", not spec.host_network),
            ipc=path("ipc", spec.ipc != Mode.NODE),
            uts=path("uts", not spec.host_network),
            user=path("user", spec.userns.pod),
        )

    async def probe_userns(self) -> None:
        """Find out once whether pods can have user namespaces here (``userns_problem``)."""
        storage = self.userns_storage_dir or self.paths.records
        self.userns_problem = await userns.probe(self.paths.ns, storage, [self.paths.run])
        if self.userns_problem is None:
            _log.info("sandbox.userns_supported")
        else:
            _log.info("sandbox.userns_unsupported", reason=self.userns_problem)

    async def userns_supported(self, handler: str) -> bool:
        """Whether pods of ``handler`` can have a user namespace (node and runtime)."""
        if self.userns_problem is not None:
            return False
        return self.userns_runtime is None or await self.userns_runtime(handler)

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _save(self, sb: Sandbox) -> Awaitable[None]:
        # Snapshot here, encode in the thread: changes to sb after this call stay out.
        snap = codec.snapshot(sb)
        self._published.put(snap)  # what readers on other threads see from now on
        return asyncio.to_thread(
            records.writer(self.paths.records / f"{sb.id}.json", KIND, snap.record)
        )

    # -- RunPodSandbox -------------------------------------------------------------------

    def validate(self, spec: SandboxSpec) -> str:
        """Check a request before anything is built; returns the runtime handler."""
        for name, value in (("config.metadata.name", spec.name),
                            ("config.metadata.namespace", spec.namespace),
                            ("config.metadata.uid", spec.uid)):
            if not value:
                raise InvalidArgument(f"{name} is required")
        if spec.attempt < 0:
            raise InvalidArgument("config.metadata.attempt must not be negative")
        handler = spec.runtime_handler or self.default_handler
        if handler not in self.handlers:
            raise InvalidArgument(
                f"runtime_handler {handler!r} is not configured "
                f"(configured: {', '.join(sorted(self.handlers))})"
            )
        if spec.network not in (Mode.POD, Mode.NODE):
            raise InvalidArgument("config.linux.security_context.namespace_options.network "
                                  "must be POD or NODE for a sandbox")
        if spec.ipc not in (Mode.POD, Mode.NODE):
            raise InvalidArgument("config.linux.security_context.namespace_options.ipc "
                                  "must be POD or NODE for a sandbox")
        if spec.pid == Mode.TARGET:
            raise InvalidArgument("config.linux.security_context.namespace_options.pid: "
                                  "TARGET is only valid for containers")
        if spec.hostname and not spec.host_network:
            files.validate_hostname(spec.hostname)
        files.validate_dns(spec.dns)
        namespaces.validate_sysctls(spec.sysctls, host_network=spec.host_network,
                                    host_ipc=spec.ipc == Mode.NODE)
        userns.validate(spec.userns, host_network=spec.host_network,
                        host_pid=spec.pid == Mode.NODE, host_ipc=spec.ipc == Mode.NODE)
        if spec.userns.pod:
            userns.check_support(self.userns_problem)
        cgroups.pod_cgroup_path(spec.cgroup_parent, self.cgroup_driver)  # type: ignore[arg-type]
        for pm in spec.port_mappings:
            if not 0 <= pm.host_port <= 65535 or not 0 < pm.container_port <= 65535:
                raise InvalidArgument(f"config.port_mappings: port out of range in {pm}")
            if pm.protocol not in ("tcp", "udp", "sctp"):
                raise InvalidArgument(f"config.port_mappings: unknown protocol {pm.protocol!r}")
        files.shm_size(spec.annotations)
        return handler

    async def run(self, spec: SandboxSpec) -> Sandbox:
        handler = self.validate(spec)
        if spec.userns.pod and not await self.userns_supported(handler):
            raise FailedPrecondition(
                f"{userns.FIELD}: runtime handler {handler!r} cannot run containers in a "
                "user namespace (its runtime's features do not list the user namespace)"
            )
        building = self._building.get(spec.key)
        if building is not None:
            # kubelet retried while the first call is still building: same answer.
            return await asyncio.shield(building)
        existing_id = self._by_key.get(spec.key)
        if existing_id is not None:
            existing = self._sandboxes[existing_id]
            if not existing.delivered:
                existing.delivered = True
                return existing
            raise AlreadyExists(
                f"pod sandbox {spec.name!r} in namespace {spec.namespace!r} (uid {spec.uid}, "
                f"attempt {spec.attempt}) already exists as {existing_id}"
            )
        sb = Sandbox(id=secrets.token_hex(32), spec=spec, created_at=time.time_ns(),
                     runtime_handler=handler)
        task = asyncio.get_running_loop().create_task(self._build(sb))
        self._building[spec.key] = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller went away (kubelet's deadline); the build goes on for its retry.
            sb.delivered = False
            raise

    async def _build(self, sb: Sandbox) -> Sandbox:
        spec = sb.spec
        log_ = _log.bind(pod_sandbox_id=sb.id, name=spec.name, namespace=spec.namespace)
        begun = time.monotonic()
        self._sandboxes[sb.id] = sb
        self._by_key[spec.key] = sb.id
        try:
            async with self._lock(sb.id):
                await self._save(sb)
                crashpoint("sandbox.run.recorded")
                try:
                    await self._create(sb)
                except BaseException as e:
                    log_.warning("sandbox.create_failed",
                                 error=e.message if isinstance(e, MoorageError) else repr(e))
                    await asyncio.shield(self._teardown(sb, remove=True))
                    raise
            log_.info("sandbox.ready", ips=sb.ips,
                      duration_ms=round((time.monotonic() - begun) * 1000, 1))
            return sb
        finally:
            self._building.pop(spec.key, None)

    async def _create(self, sb: Sandbox) -> None:
        spec = sb.spec
        run_dir = self.paths.run / sb.id
        sb.files_dir = str(run_dir)
        sb.cgroup_path = self._cgroup_path(sb)
        want = self.pinned(sb)
        # 1 and 2 at once (independent; a failure of either undoes both, see _together):
        # the pod cgroup, recorded before anything else, and the namespaces.
        await _together(self._make_cgroup(sb), self._pin(sb, want))
        crashpoint("sandbox.run.namespaces_pinned")
        # The pod's root owns its /dev/shm and files (host root is nobody in the pod), and
        # runc, in the pod's user namespace, must be able to walk into run_dir.
        owner = self.pod_root(sb)
        if spec.ipc != Mode.NODE:
            sb.shm_path = str(run_dir / "shm")  # before it is mounted: teardown unmounts it
        # 3 and 4 at once: the run dir with /dev/shm for the pod's IPC namespace, and the
        # network (CNI's plugins are processes of their own).
        network = self._attach(sb, want) if not spec.host_network else _nothing()
        await _together(asyncio.to_thread(self._make_run_dir, sb, run_dir, owner), network)
        # 5. hostname, hosts, resolv.conf (the hosts file names the pod's IPs).
        await asyncio.to_thread(_write_pod_files, sb, run_dir, owner)
        crashpoint("sandbox.run.files_written")
        # 6. The infra process, only where containers share the pod's PID namespace.
        if spec.pid == Mode.POD:
            # In a child cgroup: on cgroup v2 a cgroup holding processes cannot enable
            # controllers for its children (the containers' cgroups).
            infra_cgroup = cgroups.PodCgroup(self.layout, f"{sb.cgroup_path}/{INFRA_CGROUP}")
            sb.cgroup_created += [str(p) for p in await asyncio.to_thread(infra_cgroup.create)]
            await self._save(sb)
            sb.infra_pid = await namespaces.start_infra(
                want, infra_cgroup.procs_files(), self.infra_command
            )
            sb.infra_start_time = namespaces.process_start_time(sb.infra_pid)
            await self._save(sb)
            crashpoint("sandbox.run.infra_started")
        sb.state = State.READY
        await self._save(sb)
        crashpoint("sandbox.run.ready")

    async def _make_cgroup(self, sb: Sandbox) -> None:
        """The pod cgroup (kubelet usually made it; what is missing is created, recorded)."""
        spec = sb.spec
        if self.cgroup_driver == "systemd":
            await self._make_slice(sb)
            return
        pod_cgroup = cgroups.PodCgroup(self.layout, sb.cgroup_path)
        created = await asyncio.to_thread(_make_cgroup, pod_cgroup, spec.log_directory)
        # The shared default parent (for pods that name none) outlives any one pod.
        shared = cgroups.pod_cgroup_path("", self.cgroup_driver)  # type: ignore[arg-type]
        sb.cgroup_created = [str(p) for p in created if not str(p).endswith(shared)]
        await self._save(sb)
        crashpoint("sandbox.run.cgroup_made")
        if spec.resources is not None:
            await asyncio.to_thread(pod_cgroup.apply, spec.resources)

    async def _make_slice(self, sb: Sandbox) -> None:
        """The systemd driver's pod slice: kubelet's, or one started here (recorded first,
        so that a crash before it is stopped at the next start), with the pod's limits."""
        spec = sb.spec
        pod_slice = self._pod_slice(sb)
        if spec.log_directory:
            await asyncio.to_thread(Path(spec.log_directory).mkdir, parents=True,
                                    exist_ok=True, mode=0o755)
        if await asyncio.to_thread(pod_slice.exists):
            if spec.resources is not None:
                await asyncio.to_thread(pod_slice.apply, spec.resources)
            return
        sb.slice_created = pod_slice.name
        await self._save(sb)
        await asyncio.to_thread(pod_slice.create, f"moorage pod {spec.namespace}/{spec.name} "
                                f"({sb.id[:12]})", spec.resources)

    def _pod_slice(self, sb: Sandbox) -> cgroups.PodSlice:
        return cgroups.PodSlice(self.layout, posixpath.basename(self._pod_cgroup(sb)))

    async def apply_resources(self, sb: Sandbox, res: cgroups.Resources) -> None:
        """UpdatePodSandboxResources: the pod cgroup's new limits (with the systemd driver,
        the slice's properties too)."""
        if not sb.cgroup_path:
            raise FailedPrecondition(f"pod sandbox {sb.id} has no cgroup")
        if self.cgroup_driver == "systemd":
            await asyncio.to_thread(self._pod_slice(sb).apply, res)
        else:
            await asyncio.to_thread(cgroups.PodCgroup(self.layout, sb.cgroup_path).apply, res)

    async def _pin(self, sb: Sandbox, want: namespaces.PinnedNamespaces) -> None:
        """The namespaces, made by the pinns helper with hostname and sysctls applied (with
        a user namespace: it first, owning the others). Found again by their paths."""
        spec = sb.spec
        mappings = (namespaces.UserMappings(uids=spec.userns.uids, gids=spec.userns.gids)
                    if spec.userns.pod else None)
        await namespaces.pin(
            self.paths.ns, sb.id, net=want.net is not None, ipc=want.ipc is not None,
            uts=want.uts is not None, hostname=spec.hostname if want.uts else "",
            sysctls=spec.sysctls, user=mappings,
        )

    @staticmethod
    def _make_run_dir(sb: Sandbox, run_dir: Path, owner: tuple[int, int] | None) -> None:
        _searchable_dir(run_dir)
        if sb.shm_path:
            files.mount_shm(Path(sb.shm_path), files.shm_size(sb.spec.annotations), owner)

    async def _attach(self, sb: Sandbox, want: namespaces.PinnedNamespaces) -> None:
        spec = sb.spec
        assert want.net is not None
        sb.network_attached = True  # a DEL is owed from here on, whatever ADD does
        result = await self.cni.attach(AttachRequest(
            sandbox_id=sb.id, netns_path=want.net, pod_namespace=spec.namespace,
            pod_name=spec.name, pod_uid=spec.uid, port_mappings=spec.port_mappings,
            bandwidth=spec.bandwidth, cgroup_parent=sb.cgroup_path,
        ))
        sb.ips = list(result.ips)
        crashpoint("sandbox.run.network_attached")

    @staticmethod
    def pod_root(sb: Sandbox) -> tuple[int, int] | None:
        """The host uid and gid of the pod's root; None without a user namespace."""
        if not sb.spec.userns.pod:
            return None
        return mapped_root(sb.spec.userns.uids, sb.spec.userns.gids)

    def _pod_cgroup(self, sb: Sandbox) -> str:
        """The pod cgroup path, also for a record a crash cut short before it was saved."""
        return sb.cgroup_path or self._cgroup_path(sb)

    def _infra_cgroup_pids(self, sb: Sandbox) -> list[int]:
        infra = cgroups.PodCgroup(self.layout, f"{self._pod_cgroup(sb)}/{INFRA_CGROUP}")
        return sorted({pid for d in infra.dirs() for pid in cgroups.members(d)})

    def _owned_cgroup_dirs(self, sb: Sandbox) -> list[Path]:
        """The cgroup directories this pod's removal must remove (blocking; the pod's
        containers are gone by then): those recorded as created, and, whatever the record
        says (a crash may have come before it was saved), the infra cgroup, the cgroups
        runc made for containers whose create a crash cut short (``moorage-<id>``; what
        still runs in them, a runtime's init that never became a container, is killed),
        and, for a pod with no cgroup parent given, its own cgroup under ours."""
        owned = {Path(p) for p in sb.cgroup_created}
        path = self._pod_cgroup(sb)
        for d in cgroups.PodCgroup(self.layout, path).dirs():
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                child = d / name
                if name == INFRA_CGROUP:
                    owned.add(child)
                # (with the systemd driver a container's cgroup is systemd's scope)
                elif (self.cgroup_driver == "cgroupfs" and name.startswith(cgroups.OUR_PREFIX)
                      and child.is_dir()):
                    cgroups.kill_members(child)
                    owned.add(child)
            if not sb.spec.cgroup_parent and self.cgroup_driver == "cgroupfs":
                owned.add(d)  # (a slice of ours is stopped instead)
        return sorted(owned)

    def _cgroup_path(self, sb: Sandbox) -> str:
        driver = self.cgroup_driver
        if sb.spec.cgroup_parent:
            return cgroups.pod_cgroup_path(sb.spec.cgroup_parent, driver)  # type: ignore[arg-type]
        # No parent given (crictl, tests): a cgroup of its own under moorage's default, so
        # one pod's limits never apply to another (systemd: a slice in moorage.slice).
        if driver == "systemd":
            return cgroups.systemd_slice_path(f"{cgroups.DEFAULT_SYSTEMD_PARENT[:-6]}-pod"
                                              f"{sb.id[:16]}.slice")
        return cgroups.pod_cgroup_path("", driver) + f"/{sb.id[:16]}"  # type: ignore[arg-type]

    # -- StopPodSandbox / RemovePodSandbox ----------------------------------------------

    async def stop(self, id_or_prefix: str) -> None:
        sb = self.find(id_or_prefix)
        if sb is None:
            return  # idempotent: kubelet calls it again and again
        async with self._lock(sb.id):
            await self._teardown(sb, remove=False)

    async def remove(self, id_or_prefix: str) -> None:
        sb = self.find(id_or_prefix)
        if sb is None:
            return
        async with self._lock(sb.id):
            if sb.id not in self._sandboxes:
                return
            await self._teardown(sb, remove=True)

    async def _teardown(self, sb: Sandbox, *, remove: bool) -> None:
        """Undo whatever exists of ``sb``; every step is idempotent and failure-tolerant."""
        log_ = _log.bind(pod_sandbox_id=sb.id)
        for hook in self.on_stop:
            await hook(sb.id, remove)
        crashpoint("sandbox.stop.containers_stopped")
        if sb.infra_pid is not None:
            await namespaces.stop_infra(sb.infra_pid, sb.infra_start_time)
            sb.infra_pid = sb.infra_start_time = None
        elif sb.spec.pid == Mode.POD:
            # A crash between starting the infra process and recording its pid: it is the
            # only process ever put in the pod's infra cgroup.
            for pid in await asyncio.to_thread(self._infra_cgroup_pids, sb):
                await namespaces.stop_infra(pid)
        pinned = self.pinned(sb)
        if sb.network_attached:
            try:
                await self.cni.detach(sb.id, pinned.net)
                sb.network_attached = False
                crashpoint("sandbox.stop.network_detached")
            except MoorageError as e:
                # Retried on the next stop or remove; a pod is never left unremovable.
                # On remove: released at the next start (_release_orphan_networks).
                log_.warning("sandbox.network_teardown_failed", error=e.message,
                             will_retry="on stop or remove" if not remove else "at the next start")
                if remove:
                    sb.network_attached = False
        # The run dir and its /dev/shm by their paths, which follow from the id: a crash
        # may have come after the mount and before the record said so.
        run_dir = self.paths.run / sb.id
        if sb.shm_path or sb.spec.ipc != Mode.NODE:
            await asyncio.to_thread(files.unmount, Path(sb.shm_path or run_dir / "shm"))
        await namespaces.unpin(pinned)
        crashpoint("sandbox.stop.unpinned")
        if not remove:
            if sb.state != State.NOTREADY:
                sb.state = State.NOTREADY
                log_.info("sandbox.stopped")
            await self._save(sb)
            return
        owned = await asyncio.to_thread(self._owned_cgroup_dirs, sb)
        if owned:
            pod_cgroup = cgroups.PodCgroup(self.layout, self._pod_cgroup(sb))
            try:
                await asyncio.to_thread(pod_cgroup.remove, owned)
            except MoorageError as e:
                log_.warning("sandbox.cgroup_remove_failed", error=e.message)
        if sb.slice_created:
            try:
                await asyncio.to_thread(self._pod_slice(sb).remove)
            except MoorageError as e:
                log_.warning("sandbox.cgroup_remove_failed", error=e.message)
        crashpoint("sandbox.remove.cgroups_removed")
        await asyncio.to_thread(remove_tree, Path(sb.files_dir or run_dir))
        crashpoint("sandbox.remove.files_removed")
        await asyncio.to_thread(
            (self.paths.records / f"{sb.id}.json").unlink, missing_ok=True
        )
        self._sandboxes.pop(sb.id, None)
        self._published.drop(sb.id)
        if self._by_key.get(sb.spec.key) == sb.id:
            del self._by_key[sb.spec.key]
        self._locks.pop(sb.id, None)
        log_.info("sandbox.removed")

    # -- restart recovery ----------------------------------------------------------------

    async def recover(self) -> None:
        """Load every record; clean half-built sandboxes; reconcile ready ones with reality."""
        for d in (self.paths.records, self.paths.run, self.paths.ns):
            await asyncio.to_thread(d.mkdir, parents=True, exist_ok=True, mode=0o711)
        loaded = await asyncio.to_thread(lambda: list(records.load_all(self.paths.records, KIND)))
        for path, rec in loaded:
            if isinstance(rec, records.RecordError):
                _log.warning("sandbox.record_dropped", path=str(path), reason=str(rec))
                await asyncio.to_thread(path.unlink, missing_ok=True)
                continue
            try:
                sb = Sandbox.from_record(rec)
            except (KeyError, TypeError, ValueError) as e:
                _log.warning("sandbox.record_dropped", path=str(path), reason=repr(e))
                await asyncio.to_thread(path.unlink, missing_ok=True)
                continue
            self._sandboxes[sb.id] = sb
            self._published.put(codec.snapshot(sb))
            self._by_key[sb.spec.key] = sb.id
            try:
                await self._reconcile(sb)
                # A ready pod whose RunPodSandbox answer an earlier daemon may never have
                # sent: kubelet's retry with the same name gets it (once).
                sb.delivered = sb.state != State.READY
            except Exception as e:
                # The daemon starts all the same: the pod stays listed (not ready), and its
                # removal, or the next start, tries again.
                _log.error("sandbox.recover_failed", pod_sandbox_id=sb.id,
                           error=e.message if isinstance(e, MoorageError) else repr(e))
        await self._release_orphan_networks()
        await self.probe_userns()

    async def _reconcile(self, sb: Sandbox) -> None:
        if sb.state == State.CREATING:
            _log.info("sandbox.recover_cleanup", pod_sandbox_id=sb.id, reason="half built")
            sb.network_attached = not sb.spec.host_network
            await self._teardown(sb, remove=True)
        elif sb.state == State.READY and not self._intact(sb):
            _log.info("sandbox.recover_notready", pod_sandbox_id=sb.id,
                      reason="namespaces or infra process gone")
            await self._teardown(sb, remove=False)

    async def _release_orphan_networks(self) -> None:
        """DEL again the CNI attachments of pods that are gone: a pod is removed even when
        its DEL fails (so that it never becomes unremovable), and its cached attachment,
        with the IP it holds, is released here at the next start."""
        cached = await asyncio.to_thread(self.cni.cached_sandboxes)
        for sandbox_id in cached:
            if sandbox_id in self._sandboxes:
                continue
            try:
                await self.cni.detach(sandbox_id, None)
            except MoorageError as e:
                _log.warning("sandbox.network_release_failed", pod_sandbox_id=sandbox_id,
                             error=e.message, will_retry="at the next start")
            else:
                _log.info("sandbox.network_released", pod_sandbox_id=sandbox_id,
                          reason="the pod was removed before its CNI DEL succeeded")

    def _intact(self, sb: Sandbox) -> bool:
        pinned = self.pinned(sb)
        for path in pinned.paths():
            if not namespaces.is_pinned(path):
                return False
        if sb.infra_pid is not None and (
            namespaces.process_start_time(sb.infra_pid) != sb.infra_start_time
        ):
            sb.infra_pid = sb.infra_start_time = None
            return False
        return True


def get_in(sandboxes: Mapping[str, Sandbox], id_or_prefix: str) -> Sandbox:
    """The sandbox of an id or unique id prefix among ``sandboxes`` (live ones, or the
    published copies); one still being built is unknown."""
    return get_by_id(sandboxes, id_or_prefix, visible=_visible, field="pod_sandbox_id",
                     what="pod sandbox", required="pod_sandbox_id: an id is required")


def select_in(sandboxes: Mapping[str, Sandbox], flt: SandboxFilter | None = None
              ) -> list[Sandbox]:
    """The sandboxes of ``sandboxes`` that ``flt`` selects (all when None), in order;
    never one still being built."""
    return [sb for sb in sandboxes.values()
            if _visible(sb) and (flt is None or _selects(flt, sb))]


def _visible(sb: Sandbox) -> bool:
    return sb.state != State.CREATING


def _selects(flt: SandboxFilter, sb: Sandbox) -> bool:
    return ((not flt.id or sb.id.startswith(flt.id))
            and (flt.state is None or sb.state == flt.state)
            and all(sb.spec.labels.get(k) == v for k, v in flt.labels.items()))


def mapped_root(uids: Sequence[IdMapping], gids: Sequence[IdMapping]) -> tuple[int, int]:
    """The host uid and gid of container id 0 (validation made sure a mapping covers it)."""
    uid, gid = map_id(uids, 0), map_id(gids, 0)
    if uid is None or gid is None:
        raise InvalidArgument(f"{userns.FIELD}: no mapping covers container id 0")
    return uid, gid


async def _together(*steps: Awaitable[None]) -> None:
    """Run ``steps`` concurrently, each to its end (so that nothing is still being built
    when a failure is undone); then raise the first failure, if any."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _nothing() -> None:
    return None


def _make_cgroup(pod_cgroup: cgroups.PodCgroup, log_directory: str) -> list[Path]:
    """kubelet's log directory for the pod, then the cgroups that were missing."""
    if log_directory:
        Path(log_directory).mkdir(parents=True, exist_ok=True, mode=0o755)
    return pod_cgroup.create()


def _write_pod_files(sb: Sandbox, run_dir: Path, owner: tuple[int, int] | None) -> None:
    spec = sb.spec
    hostname = spec.hostname or _host_hostname()
    files.write_pod_files(
        run_dir, hostname=hostname, resolv=files.resolv_conf(spec.dns),
        hosts=files.hosts_file(hostname, sb.ips, spec.host_network), owner=owner,
    )


def _searchable_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


def _host_hostname() -> str:
    import socket

    return socket.gethostname()
