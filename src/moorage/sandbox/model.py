"""What a pod sandbox is, in domain terms: the spec kubelet asked for and what was built."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from moorage.network.cni import Bandwidth, PortMapping
from moorage.sandbox.cgroups import Resources
from moorage.sandbox.files import DnsConfig


class Mode(enum.IntEnum):
    """CRI NamespaceMode."""

    POD = 0
    CONTAINER = 1
    NODE = 2
    TARGET = 3


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

    @property
    def key(self) -> str:
        """The name kubelet retries under (CRI-O's k8s_<name>_<ns>_<uid>_<attempt>)."""
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"

    @property
    def host_network(self) -> bool:
        return self.network == Mode.NODE

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name, "namespace": self.namespace, "uid": self.uid,
            "attempt": self.attempt, "hostname": self.hostname,
            "log_directory": self.log_directory, "runtime_handler": self.runtime_handler,
            "dns": {"servers": list(self.dns.servers), "searches": list(self.dns.searches),
                    "options": list(self.dns.options)},
            "port_mappings": [
                {"host_port": p.host_port, "container_port": p.container_port,
                 "protocol": p.protocol, "host_ip": p.host_ip}
                for p in self.port_mappings
            ],
            "labels": self.labels, "annotations": self.annotations,
            "cgroup_parent": self.cgroup_parent, "network": int(self.network),
            "pid": int(self.pid), "ipc": int(self.ipc), "sysctls": self.sysctls,
            "resources": None if self.resources is None else _resources_record(self.resources),
            "bandwidth": None if self.bandwidth is None else {
                "ingress_rate": self.bandwidth.ingress_rate,
                "ingress_burst": self.bandwidth.ingress_burst,
                "egress_rate": self.bandwidth.egress_rate,
                "egress_burst": self.bandwidth.egress_burst,
            },
            "privileged": self.privileged,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> SandboxSpec:
        dns = rec.get("dns") or {}
        res = rec.get("resources")
        bw = rec.get("bandwidth")
        return cls(
            name=rec["name"], namespace=rec["namespace"], uid=rec["uid"],
            attempt=int(rec["attempt"]), hostname=rec.get("hostname", ""),
            log_directory=rec.get("log_directory", ""),
            runtime_handler=rec.get("runtime_handler", ""),
            dns=DnsConfig(tuple(dns.get("servers", ())), tuple(dns.get("searches", ())),
                          tuple(dns.get("options", ()))),
            port_mappings=tuple(PortMapping(**p) for p in rec.get("port_mappings", ())),
            labels=dict(rec.get("labels", {})), annotations=dict(rec.get("annotations", {})),
            cgroup_parent=rec.get("cgroup_parent", ""), network=Mode(rec.get("network", 0)),
            pid=Mode(rec.get("pid", 1)), ipc=Mode(rec.get("ipc", 0)),
            sysctls=dict(rec.get("sysctls", {})),
            resources=None if res is None else Resources(**res),
            bandwidth=None if bw is None else Bandwidth(**bw),
            privileged=bool(rec.get("privileged", False)),
        )


def _resources_record(res: Resources) -> dict[str, Any]:
    return {
        "cpu_period": res.cpu_period, "cpu_quota": res.cpu_quota, "cpu_shares": res.cpu_shares,
        "memory_limit": res.memory_limit, "memory_swap_limit": res.memory_swap_limit,
        "cpuset_cpus": res.cpuset_cpus, "cpuset_mems": res.cpuset_mems,
        "pids_limit": res.pids_limit, "hugepage_limits": dict(res.hugepage_limits),
        "unified": dict(res.unified),
    }


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
    files_dir: str = ""
    shm_path: str = ""
    ips: list[str] = field(default_factory=list)
    network_attached: bool = False
    infra_pid: int | None = None
    infra_start_time: int | None = None
    #: False while a sandbox built for a caller that went away waits for kubelet's retry.
    delivered: bool = True

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id, "spec": self.spec.record(), "created_at": self.created_at,
            "runtime_handler": self.runtime_handler, "state": self.state.value,
            "cgroup_path": self.cgroup_path, "cgroup_created": self.cgroup_created,
            "files_dir": self.files_dir, "shm_path": self.shm_path, "ips": self.ips,
            "network_attached": self.network_attached, "infra_pid": self.infra_pid,
            "infra_start_time": self.infra_start_time,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Sandbox:
        return cls(
            id=rec["id"], spec=SandboxSpec.from_record(rec["spec"]),
            created_at=int(rec["created_at"]), runtime_handler=rec["runtime_handler"],
            state=State(rec["state"]), cgroup_path=rec.get("cgroup_path", ""),
            cgroup_created=list(rec.get("cgroup_created", [])),
            files_dir=rec.get("files_dir", ""), shm_path=rec.get("shm_path", ""),
            ips=list(rec.get("ips", [])), network_attached=bool(rec.get("network_attached")),
            infra_pid=rec.get("infra_pid"), infra_start_time=rec.get("infra_start_time"),
        )
