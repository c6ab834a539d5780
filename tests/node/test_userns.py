"""Pods in their own user namespace on the node (kubelet's hostUsers: false), where its kernel
and runc allow them: the daemon says so in Status, and then the pod's root is an
unprivileged host uid."""

from __future__ import annotations

import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_userns import HOST_ID, pod_userns, proc_ids
from tests.node.conftest import Node, cgroup_of, read, run


def test_a_pod_in_its_own_user_namespace(node: Node) -> None:
    status = node.rt.Status(pb.StatusRequest())
    [runc] = [h for h in status.runtime_handlers if h.name == "runc"]
    if not runc.features.user_namespaces:
        reason = run("journalctl", "-u", "moorage", "-g", "userns_unsupported", "-o", "cat",
                     check=False)
        pytest.skip(f"this node's moorage cannot run user-namespaced pods: {reason[-300:]}")
    userns = pod_userns()
    pod, _ = node.kube_pod("userns", pid=pb.POD, userns_options=userns)
    cfg = node.config("c", ["sleep", "100000"])
    cfg.linux.security_context.namespace_options.CopyFrom(
        pb.NamespaceOption(pid=pb.POD, userns_options=userns))
    cid = node.create(pod, cfg)
    node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    pid = node.pid(cid)
    assert proc_ids(pid) == (HOST_ID, HOST_ID)
    out = node.exec(cid, ["sh", "-c", "id -u; cat /proc/self/uid_map; touch /root/w && echo ok"])
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.decode().split("\n")
    assert lines[0] == "0" and lines[1].split() == ["0", str(HOST_ID), "65536"]
    assert lines[2] == "ok"
    # Its cgroup is the container's, as for any other pod.
    assert read(cgroup_of(pid), "cgroup.procs")
