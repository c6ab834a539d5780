"""Running one CNI plugin: its stdin, its environment, the exec itself.

Plugins are exec'd with ``moorage.util.proc.spawn`` (off the event loop) in a new session
(never ``preexec_fn``: the daemon runs grpc threads), so a plugin that overruns its timeout is
killed together with any helper it started (an IPAM plugin, iptables).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorage import log
from moorage.network.config import NetworkConfigList
from moorage.network.result import parse_error
from moorage.network.types import Bandwidth, CNIError, CNITimeout, PortMapping
from moorage.util.proc import PIPE, Process, spawn

_log = log.get("moorage.network")

#: Output kept from a failing plugin's stderr when it printed no CNI error.
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class Invocation:
    """The per-attachment arguments: the same for every plugin and every command."""

    container_id: str
    netns: str
    ifname: str
    cni_args: str
    capability_args: Mapping[str, Any]


def build_cni_args(namespace: str, name: str, sandbox_id: str, uid: str) -> str:
    """CNI_ARGS as kubelet-driven runtimes pass them (ocicni, containerd)."""
    pairs = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
        ("K8S_POD_UID", uid),
    ]
    for key, value in pairs:
        if any(c in value for c in ";=\0"):
            raise ValueError(f"{key} {value!r} cannot be passed in CNI_ARGS (has ';' or '=')")
    return ";".join(f"{k}={v}" for k, v in pairs)


def build_capability_args(
    port_mappings: Sequence[PortMapping] = (),
    bandwidth: Bandwidth | None = None,
    pod_cidr: str = "",
    cgroup_parent: str = "",
) -> dict[str, Any]:
    """Values for the ``runtimeConfig`` capabilities, keyed by capability name.

    Only port mappings with a host port are passed. A dual-stack pod CIDR (kubelet joins
    the CIDRs with ',') becomes one range set per family.
    """
    caps: dict[str, Any] = {}
    mappings = [
        {
            "hostPort": pm.host_port,
            "containerPort": pm.container_port,
            "protocol": (pm.protocol or "tcp").lower(),
            "hostIP": pm.host_ip,
        }
        for pm in port_mappings
        if pm.host_port > 0
    ]
    if mappings:
        caps["portMappings"] = mappings
    if bandwidth is not None:
        caps["bandwidth"] = {
            "ingressRate": bandwidth.ingress_rate,
            "ingressBurst": bandwidth.ingress_burst,
            "egressRate": bandwidth.egress_rate,
            "egressBurst": bandwidth.egress_burst,
        }
    cidrs = [c.strip() for c in pod_cidr.split(",") if c.strip()]
    if cidrs:
        caps["ipRanges"] = [[{"subnet": c}] for c in cidrs]
    if cgroup_parent:
        caps["cgroupPath"] = cgroup_parent
    return caps


def plugin_config(
    net: NetworkConfigList,
    plugin: Mapping[str, Any],
    prev_result: Mapping[str, Any] | None,
    capability_args: Mapping[str, Any],
) -> dict[str, Any]:
    """A plugin's stdin: its config with the list's name and version, the previous result
    and ``runtimeConfig`` for the capabilities it declares (libcni buildOneConfig)."""
    conf = dict(plugin)
    conf["name"] = net.name
    conf["cniVersion"] = net.cni_version
    if prev_result is not None:
        conf["prevResult"] = prev_result
    declared = plugin.get("capabilities") or {}
    runtime = {
        cap: capability_args[cap]
        for cap, enabled in declared.items()
        if enabled is True and cap in capability_args
    }
    if runtime:
        conf["runtimeConfig"] = runtime
    return conf


def plugin_env(command: str, inv: Invocation, plugin_dirs: Sequence[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=inv.container_id,
        CNI_NETNS=inv.netns,
        CNI_IFNAME=inv.ifname,
        CNI_ARGS=inv.cni_args,
        CNI_PATH=":".join(str(d) for d in plugin_dirs),
    )
    return env


def _kill_group(proc: Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


async def exec_plugin(
    path: Path,
    command: str,
    stdin: Mapping[str, Any],
    inv: Invocation,
    plugin_dirs: Sequence[Path],
    time_limit: float,
    network: str,
) -> bytes:
    """Run one plugin; its stdout on success, CNIError otherwise."""
    plugin = path.name
    where = f'CNI plugin "{plugin}" {command} (network "{network}", container {inv.container_id})'
    try:
        proc = await spawn(
            [str(path)],
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
            env=plugin_env(command, inv, plugin_dirs),
            start_new_session=True,
        )
    except OSError as e:
        raise CNIError(
            f"{where}: cannot run {path}: {e.strerror or e}", plugin=plugin, command=command
        ) from e
    try:
        stdout, stderr = await asyncio.wait_for(
            proc.communicate(json.dumps(stdin).encode()), time_limit
        )
    except TimeoutError:
        _kill_group(proc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        raise CNITimeout(
            f"{where}: timed out after {time_limit:g}s and was killed",
            plugin=plugin,
            command=command,
        ) from None
    except BaseException:
        _kill_group(proc)  # cancelled: leave no plugin running behind our back
        raise
    code = proc.returncode
    if code != 0:
        cni_code, msg, details = parse_error(stdout)
        if msg or cni_code is not None:
            text = msg or "(no message)"
            extra = [f"CNI error code {cni_code}"] if cni_code is not None else []
            if details:
                extra.append(f"details: {details}")
            text += f" ({'; '.join(extra)})" if extra else ""
        else:
            raw = (stderr or stdout).decode(errors="replace").strip()
            text = raw[-_STDERR_TAIL:] or "no output"
        if code is not None and code < 0:
            status = f"killed by signal {-code}"
        else:
            status = f"exit code {code}"
        raise CNIError(
            f"{where} failed ({status}): {text}",
            plugin=plugin,
            command=command,
            exit_code=code,
            cni_code=cni_code,
            cni_msg=msg,
            details=details,
        )
    if stderr:
        _log.debug(
            "cni.plugin.stderr",
            plugin=plugin,
            command=command,
            container=inv.container_id,
            stderr=stderr.decode(errors="replace")[-_STDERR_TAIL:],
        )
    return stdout
