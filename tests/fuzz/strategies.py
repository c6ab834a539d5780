"""Hypothesis strategies for CRI requests, derived from the protobuf descriptors of runtime.v1.

Two kinds of request, mixed by :func:`request`:

* :func:`message`: any message, built field by field from its descriptor (scalars of every
  width, enums including values the API does not define, strings from empty to 1 MiB with
  NUL, newlines, unicode and ``..``, bytes, repeated fields, maps, nested messages, oneofs),
  each field present or missing at random. A new RPC or a new field is fuzzed without any
  change here.
* :func:`mutated`: a valid request, built as the e2e tests build them (a real pod, a real
  container, the image the fixture pulled), with one or two fields corrupted (cleared, or
  set to any value of their type). These get past the first checks into the managers.

Values lean towards the realistic but hostile: ids of objects that exist, prefixes of them,
64-hex ids of nothing; names from a small set, so that duplicates happen; absurd numbers
(negative, the type's limits).

Host paths: fields that name a file, directory or cgroup of the host (:data:`HOST_PATH_FIELDS`)
only get values under the world's scratch directory, relative ones (resolved below the
daemon's working directory, which the fixture makes a deep scratch directory, so ``../..``
stays inside it), or ones that the daemon must refuse (relative cgroups, ``..``). Nothing
outside the test's temporary directory is ever named, so nothing outside it can be written.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from moorage.cri.v1 import api_pb2 as pb

MIB = 1024 * 1024
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
#: Nested messages below this depth are left empty (the CRI messages nest about 5 deep).
MAX_DEPTH = 5

HOSTILE_STRINGS = [
    "", " ", "a", "-", "--help", ".", "..", "../../etc", "../" * 8 + "x", "a\x00b", "\x00",
    "\n", "a\nb", "\t", "\r\n", "ünïcødé", "💥💥", "\u202eevil", "\ufeffbom", "%s%n%x",
    "${PATH}", "$(true)", "'\";|&`", "*", "?", "A" * 256, "B" * 4097, "0", "-1", "9" * 30,
    "sha256:", "sha256:" + "0" * 64, "0" * 64, "f" * 64, "localhost", "kube-system",
    "default", "UPPER", "with space", "a/b", "a:b", "@", "#", "=", "a=b", "x.y.z",
]
#: Big values (1 MiB and more as UTF-8): drawn rarely, as a message must stay below 16 MiB.
HUGE_STRINGS = ["x" * MIB, "é" * (MIB // 2), "a/" * (MIB // 2)]
#: Names drawn for metadata, so that duplicates (same name, same attempt) happen.
NAMES = ["fuzz", "fuzz-dup", "a", "pod", "ctr", "x" * 63, "Caps", "under_score"]
SIGNALS = ["SIGTERM", "SIGKILL", "SIGUSR1", "9", "0", "-1", "NOPE", "SIGRTMAX", ""]
SYSCTLS = [
    "net.ipv4.ping_group_range", "net.core.somaxconn", "net.ipv4.ip_unprivileged_port_start",
    "kernel.shmmax", "kernel.msgmax", "kernel.sem", "fs.mqueue.msg_max",
    "vm.swappiness", "kernel.hostname", "net/ipv4/ip_forward", "net..ipv4", "net.no_such_key",
    "net.ipv4.conf.all.forwarding", "kernel.shm_rmid_forced", "", ".", "net.",
]
ANNOTATION_KEYS = [
    "kubernetes.io/ingress-bandwidth", "kubernetes.io/egress-bandwidth",
    "io.kubernetes.cri-o.ShmSize", "io.kubernetes.cri.shm-size",
    "seccomp.security.alpha.kubernetes.io/pod",
    "io.kubernetes.pod.name", "",
]
QUANTITIES = ["1M", "10Mi", "0", "-1", "1e400", "NaN", "1.5", "abc", "9" * 40, "1Ei", ""]
CAPABILITIES = ["CAP_SYS_ADMIN", "NET_RAW", "ALL", "all", "CAP_NOPE", "", "sys_time"]

#: Fields whose value names a path or cgroup of the host (see the module doc).
HOST_PATH_FIELDS = frozenset({
    "log_directory", "log_path", "host_path", "location", "cgroup_parent", "localhost_ref",
    "seccomp_profile_path", "apparmor_profile",
})
#: Fields that hold the id of an object (or a prefix of one).
ID_FIELDS = frozenset({"pod_sandbox_id", "container_id", "target_id", "id"})


@dataclass(repr=False)
class World:
    """What exists on the daemon while one RPC is fuzzed, and where host paths may point."""

    scratch: Path
    image: str
    image_id: str
    pod_id: str = ""
    running_id: str = ""
    created_id: str = ""
    pod_config: pb.PodSandboxConfig = field(default_factory=pb.PodSandboxConfig)
    #: The cgroup parent the valid pods use (made by the test, removed by the test).
    cgroup_parent: str = "/moorage-fuzz"
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def __repr__(self) -> str:
        return f"World(pod={self.pod_id[:12]}, running={self.running_id[:12]})"

    def ids(self) -> list[str]:
        return [i for i in (self.pod_id, self.running_id, self.created_id) if i]

    def unique(self) -> int:
        return next(self.counter)


class Req:
    """A drawn request; its repr is short, as hypothesis prints it for a failing example."""

    def __init__(self, msg: Message, how: str) -> None:
        self.msg = msg
        self.how = how

    def __repr__(self) -> str:
        return f"Req({self.how}: {describe(self.msg)})"


def describe(msg: Message, limit: int = 2000) -> str:
    """A message as text with long strings cut, for failure reports."""
    text = str(msg)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} chars)"
    return f"{type(msg).__name__}{{{text}}}"


# -- scalar values ----------------------------------------------------------------------------


def integers(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    lo, hi = bounds
    edges = {0, 1, -1, 2, 10, 80, 1024, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             2**53, 2**63 - 1, -(2**31), -(2**63), lo, hi, lo + 1, hi - 1}
    return st.one_of(st.sampled_from(sorted(e for e in edges if lo <= e <= hi)),
                     st.integers(lo, hi), st.integers(-1000, 100_000).filter(
                         lambda v: lo <= v <= hi))


@st.composite
def text(draw: st.DrawFn) -> str:
    roll = draw(st.integers(0, 39))
    if roll == 0:
        return draw(st.sampled_from(HUGE_STRINGS))
    if roll < 18:
        return draw(st.sampled_from(HOSTILE_STRINGS))
    return draw(st.text(max_size=64))


@st.composite
def binary(draw: st.DrawFn) -> bytes:
    roll = draw(st.integers(0, 19))
    if roll == 0:
        return b"\xff" * MIB
    if roll < 6:
        return draw(st.sampled_from([b"", b"\x00", b"\xff\xfe", b"=", "é".encode(), b"\n"]))
    return draw(st.binary(max_size=64))


def ids(world: World) -> st.SearchStrategy[str]:
    existing = world.ids()
    prefixes = [i[:n] for i in existing for n in (1, 6, 12, 63)]
    return st.one_of(
        st.sampled_from(existing or [""]),
        st.sampled_from(prefixes or [""]),
        st.text("0123456789abcdef", min_size=64, max_size=64),
        st.sampled_from([i.upper() for i in existing] or ["F" * 64]),
        text(),
    )


@st.composite
def host_path(draw: st.DrawFn, world: World) -> str:
    """A host path or cgroup that stays inside the world's scratch directory."""
    roll = draw(st.integers(0, 9))
    if roll == 0:
        return ""
    if roll == 1:  # relative: below the daemon's (deep, scratch) working directory
        return draw(st.sampled_from(["rel", "../rel", "../../x", "./a/../b", ".", "..",
                                     "a\x00b", "c" * 5000]))
    if roll == 2:  # the scratch dir itself, through a symlink, or a missing file in it
        return str(world.scratch / draw(st.sampled_from(
            ["", "data", "link", "missing/deeper", "file", "a/../data", "d" * 300])))
    if roll == 3:  # a cgroup-looking path (for cgroup_parent); refused or made by us
        return draw(st.sampled_from([world.cgroup_parent, world.cgroup_parent + "/sub",
                                     world.cgroup_parent + "/../x", "/", "-.slice",
                                     "fuzz.slice", "//", world.cgroup_parent + "\n"]))
    name = draw(text()).replace("/", "_")
    if name in (".", ".."):
        name += "_"
    return str(world.scratch / name)


def enum_values(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    assert fd.enum_type is not None, fd.full_name
    known = [v.number for v in fd.enum_type.values]
    unknown = [max(known) + 1, -1, 99, INT32[0], INT32[1]]
    return st.one_of(st.sampled_from(known), st.sampled_from(unknown), integers(INT32))


_INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: INT32, FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32, FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64, FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT32, FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64, FieldDescriptor.TYPE_FIXED64: UINT64,
}


def _string_for(fd: FieldDescriptor, world: World) -> st.SearchStrategy[str]:
    """Strings with a bias from the field's name (ids, names, paths, images, ...)."""
    name = fd.name
    if name in HOST_PATH_FIELDS:
        return host_path(world)
    if name in ID_FIELDS:
        return ids(world)
    owner = fd.containing_type
    if name in ("name", "namespace", "uid") and owner is not None and owner.name.endswith(
            "Metadata"):
        return st.one_of(st.sampled_from(NAMES), text())
    if name == "image" or name == "user_specified_image":
        return st.one_of(st.sampled_from([world.image, world.image_id, world.image_id[:12],
                                          "busybox", "fuzz/missing:1", "UPPER/case",
                                          "a@sha256:" + "0" * 64, "a@sha256:zz",
                                          "localhost:0/x", "[::1]:5/x", world.image + "x"]),
                         text())
    if name in ("container_path", "working_dir"):
        return st.one_of(st.sampled_from(["/data", "/", "/proc", "/proc/sys", "/sys", "/dev",
                                          "/etc/hosts", "relative", "/../../etc",
                                          "/tmp/../..", "/dev/null"]), text())
    if name in ("add_capabilities", "drop_capabilities", "add_ambient_capabilities"):
        return st.one_of(st.sampled_from(CAPABILITIES), text())
    return text()


def scalar(fd: FieldDescriptor, world: World) -> st.SearchStrategy[Any]:
    t = fd.type
    if t in _INT_BOUNDS:
        return integers(_INT_BOUNDS[t])
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_ENUM:
        return enum_values(fd)
    if t == FieldDescriptor.TYPE_STRING:
        return _string_for(fd, world)
    if t == FieldDescriptor.TYPE_BYTES:
        return binary()
    raise AssertionError(f"{fd.full_name}: unexpected field type {t}")


# -- messages ---------------------------------------------------------------------------------


def msg_type(fd: FieldDescriptor) -> Descriptor:
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


def is_map(fd: FieldDescriptor) -> bool:
    return (fd.type == FieldDescriptor.TYPE_MESSAGE
            and bool(msg_type(fd).GetOptions().map_entry))


def _map_keys(fd: FieldDescriptor, world: World) -> st.SearchStrategy[Any]:
    key = msg_type(fd).fields_by_name["key"]
    if key.type != FieldDescriptor.TYPE_STRING:
        return scalar(key, world)
    if fd.name == "sysctls":
        return st.one_of(st.sampled_from(SYSCTLS), text())
    if fd.name == "annotations":
        return st.one_of(st.sampled_from(ANNOTATION_KEYS), text())
    return st.one_of(st.sampled_from(["app", "a", "io.kubernetes.container.name"]), text())


def _map_values(fd: FieldDescriptor, world: World, depth: int) -> st.SearchStrategy[Any]:
    value = msg_type(fd).fields_by_name["value"]
    if value.type == FieldDescriptor.TYPE_MESSAGE:
        return message(msg_type(value), world, depth + 1)
    if value.type == FieldDescriptor.TYPE_STRING and fd.name in ("annotations", "unified"):
        return st.one_of(st.sampled_from(QUANTITIES), text())
    return scalar(value, world)


def value(fd: FieldDescriptor, world: World, depth: int) -> st.SearchStrategy[Any]:
    """A value for ``fd`` as a whole: a list for repeated fields, a dict for maps."""
    if is_map(fd):
        return st.dictionaries(_map_keys(fd, world), _map_values(fd, world, depth), max_size=4)
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        one = message(msg_type(fd), world, depth + 1)
    elif fd.name in ("cmd", "command", "args"):
        one = st.one_of(st.sampled_from(["true", "sh", "-c", "echo", "exit 3", "sleep", "1"]),
                        text())
    elif fd.type == FieldDescriptor.TYPE_STRING and "signal" in fd.name:
        one = st.one_of(st.sampled_from(SIGNALS), text())
    else:
        one = scalar(fd, world)
    if fd.is_repeated:
        return st.one_of(st.lists(one, max_size=4), st.lists(one, min_size=20, max_size=60))
    return one


def assign(msg: Message, fd: FieldDescriptor, v: Any) -> None:
    """Set field ``fd`` of ``msg`` to ``v`` (replacing what was there)."""
    if is_map(fd):
        target = getattr(msg, fd.name)
        target.clear()
        if msg_type(fd).fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
            for k, item in v.items():
                target[k].CopyFrom(item)
        else:
            target.update(v)
    elif fd.is_repeated:
        msg.ClearField(fd.name)
        getattr(msg, fd.name).extend(v)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(v)
    else:
        setattr(msg, fd.name, v)


def message_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


def message(desc: Descriptor, world: World, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any ``desc`` message: each field missing or set to any value of its type."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = message_class(desc)()
        if depth >= MAX_DEPTH:
            return msg
        chosen_oneofs = {o.name: draw(st.sampled_from([None, *o.fields])) for o in desc.oneofs}
        for fd in desc.fields:
            oneof = fd.containing_oneof
            if oneof is not None and chosen_oneofs[oneof.name] is not fd:
                continue
            # Fields are present about half the time; deeper ones less often.
            if draw(st.integers(0, depth + 1)) != 0:
                continue
            assign(msg, fd, draw(value(fd, world, depth)))
        return msg

    return build()


# -- valid requests, corrupted ----------------------------------------------------------------


def pod_config(world: World, n: int) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=f"fz{n}", namespace="fuzz", uid=f"uid-fz{n}"),
        hostname=f"fz{n}", log_directory=str(world.scratch / "logs" / f"fz{n}"),
        labels={"fuzz": "yes"}, annotations={"kubernetes.io/ingress-bandwidth": "10M"},
        dns_config=pb.DNSConfig(servers=["10.99.0.1"], searches=["fuzz.local"],
                                options=["ndots:2"]),
        port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=0)],
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=f"{world.cgroup_parent}/fz{n}",
            sysctls={"net.ipv4.ping_group_range": "0 2147483647"},
            resources=pb.LinuxContainerResources(cpu_shares=512, memory_limit_in_bytes=256 * MIB),
        ),
    )


def container_config(world: World, n: int, command: list[str]) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=f"c{n}"), image=pb.ImageSpec(image=world.image),
        command=command, args=[], working_dir="/", log_path=f"c{n}/0.log",
        envs=[pb.KeyValue(key="A", value=b"1")], labels={"fuzz": "yes"},
        annotations={"note": "x"},
        mounts=[pb.Mount(container_path="/data", host_path=str(world.scratch / "data"),
                         readonly=True)],
        linux=pb.LinuxContainerConfig(
            resources=pb.LinuxContainerResources(cpu_shares=256, memory_limit_in_bytes=64 * MIB),
            security_context=pb.LinuxContainerSecurityContext(
                capabilities=pb.Capability(drop_capabilities=["NET_RAW"]),
                run_as_user=pb.Int64Value(value=0),
                seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)),
        ),
        stop_signal=pb.SIGTERM,
    )


def _resources() -> pb.LinuxContainerResources:
    return pb.LinuxContainerResources(cpu_shares=300, cpu_period=100_000, cpu_quota=50_000,
                                      memory_limit_in_bytes=128 * MIB)


#: Valid requests by message name, for the RPCs whose fields are more than ids.
VALID: dict[str, Callable[[World, int], Message]] = {
    "RunPodSandboxRequest": lambda w, n: pb.RunPodSandboxRequest(config=pod_config(w, n)),
    "CreateContainerRequest": lambda w, n: pb.CreateContainerRequest(
        pod_sandbox_id=w.pod_id, config=container_config(w, n, ["sleep", "100000"]),
        sandbox_config=w.pod_config),
    "PullImageRequest": lambda w, n: pb.PullImageRequest(
        image=pb.ImageSpec(image=w.image), sandbox_config=w.pod_config),
    "ExecSyncRequest": lambda w, n: pb.ExecSyncRequest(
        container_id=w.running_id, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"],
        timeout=10),
    "ExecRequest": lambda w, n: pb.ExecRequest(container_id=w.running_id, cmd=["sh"],
                                              stdin=True, stdout=True),
    "AttachRequest": lambda w, n: pb.AttachRequest(container_id=w.running_id, stdout=True),
    "PortForwardRequest": lambda w, n: pb.PortForwardRequest(pod_sandbox_id=w.pod_id,
                                                             port=[80]),
    "StartContainerRequest": lambda w, n: pb.StartContainerRequest(container_id=w.created_id),
    "StopContainerRequest": lambda w, n: pb.StopContainerRequest(container_id=w.running_id,
                                                                 timeout=2),
    "CheckpointContainerRequest": lambda w, n: pb.CheckpointContainerRequest(
        container_id=w.running_id, location=str(w.scratch / f"ckpt{n}.tar"), timeout=60),
    "UpdateContainerResourcesRequest": lambda w, n: pb.UpdateContainerResourcesRequest(
        container_id=w.running_id, linux=_resources()),
    "UpdatePodSandboxResourcesRequest": lambda w, n: pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=w.pod_id, overhead=_resources(), resources=_resources()),
    "UpdateRuntimeConfigRequest": lambda w, n: pb.UpdateRuntimeConfigRequest(
        runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(
            pod_cidr="10.99.0.0/16"))),
}


def valid(desc: Descriptor, world: World, n: int) -> Message:
    """A valid request: from :data:`VALID`, else its id fields filled with live objects."""
    builder = VALID.get(desc.name)
    if builder is not None:
        return builder(world, n)
    msg = message_class(desc)()
    for fd in desc.fields:
        if fd.name == "pod_sandbox_id":
            msg.pod_sandbox_id = world.pod_id  # type: ignore[attr-defined]
        elif fd.name == "container_id":
            msg.container_id = world.running_id  # type: ignore[attr-defined]
        elif fd.name == "image" and fd.type == FieldDescriptor.TYPE_MESSAGE:
            msg.image.image = world.image  # type: ignore[attr-defined]
        elif fd.name == "verbose":
            msg.verbose = True  # type: ignore[attr-defined]
    return msg


def field_paths(desc: Descriptor, depth: int = 3) -> list[tuple[FieldDescriptor, ...]]:
    """Every field reachable from ``desc`` through at most ``depth`` nested messages
    (repeated ones included: a path through one picks an element)."""
    out: list[tuple[FieldDescriptor, ...]] = []
    for fd in desc.fields:
        out.append((fd,))
        # sandbox_config only informs CreateContainer and PullImage: replaced or cleared as a
        # whole, not searched field by field.
        if (depth > 1 and fd.type == FieldDescriptor.TYPE_MESSAGE and not is_map(fd)
                and fd.name != "sandbox_config"):
            out += [(fd, *rest) for rest in field_paths(msg_type(fd), depth - 1)]
    return out


@st.composite
def _mutate(draw: st.DrawFn, msg: Message, world: World) -> str:
    """Corrupt one field of ``msg`` in place; returns what was done."""
    paths = field_paths(msg.DESCRIPTOR)  # type: ignore[arg-type]
    if not paths:
        return "no field to corrupt"
    path = draw(st.sampled_from(paths))
    target = msg
    for fd in path[:-1]:
        if fd.is_repeated:
            items = getattr(target, fd.name)
            if not items:
                items.add()
            target = items[draw(st.integers(0, len(items) - 1))]
        else:
            target = getattr(target, fd.name)
    last = path[-1]
    where = ".".join(fd.name for fd in path)
    if draw(st.integers(0, 3)) == 0:
        target.ClearField(last.name)
        return f"cleared {where}"
    assign(target, last, draw(value(last, world, len(path))))
    return f"set {where}"


@st.composite
def mutated(draw: st.DrawFn, desc: Descriptor, world: World) -> Req:
    msg = valid(desc, world, world.unique())
    done = [draw(_mutate(msg, world)) for _ in range(draw(st.integers(0, 2)))]
    return Req(msg, "valid " + (", ".join(done) or "unchanged"))


@st.composite
def generated(draw: st.DrawFn, desc: Descriptor, world: World) -> Req:
    return Req(draw(message(desc, world)), "generated")


def request(desc: Descriptor, world: World) -> st.SearchStrategy[Req]:
    """The requests an RPC taking ``desc`` is fuzzed with: generated and mutated valid ones
    (three in four, where a valid request is more than ids, as those reach deeper)."""
    if desc.name in VALID:
        return st.integers(0, 3).flatmap(
            lambda roll: generated(desc, world) if roll == 0 else mutated(desc, world))
    return st.one_of(generated(desc, world), mutated(desc, world))
