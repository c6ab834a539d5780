"""What a container is, in domain terms: the CRI ContainerConfig without protobuf, the view of
its sandbox that a container needs, and what was built for it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from moorage.sandbox.cgroups import Resources
from moorage.sandbox.model import UserNamespace
from moorage.util.idmap import IdMapping

Propagation = Literal["private", "rslave", "rshared"]


class State(enum.StrEnum):
    CREATING = "creating"  # being built; never shown to CRI callers
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: str
    readonly: bool = False
    propagation: Propagation = "private"
    recursive_read_only: bool = False
    selinux_relabel: bool = False
    #: An idmapped bind mount (CRI uidMappings/gidMappings; kubelet sets the pod's for
    #: volumes of a pod with a user namespace): both or neither.
    uid_mappings: tuple[IdMapping, ...] = ()
    gid_mappings: tuple[IdMapping, ...] = ()
    #: An image volume (KEP-4639): the image (as kubelet names it: its id) whose
    #: filesystem is mounted read-only, instead of a host path; ``image_sub_path`` a path
    #: inside it to mount instead of its root.
    image: str = ""
    image_sub_path: str = ""


@dataclass(frozen=True)
class ImageVolume:
    """What an image volume (a CRI mount with ``image``) was resolved to at create."""

    index: int  # into ContainerSpec.mounts
    image_id: str
    layers: tuple[str, ...]  # diff_ids, lowest first
    #: The host path bound into the container (the read-only overlay, or the sub path
    #: in it); empty until mounted.
    source: str = ""


@dataclass(frozen=True)
class Device:
    container_path: str
    host_path: str
    permissions: str = "rwm"


@dataclass(frozen=True)
class SecurityProfile:
    """CRI SecurityProfile: ``RuntimeDefault``, ``Unconfined`` or ``Localhost`` + a ref
    (seccomp: a host path; AppArmor: a profile name). ``""``: the request named none (the
    runtime's choice: unconfined seccomp unless ``seccomp_use_default_when_empty``, the
    default AppArmor profile where AppArmor is enabled)."""

    kind: Literal["", "RuntimeDefault", "Unconfined", "Localhost"] = ""
    localhost_ref: str = ""


@dataclass(frozen=True)
class SecurityContext:
    privileged: bool = False
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_username: str = ""
    readonly_rootfs: bool = False
    supplemental_groups: tuple[int, ...] = ()
    supplemental_groups_policy: Literal["merge", "strict"] = "merge"
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    cap_add_ambient: tuple[str, ...] = ()
    no_new_privs: bool = False
    #: None: the defaults (as CRI-O); a tuple, even empty, is used as given.
    masked_paths: tuple[str, ...] | None = None
    readonly_paths: tuple[str, ...] | None = None
    seccomp: SecurityProfile = field(default_factory=SecurityProfile)
    apparmor: SecurityProfile = field(default_factory=SecurityProfile)
    #: CRI SELinuxOption (user, role, type, level), () when not given; ignored (logged).
    selinux_options: tuple[str, ...] = ()
    #: CRI NamespaceMode numbers: 0 POD, 1 CONTAINER, 2 NODE, 3 TARGET.
    pid_mode: int = 1
    target_id: str = ""


@dataclass(frozen=True)
class ContainerResources:
    cgroup: Resources = field(default_factory=Resources)
    oom_score_adj: int = 0


@dataclass(frozen=True)
class ContainerSpec:
    """The CRI ContainerConfig of CreateContainer."""

    name: str
    attempt: int
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    working_dir: str = ""
    env: tuple[tuple[str, bytes], ...] = ()
    mounts: tuple[Mount, ...] = ()
    devices: tuple[Device, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""  # relative to the sandbox's log_directory
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    resources: ContainerResources = field(default_factory=ContainerResources)
    security: SecurityContext = field(default_factory=SecurityContext)
    stop_signal: str = ""  # e.g. "SIGTERM"; empty: the image's, else SIGTERM
    #: namespace_options.userns_options; None when not given (the pod's then).
    userns: UserNamespace | None = None
    #: CDI_devices: fully qualified CDI device names (``vendor/class=name``).
    cdi_devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class SandboxView:
    """What a container needs of its pod sandbox."""

    id: str
    name: str
    namespace: str
    uid: str
    cgroup_parent: str  # the pod cgroup path (cgroupfs path, or systemd slice path)
    net_ns: str | None  # pinned path; None: the host's
    ipc_ns: str | None
    uts_ns: str | None
    pid_ns: str | None  # /proc/<infra>/ns/pid when the pod shares one; else None
    files_dir: str  # holds hostname, hosts, resolv.conf
    shm_path: str | None  # the pod's /dev/shm; None: the host's (host IPC)
    hostname: str
    log_directory: str
    privileged: bool = False
    host_network: bool = False
    host_pid: bool = False  # pod pid mode NODE
    #: The pod's pinned user namespace and its mappings; None/(): the host's.
    user_ns: str | None = None
    uid_mappings: tuple[IdMapping, ...] = ()
    gid_mappings: tuple[IdMapping, ...] = ()


@dataclass(frozen=True)
class ImageView:
    """What a container needs of its image."""

    id: str
    ref: str  # image_ref as PullImage reported it (the id)
    name: str  # the name the container was created with
    config: dict[str, Any]  # the image config's "config" object (User, Env, Cmd, ...)
    layers: tuple[str, ...]  # diff_ids, lowest first


@dataclass
class Container:
    """A container and everything built for it; persisted as one record."""

    id: str
    sandbox_id: str
    spec: ContainerSpec
    image: ImageView
    created_at: int  # ns
    runtime_handler: str
    state: State = State.CREATING
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    monitor_pid: int = 0
    log_path: str = ""  # absolute
    bundle: str = ""
    user: dict[str, Any] = field(default_factory=dict)  # resolved uid/gid/groups
    resources: ContainerResources = field(default_factory=ContainerResources)
    delivered: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    image_volumes: tuple[ImageVolume, ...] = ()
