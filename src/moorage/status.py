"""``moorage status``: the running daemon's info, config and container internals (as
``crio status``), asked over its CRI socket with Status and ContainerStatus (verbose)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import grpc

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc


def _print(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def main(socket: Path, what: str, container_id: str | None) -> int:
    channel = grpc.insecure_channel(f"unix:{socket}")
    runtime = pb_grpc.RuntimeServiceStub(channel)
    try:
        if what == "containers":
            if not container_id:
                print("moorage status containers: a container id is required", file=sys.stderr)
                return 2
            resp = runtime.ContainerStatus(
                pb.ContainerStatusRequest(container_id=container_id, verbose=True), timeout=30)
            info = json.loads(resp.info.get("info", "{}"))
            spec = info.get("runtimeSpec") or {}
            _print({
                "id": resp.status.id, "state": pb.ContainerState.Name(resp.status.state),
                "pid": info.get("pid"), "monitorPid": info.get("monitorPid"),
                "bundle": info.get("bundle"), "sandboxID": info.get("sandboxID"),
                "runtimeHandler": info.get("runtimeHandler"),
                "root": (spec.get("root") or {}).get("path"),
                "mounts": spec.get("mounts", []), "logPath": resp.status.log_path,
            })
            return 0
        resp_status = runtime.Status(pb.StatusRequest(verbose=True), timeout=30)
        info = {k: json.loads(v) for k, v in resp_status.info.items()}
        if what == "config":
            _print(info.get("config", {}))
        else:
            version = runtime.Version(pb.VersionRequest(), timeout=30)
            _print({
                "version": version.runtime_version, "runtimeApiVersion":
                version.runtime_api_version, "socket": str(socket),
                "conditions": {c.type: {"status": c.status, "reason": c.reason,
                                        "message": c.message}
                               for c in resp_status.status.conditions},
                "runtimeHandlers": [h.name for h in resp_status.runtime_handlers if h.name],
                **{k: v for k, v in info.items() if k != "config"},
            })
        return 0
    except grpc.RpcError as e:
        print(f"moorage status: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
