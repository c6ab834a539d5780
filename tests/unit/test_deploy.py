"""The deploy files say what the code does: checked without Docker or systemd."""

from __future__ import annotations

import configparser
import json
import tomllib
from pathlib import Path

import yaml

from moorage import config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def test_documented_config_is_the_defaults(tmp_path: Path) -> None:
    defaults = config.load(Path("/dev/null"), tmp_path)
    text = (DEPLOY / "config/moorage.toml").read_text()
    assert text == config.render(defaults), (
        "regenerate: moorage --config /dev/null --config-dir <empty dir> config")
    assert config.Config.model_validate(tomllib.loads(text)) == defaults


def test_drop_in_and_kind_config_load(tmp_path: Path) -> None:
    cfg = config.load(Path("/dev/null"), DEPLOY / "config/moorage.d")
    assert "crun" in cfg.runtimes and "runc" in cfg.runtimes
    kind = config.load(DEPLOY / "kind/moorage.toml", tmp_path)
    assert kind.runtime.cgroup_manager == "systemd"


def test_kind_cluster_points_kubelet_at_moorage() -> None:
    cluster = yaml.safe_load((DEPLOY / "kind/cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster"
    patches = [yaml.safe_load(p) for p in cluster["nodes"][0]["kubeadmConfigPatches"]]
    by_kind = {p["kind"]: p for p in patches}
    socket = f"unix://{config.ApiConfig().listen}"
    assert by_kind["InitConfiguration"]["nodeRegistration"]["criSocket"] == socket
    kubelet = by_kind["KubeletConfiguration"]
    assert kubelet["containerRuntimeEndpoint"] == socket
    assert kubelet["cgroupDriver"] == config.load(
        DEPLOY / "kind/moorage.toml", DEPLOY / "config/moorage.d").runtime.cgroup_manager


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "systemd/moorage.service").read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["KillMode"] == "process"  # containers and monitors survive restarts
    assert service["Restart"] == "on-failure"
    assert "ExecReload" in service and "WatchdogSec" in service
    # Directives that make a private mount namespace, or that every container would
    # inherit (seccomp filters, capability bounds, no_new_privs), break a runtime.
    breaking = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ReadOnlyPaths",
                "InaccessiblePaths", "SystemCallFilter", "SystemCallArchitectures",
                "RestrictRealtime", "LockPersonality", "ProtectClock", "RestrictNamespaces",
                "MemoryDenyWriteExecute", "NoNewPrivileges", "CapabilityBoundingSet",
                "RestrictSUIDSGID"}
    assert not breaking & set(service), breaking & set(service)


def test_cni_and_crictl_configs() -> None:
    for path in (DEPLOY / "config/cni").iterdir():
        doc = json.loads(path.read_text())
        assert doc["cniVersion"] and doc["name"]
    crictl = yaml.safe_load((DEPLOY / "config/crictl.yaml").read_text())
    assert crictl["runtime-endpoint"] == f"unix://{config.ApiConfig().listen}"


def test_configuration_reference_is_current() -> None:
    text = (ROOT / "docs/configuration.md").read_text()
    start = text.index("-->\n", text.index("<!-- generated")) + 4
    end = text.index("<!-- end of generated table -->")
    assert text[start:end] == config.reference_table(), (
        "regenerate the table with moorage.config.reference_table()")
