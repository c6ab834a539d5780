"""Every CRI RPC fuzzed against a real daemon (issue #7, hostile input).

One test per RPC of RuntimeService and ImageService, taken from the service descriptors, so a
new RPC is fuzzed without a change here. Each sends generated and mutated-valid requests
(``tests/fuzz/strategies.py``) with a client deadline, and requires after every request: a
status code in the allowed set (never UNKNOWN or INTERNAL, which mean an unhandled exception;
never a missed deadline), the daemon alive, and ``Version`` answering. After each RPC's run
everything is removed through the CRI and nothing may be left (``FuzzDaemon.leaks``).

Budget: ``MOORAGE_FUZZ_EXAMPLES`` sets the examples per RPC (default: a per-RPC number that
keeps the suite within about three minutes on two cores). Runs are derandomized (the same
requests every time) unless ``MOORAGE_FUZZ_RANDOM=1``; a failing example is shrunk to a
minimal one with ``MOORAGE_FUZZ_SHRINK=1``; ``MOORAGE_FUZZ_DEBUG=1`` (with ``-s``) prints
every request's outcome, and the last test prints the status codes seen per RPC.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, note, settings

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from tests.fuzz import strategies
from tests.fuzz.conftest import FuzzDaemon
from tests.fuzz.strategies import Req, World

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

#: Client deadline of a fuzzed call; a call that needs it is a hang.
DEADLINE = 30.0
#: GetContainerEvents never ends: it is read this long, and then its deadline ends it.
EVENTS_WINDOW = 0.5
#: Examples per RPC by default; RPCs that build pods or run CRIU get fewer.
DEFAULT_EXAMPLES = 25
EXAMPLES = {
    "RunPodSandbox": 40, "CreateContainer": 40, "PullImage": 25, "CheckpointContainer": 6,
    "StopPodSandbox": 15, "RemovePodSandbox": 15, "GetContainerEvents": 5, "Version": 10,
    "ExecSync": 20, "StartContainer": 20, "StopContainer": 20,
}
ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
}
#: Codes some RPCs may also answer, from the domain (with a message of ours).
EXTRA = {
    "PullImage": {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.DATA_LOSS,
                  grpc.StatusCode.DEADLINE_EXCEEDED},
    "ExecSync": {grpc.StatusCode.DEADLINE_EXCEEDED},
    "CheckpointContainer": {grpc.StatusCode.DEADLINE_EXCEEDED},
    # Documented as refused (seccomp and AppArmor profiles, user namespaces).
    "CreateContainer": {grpc.StatusCode.UNIMPLEMENTED},
    "RunPodSandbox": {grpc.StatusCode.UNIMPLEMENTED},
}
#: What grpc says when the client's own deadline passed (a domain timeout says more).
CLIENT_DEADLINE = "Deadline Exceeded"

#: Status codes seen per RPC (printed at the end with ``-s``; checked for depth).
SEEN: dict[str, collections.Counter[str]] = {}
METHODS = [m for svc in pb.DESCRIPTOR.services_by_name.values() for m in svc.methods]


def examples(method: str) -> int:
    env = os.environ.get("MOORAGE_FUZZ_EXAMPLES")
    return int(env) if env else EXAMPLES.get(method, DEFAULT_EXAMPLES)


def fuzz_settings(method: str) -> settings:
    randomized = os.environ.get("MOORAGE_FUZZ_RANDOM") == "1"
    return settings(
        max_examples=examples(method), deadline=None, derandomize=not randomized,
        database=None, print_blob=randomized, report_multiple_bugs=False,
        # Shrinking a failure against a live daemon can take minutes: on request only.
        phases=[Phase.explicit, Phase.generate,
                *([Phase.shrink] if os.environ.get("MOORAGE_FUZZ_SHRINK") == "1" else [])],
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: int


def _stub(d: FuzzDaemon, method: MethodDescriptor) -> object:
    assert d.d.channel is not None
    if method.containing_service.name == "ImageService":
        return pb_grpc.ImageServiceStub(d.d.channel)
    return pb_grpc.RuntimeServiceStub(d.d.channel)


def call(f: FuzzDaemon, method: MethodDescriptor, msg: Message) -> Outcome:
    fn = getattr(_stub(f, method), method.name)
    endless = method.name == "GetContainerEvents"
    try:
        if not method.server_streaming:
            fn(msg, timeout=DEADLINE)
            return Outcome(grpc.StatusCode.OK, "", 1)
        stream: Iterator[Message] = fn(msg, timeout=EVENTS_WINDOW if endless else DEADLINE)
        n = 0
        for _ in stream:
            n += 1
        return Outcome(grpc.StatusCode.OK, "", n)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", 0)


def check(f: FuzzDaemon, method: MethodDescriptor, req: Req, out: Outcome) -> None:
    name = method.name
    SEEN.setdefault(name, collections.Counter())[out.code.name] += 1
    if os.environ.get("MOORAGE_FUZZ_DEBUG"):
        print(f"FUZZ {name} {req.how[:60]} -> {out.code.name}: {out.details[:150]}")
    note(f"{name} -> {out.code.name}: {out.details[:500]}")
    assert f.alive(), f"daemon died on {req!r}:\n{f.d.log_tail()}"
    code = out.code
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and name == "GetContainerEvents":
        pass  # our own short read window
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and out.details == CLIENT_DEADLINE:
        raise AssertionError(f"{name} hung past the {DEADLINE}s deadline on {req!r}")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and out.details.startswith(
            "CLIENT: Sent message larger than max"):
        pass  # the client refused to send more than 16 MiB: never reached the daemon
    else:
        # A status message too big for the client's metadata limit arrives as this.
        assert "metadata size exceeds" not in out.details, (
            f"{name}: the status message was too long for the client: {out.details[:300]}")
        assert code in ALLOWED | EXTRA.get(name, set()), (
            f"{name} answered {code.name} ({out.details[:1000]}) to {req!r}")
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert out.details.strip(), f"{name} answered {code.name} without a message"
    t0 = time.monotonic()
    version = f.d.runtime.Version(pb.VersionRequest(), timeout=DEADLINE)
    assert version.runtime_name == "moorage", time.monotonic() - t0


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_rpc_fuzz(fuzz: FuzzDaemon, method: MethodDescriptor) -> None:
    world: World = fuzz.world()
    try:
        @fuzz_settings(method.name)
        @given(strategies.request(method.input_type, world))
        def run(req: Req) -> None:
            check(fuzz, method, req, call(fuzz, method, req.msg))

        run()
    finally:
        fuzz.cleanup()
    assert fuzz.settled_leaks() == []


def test_no_leaks_after_all_rpcs(fuzz: FuzzDaemon) -> None:
    """The final check, after every RPC's run (and the daemon still serving)."""
    fuzz.cleanup()
    for name, codes in sorted(SEEN.items()):
        print(f"{name}: {dict(codes)}")
    assert fuzz.alive()
    assert fuzz.settled_leaks() == []
