"""What a pod sandbox is, in domain terms: the spec kubelet asked for and what was built."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from moorage.network import Bandwidth, PortMapping
from moorage.sandbox.cgroups import Resources
from moorage.sandbox.files import DnsConfig
from moorage.util import codec
from moorage.util.idmap import IdMapping


class Mode(enum.IntEnum):
    """CRI NamespaceMode."""

    POD = 0
    CONTAINER = 1
    NODE = 2
    TARGET = 3


@dataclass(frozen=True)
class UserNamespace:
    """CRI ``UserNamespace``: NODE is the host's (no user namespace); POD a new one for the
    pod with exactly these mappings (see :mod:`moorage.sandbox.userns`)."""

    mode: Mode = Mode.NODE
    uids: tuple[IdMapping, ...] = ()
    gids: tuple[IdMapping, ...] = ()

    @property
    def pod(self) -> bool:
        return self.mode == Mode.POD


class State(enum.StrEnum):
    CREATING = "creating"
    READY = "ready"
    NOTREADY = "notready"


@dataclass(frozen=True)
class SandboxSpec:
    name: str
    namespace: str
    uid: str
    attempt: int
    hostname: str = ""
    log_directory: str = ""
    runtime_handler: str = ""
    dns: DnsConfig = field(default_factory=DnsConfig)
    port_mappings: tuple[PortMapping, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    network: Mode = Mode.POD
    pid: Mode = Mode.CONTAINER
    ipc: Mode = Mode.POD
    sysctls: dict[str, str] = field(default_factory=dict)
    resources: Resources | None = None
    bandwidth: Bandwidth | None = None
    privileged: bool = False
    userns: UserNamespace = field(default_factory=UserNamespace)

    @property
    def key(self) -> str:
        """The name kubelet retries under (CRI-O's k8s_<name>_<ns>_<uid>_<attempt>)."""
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"

    @property
    def host_network(self) -> bool:
        return self.network == Mode.NODE


@dataclass
class Sandbox:
    """A sandbox and everything built for it; persisted as one record."""

    id: str
    spec: SandboxSpec
    created_at: int  # ns since the epoch
    runtime_handler: str
    state: State = State.CREATING
    cgroup_path: str = ""
    cgroup_created: list[str] = field(default_factory=list)
    #: The systemd driver's pod slice, when moorage started it (stopped at removal).
    slice_created: str = ""
    files_dir: str = ""
    shm_path: str = ""
    ips: list[str] = field(default_factory=list)
    network_attached: bool = False
    infra_pid: int | None = None
    infra_start_time: int | None = None
    #: False while a sandbox built for a caller that went away waits for kubelet's retry.
    delivered: bool = True

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = codec.to_data(self)
        data.pop("delivered")
        return data

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Sandbox:
        return codec.load(cls, rec)
