"""What callers hand to the CNI manager and what they get back, and its two errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moorage import errors


@dataclass(frozen=True)
class PortMapping:
    """One hostPort of a pod (the CNI ``portMappings`` capability)."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""


@dataclass(frozen=True)
class Bandwidth:
    """Traffic shaping in bits per second (the CNI ``bandwidth`` capability)."""

    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0


@dataclass(frozen=True)
class AttachRequest:
    sandbox_id: str
    netns_path: str
    pod_namespace: str
    pod_name: str
    pod_uid: str
    ifname: str = "eth0"
    port_mappings: tuple[PortMapping, ...] = ()
    bandwidth: Bandwidth | None = None
    pod_cidr: str = ""
    cgroup_parent: str = ""


@dataclass(frozen=True)
class AttachResult:
    """The network attached, the pod's addresses (IPv4 first) and the final CNI result."""

    network: str
    ips: tuple[str, ...]
    result: dict[str, Any]


class NetworkNotReady(errors.FailedPrecondition):
    """No usable network configuration; the message says which directory and why."""


class CNIError(errors.Internal):
    """A CNI plugin failed, could not be found or could not be run."""

    def __init__(
        self,
        message: str,
        *,
        plugin: str = "",
        command: str = "",
        exit_code: int | None = None,
        cni_code: int | None = None,
        cni_msg: str = "",
        details: str = "",
    ) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.command = command
        self.exit_code = exit_code
        self.cni_code = cni_code
        self.cni_msg = cni_msg
        self.details = details


class CNITimeout(CNIError):
    """A CNI plugin overran the timeout (``network.cni_timeout``) and was killed."""

    code = "DEADLINE_EXCEEDED"
