"""CNI for pod sandboxes, as kubelet nodes expect it (CRI-O's ocicni, containerd's go-cni).

``CNIManager`` keeps the default network from the config dir (re-read when the dir changes,
so a config that a network daemon writes after we started is picked up), runs the plugin
chain for ADD, DEL and CHECK, and caches what each ADD used so that the matching DEL runs
with the same configuration, arguments and result even after a config change or a restart.

Cache records (``<cache_dir>/<sandbox_id>.json``, kind ``cni-attachment``) go through two
states: ``adding`` is written before the first plugin runs and ``attached`` after the last
one succeeded. A kill -9 in between, or an ADD whose rollback DEL failed, therefore leaves an
``adding`` record, and the next ``detach`` (or ``attach``) of that sandbox cleans up with the
exact configuration that was used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moorage import errors, log
from moorage.network.config import (
    ConfigError,
    NetworkConfigList,
    Snapshot,
    at_least,
    find_plugin,
    parse_list,
    scan,
    snapshot,
    valid_name,
)
from moorage.network.invoke import (
    Invocation,
    build_capability_args,
    build_cni_args,
    exec_plugin,
    plugin_config,
)
from moorage.network.netns import is_netns, loopback_up
from moorage.network.result import parse_result, result_ips
from moorage.network.types import (
    AttachRequest,
    AttachResult,
    CNIError,
    NetworkNotReady,
)
from moorage.state import records
from moorage.util.crash import crashpoint
from moorage.util.fs import remove_stale_temps

__all__ = ["CNIManager"]

CACHE_KIND = "cni-attachment"
NOT_READY_REASON = "NetworkPluginNotReady"
STATE_ADDING = "adding"
STATE_ATTACHED = "attached"
# Linux IFNAMSIZ is 16 with the terminating NUL.
_MAX_IFNAME = 15

_log = log.get("moorage.network")
_UNSCANNED: Any = object()


def _check_ifname(ifname: str) -> None:
    if (
        not ifname
        or len(ifname) > _MAX_IFNAME
        or ifname in (".", "..")
        or any(c in ifname for c in "/:")
        or any(c.isspace() for c in ifname)
    ):
        raise errors.InvalidArgument(f"ifname {ifname!r} is not a valid interface name")


def _check_sandbox_id(sandbox_id: str) -> None:
    if not valid_name(sandbox_id):
        raise errors.InvalidArgument(
            f"sandbox_id {sandbox_id!r} must start with [a-zA-Z0-9] and hold only [a-zA-Z0-9_.-]"
        )


class CNIManager:
    """The node's default CNI network and the attachments of pod sandboxes to it."""

    def __init__(
        self,
        conf_dir: Path,
        plugin_dirs: Sequence[Path],
        cache_dir: Path,
        default_network: str = "",
        plugin_timeout: float = 60.0,
        loopback: bool = True,
    ) -> None:
        self.conf_dir = Path(conf_dir)
        self.plugin_dirs = tuple(Path(d) for d in plugin_dirs)
        self.cache_dir = Path(cache_dir)
        self.default_network = default_network
        self.plugin_timeout = plugin_timeout
        #: Bring ``lo`` up in every pod netns before the ADD (ocicni and go-cni do; network
        #: configs such as flannel's, calico's or kindnet's leave it to the runtime).
        self.loopback = loopback
        self._snapshot: Snapshot = _UNSCANNED
        self._default: NetworkConfigList | None = None
        self._not_ready = f"CNI config dir {self.conf_dir} not read yet"
        self._pod_cidr = ""
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- configuration ------------------------------------------------------------------------

    def _refresh(self) -> NetworkConfigList | None:
        """Re-read the config dir when its listing, mtimes or sizes changed."""
        snap = snapshot(self.conf_dir)
        if self._snapshot is not _UNSCANNED and snap == self._snapshot:
            return self._default
        self._snapshot = snap
        result = scan(self.conf_dir)
        net, message = result.select(self.default_network)
        changed = (net is None) != (self._default is None) or (
            net is not None
            and self._default is not None
            and (net.source, net.document) != (self._default.source, self._default.document)
        )
        self._default, self._not_ready = net, message
        for name, why in result.refused:
            _log.warning("cni.config.skipped", file=name, dir=str(self.conf_dir), reason=why)
        if changed and net is not None:
            _log.info(
                "cni.config.loaded",
                network=net.name,
                file=net.source,
                cni_version=net.cni_version,
                plugins=",".join(net.plugin_types),
            )
        elif changed:
            _log.warning("cni.config.none", message=message)
        return net

    def status(self) -> tuple[bool, str, str]:
        """(ready, reason, message) of the CRI NetworkReady condition.

        Cheap enough for kubelet's once-a-second poll: the dir is only read again when its
        listing changed. The network is ready when a default network is configured and all
        of its plugins are found (checked each call, so installing a plugin is seen).
        """
        net = self._refresh()
        if net is None:
            return False, NOT_READY_REASON, self._not_ready
        missing = [t for t in net.plugin_types if find_plugin(t, self.plugin_dirs) is None]
        if missing:
            names = ", ".join(f'"{t}"' for t in dict.fromkeys(missing))
            return (
                False,
                NOT_READY_REASON,
                f"CNI network {net.name!r} ({net.source}): plugin {names} not found in "
                f"{self._dirs_text()}",
            )
        return True, "", ""

    def set_pod_cidr(self, cidr: str) -> None:
        """The node's pod CIDR(s) from UpdateRuntimeConfig, passed as the ipRanges capability."""
        self._pod_cidr = cidr.strip()

    def default(self) -> NetworkConfigList:
        """The current default network, or NetworkNotReady saying why there is none."""
        net = self._refresh()
        if net is None:
            raise NetworkNotReady(self._not_ready)
        return net

    # -- the cache ----------------------------------------------------------------------------

    def _cache_path(self, sandbox_id: str) -> Path:
        return self.cache_dir / f"{sandbox_id}.json"

    def _read(self, sandbox_id: str) -> dict[str, Any] | None:
        path = self._cache_path(sandbox_id)
        if not path.exists():
            return None
        return records.read(path, CACHE_KIND)

    def cached(self, sandbox_id: str) -> dict[str, Any] | None:
        """The cached ADD record of a sandbox (config list, result, args), for verbose status."""
        _check_sandbox_id(sandbox_id)
        try:
            return self._read(sandbox_id)
        except records.RecordError as e:
            _log.warning("cni.cache.unreadable", sandbox=sandbox_id, error=str(e))
            return None

    def cached_sandboxes(self) -> list[str]:
        """Sandbox ids with a cache record (to reconcile at start, before any ADD or DEL
        runs: the temp files of writes a crash cut short are removed)."""
        remove_stale_temps(self.cache_dir)
        try:
            names = os.listdir(self.cache_dir)
        except FileNotFoundError:
            return []
        return sorted(
            n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")
        )

    async def _write(self, sandbox_id: str, record: dict[str, Any]) -> None:
        path = self._cache_path(sandbox_id)
        try:
            await asyncio.to_thread(records.write, path, CACHE_KIND, record)
        except OSError as e:
            raise CNIError(f"cannot write the CNI cache record {path}: {e}") from e

    async def _remove(self, sandbox_id: str) -> None:
        path = self._cache_path(sandbox_id)
        await asyncio.to_thread(path.unlink, missing_ok=True)

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        lock = self._locks.get(sandbox_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[sandbox_id] = lock
        return lock

    # -- plugin chains ------------------------------------------------------------------------

    def _dirs_text(self) -> str:
        return ":".join(str(d) for d in self.plugin_dirs) or "(no plugin dirs)"

    def _plugin_path(self, net: NetworkConfigList, plugin: Mapping[str, Any], cmd: str) -> Path:
        kind = str(plugin["type"])
        path = find_plugin(kind, self.plugin_dirs)
        if path is None:
            raise CNIError(
                f'CNI plugin "{kind}" {cmd} (network "{net.name}"): plugin not found in '
                f"{self._dirs_text()}",
                plugin=kind,
                command=cmd,
            )
        return path

    async def _run(
        self,
        net: NetworkConfigList,
        plugin: Mapping[str, Any],
        command: str,
        inv: Invocation,
        prev: Mapping[str, Any] | None,
        path: Path | None = None,
    ) -> bytes:
        return await exec_plugin(
            path or self._plugin_path(net, plugin, command),
            command,
            plugin_config(net, plugin, prev, inv.capability_args),
            inv,
            self.plugin_dirs,
            self.plugin_timeout,
            net.name,
        )

    async def _add(
        self, net: NetworkConfigList, inv: Invocation, progress: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """ADD through the list, each plugin getting the previous one's result. Each result
        is appended to ``progress`` so that a failure's rollback can pass the latest."""
        result: dict[str, Any] | None = None
        for plugin in net.plugins:
            out = await self._run(net, plugin, "ADD", inv, result)
            try:
                result = parse_result(out)
            except ValueError as e:
                kind = str(plugin["type"])
                raise CNIError(
                    f'CNI plugin "{kind}" ADD (network "{net.name}", container '
                    f"{inv.container_id}) printed no usable result: {e}",
                    plugin=kind,
                    command="ADD",
                    exit_code=0,
                ) from e
            progress.append(result)
        assert result is not None  # a list has at least one plugin
        return result

    async def _rollback(
        self, net: NetworkConfigList, inv: Invocation, result: dict[str, Any] | None
    ) -> CNIError | None:
        """DEL every plugin of a failed ADD (reverse order, all of them, missing ones skipped:
        a plugin that cannot be found has done nothing). The first failure, if any."""
        prev = result if at_least(net.cni_version, "0.4.0") else None
        first: CNIError | None = None
        for plugin in reversed(net.plugins):
            path = find_plugin(str(plugin["type"]), self.plugin_dirs)
            if path is None:
                continue
            try:
                await self._run(net, plugin, "DEL", inv, prev, path)
            except CNIError as e:
                _log.error("cni.rollback.failed", container=inv.container_id, error=e.message)
                first = first or e
        return first

    async def _delete(
        self, net: NetworkConfigList, inv: Invocation, result: Mapping[str, Any] | None
    ) -> None:
        """DEL in reverse order with the ADD's result; halts at the first failure (spec)."""
        prev = result if at_least(net.cni_version, "0.4.0") else None
        for plugin in reversed(net.plugins):
            await self._run(net, plugin, "DEL", inv, prev)

    async def _write_quietly(
        self,
        sandbox_id: str,
        net: NetworkConfigList,
        inv: Invocation,
        result: dict[str, Any] | None,
        pod: Mapping[str, str],
    ) -> None:
        record = self._record(net, inv, STATE_ADDING, result, pod)
        try:
            await self._write(sandbox_id, record)
        except CNIError as e:
            _log.error("cni.cache.write_failed", sandbox=sandbox_id, error=e.message)

    @staticmethod
    def _record(
        net: NetworkConfigList,
        inv: Invocation,
        state: str,
        result: Mapping[str, Any] | None,
        pod: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "sandbox_id": inv.container_id,
            "state": state,
            "network": net.name,
            "cni_version": net.cni_version,
            "config": net.document,
            "config_file": net.source,
            "ifname": inv.ifname,
            "netns": inv.netns,
            "cni_args": inv.cni_args,
            "capability_args": dict(inv.capability_args),
            "result": result,
            "pod": dict(pod or {}),
        }

    @staticmethod
    def _from_record(sandbox_id: str, record: Mapping[str, Any]) -> NetworkConfigList:
        try:
            net = parse_list(record["config"], source=f"CNI cache of sandbox {sandbox_id}")
            version = record.get("cni_version") or net.cni_version
            at_least(version, "0.0.0")  # a version string
        except (ConfigError, KeyError, TypeError, AttributeError) as e:
            raise records.RecordError(f"CNI cache of sandbox {sandbox_id}: bad config: {e}") from e
        return dataclasses.replace(net, cni_version=str(version))

    async def _clean_record(self, sandbox_id: str, record: Mapping[str, Any], netns: str) -> None:
        """DEL an attachment described by a cache record, then drop the record."""
        net = self._from_record(sandbox_id, record)
        inv = Invocation(
            container_id=sandbox_id,
            netns=netns,
            ifname=str(record.get("ifname") or "eth0"),
            cni_args=str(record.get("cni_args") or _minimal_cni_args(sandbox_id)),
            capability_args=dict(record.get("capability_args") or {}),
        )
        result = record.get("result")
        await self._delete(net, inv, result if isinstance(result, dict) else None)
        await self._remove(sandbox_id)

    # -- the API ------------------------------------------------------------------------------

    async def attach(self, req: AttachRequest) -> AttachResult:
        """ADD the sandbox to the default network; CNIError (after rollback) on failure.

        Attaching again a sandbox that is attached to the same netns and interface gives the
        cached result; a leftover of an earlier attach is DEL'd first.
        """
        _check_sandbox_id(req.sandbox_id)
        _check_ifname(req.ifname)
        if not is_netns(req.netns_path):
            raise errors.InvalidArgument(
                f"netns_path {req.netns_path!r} is not a network namespace"
            )
        try:
            cni_args = build_cni_args(req.pod_namespace, req.pod_name, req.sandbox_id, req.pod_uid)
        except ValueError as e:
            raise errors.InvalidArgument(str(e)) from e
        async with self._lock(req.sandbox_id):
            try:
                old = self._read(req.sandbox_id)
            except records.RecordError as e:
                _log.warning("cni.cache.unreadable", sandbox=req.sandbox_id, error=str(e))
                old = None
            if old is not None:
                if (
                    old.get("state") == STATE_ATTACHED
                    and old.get("netns") == req.netns_path
                    and old.get("ifname") == req.ifname
                    and isinstance(old.get("result"), dict)
                ):
                    return AttachResult(
                        str(old.get("network")), result_ips(old["result"]), old["result"]
                    )
                old_ns = str(old.get("netns") or "")
                try:
                    await self._clean_record(
                        req.sandbox_id, old, old_ns if is_netns(old_ns) else ""
                    )
                except records.RecordError as e:
                    _log.warning("cni.cache.unreadable", sandbox=req.sandbox_id, error=str(e))
            net = self.default()
            caps = build_capability_args(
                req.port_mappings, req.bandwidth, req.pod_cidr or self._pod_cidr, req.cgroup_parent
            )
            inv = Invocation(req.sandbox_id, req.netns_path, req.ifname, cni_args, caps)
            pod = {"namespace": req.pod_namespace, "name": req.pod_name, "uid": req.pod_uid}
            if self.loopback:
                try:
                    await loopback_up(req.netns_path)
                except OSError as e:
                    raise CNIError(
                        f"cannot bring up lo in {req.netns_path} for sandbox {req.sandbox_id}: {e}"
                    ) from e
            await self._write(req.sandbox_id, self._record(net, inv, STATE_ADDING, None, pod))
            crashpoint("sandbox.run.network_adding")
            progress: list[dict[str, Any]] = []
            try:
                result = await self._add(net, inv, progress)
                await self._write(
                    req.sandbox_id, self._record(net, inv, STATE_ATTACHED, result, pod)
                )
            except BaseException as e:
                # Leave no veth or IP allocation behind: DEL the whole list.
                latest = progress[-1] if progress else None
                failure = await self._rollback(net, inv, latest)
                if failure is None:
                    await self._remove(req.sandbox_id)
                    raise
                # Keep the record (state "adding") so the next detach retries the DEL.
                await self._write_quietly(req.sandbox_id, net, inv, latest, pod)
                if isinstance(e, CNIError):
                    raise _with_message(
                        e,
                        f"{e.message}; the cleanup DEL failed too and is retried by the next "
                        f"detach: {failure.message}",
                    ) from e
                raise
            ips = result_ips(result)
            _log.info(
                "cni.attached",
                sandbox=req.sandbox_id,
                network=net.name,
                ips=",".join(ips),
                pod=f"{req.pod_namespace}/{req.pod_name}",
            )
            return AttachResult(net.name, ips, result)

    async def detach(self, sandbox_id: str, netns_path: str | None) -> None:
        """DEL the sandbox from the network it was attached to; idempotent.

        Uses the cached ADD record (config, args, result); without one, the current default
        network. A netns that is gone (or None) is passed as CNI_NETNS="" so that plugins
        still release what they hold outside it (IP allocations, host-side rules). The cache
        record is removed only after every plugin's DEL succeeded; otherwise CNIError.
        """
        _check_sandbox_id(sandbox_id)
        netns = netns_path if netns_path and is_netns(netns_path) else ""
        async with self._lock(sandbox_id):
            try:
                record = self._read(sandbox_id)
                if record is not None:
                    await self._clean_record(sandbox_id, record, netns)
                    _log.info("cni.detached", sandbox=sandbox_id, network=record.get("network"))
                    return
            except records.RecordError as e:
                _log.warning("cni.cache.unreadable", sandbox=sandbox_id, error=str(e))
            net = self._refresh()
            if net is None:
                # Nothing was cached and nothing is configured: no plugin can hold anything
                # for this sandbox that we could ask it to release.
                _log.warning("cni.detach.skipped", sandbox=sandbox_id, reason=self._not_ready)
                await self._remove(sandbox_id)
                return
            inv = Invocation(
                container_id=sandbox_id,
                netns=netns,
                ifname="eth0",
                cni_args=_minimal_cni_args(sandbox_id),
                capability_args=build_capability_args(pod_cidr=self._pod_cidr),
            )
            await self._delete(net, inv, None)
            await self._remove(sandbox_id)
            _log.info("cni.detached", sandbox=sandbox_id, network=net.name, cached=False)

    async def check(self, sandbox_id: str, netns_path: str) -> None:
        """CHECK the cached attachment (spec 0.4.0 and later; a no-op before or when the
        network sets ``disableCheck``). CNIError when a plugin finds it broken."""
        _check_sandbox_id(sandbox_id)
        async with self._lock(sandbox_id):
            try:
                record = self._read(sandbox_id)
            except records.RecordError as e:
                raise CNIError(str(e)) from e
            if record is None or record.get("state") != STATE_ATTACHED:
                raise CNIError(f"sandbox {sandbox_id} has no CNI attachment to check")
            try:
                net = self._from_record(sandbox_id, record)
            except records.RecordError as e:
                raise CNIError(str(e)) from e
            if net.disable_check or not at_least(net.cni_version, "0.4.0"):
                return
            inv = Invocation(
                container_id=sandbox_id,
                netns=netns_path,
                ifname=str(record.get("ifname") or "eth0"),
                cni_args=str(record.get("cni_args") or _minimal_cni_args(sandbox_id)),
                capability_args=dict(record.get("capability_args") or {}),
            )
            result = record.get("result")
            for plugin in net.plugins:
                await self._run(
                    net, plugin, "CHECK", inv, result if isinstance(result, dict) else None
                )


def _minimal_cni_args(sandbox_id: str) -> str:
    return f"IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID={sandbox_id}"


def _with_message(error: CNIError, message: str) -> CNIError:
    """The same CNIError (of the same class) with another message."""
    return type(error)(
        message,
        plugin=error.plugin,
        command=error.command,
        exit_code=error.exit_code,
        cni_code=error.cni_code,
        cni_msg=error.cni_msg,
        details=error.details,
    )
