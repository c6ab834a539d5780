"""CDI spec files, requests, the registry of spec dirs and the edits to an OCI spec (no
root: the device nodes looked up are the host's /dev/null and /dev/zero)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from moorage.container import cdi
from moorage.errors import InvalidArgument

NULL = os.stat("/dev/null")


def spec_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "cdiVersion": "0.5.0",
        "kind": "example.com/gpu",
        "containerEdits": {"env": ["SHARED=1"]},
        "devices": [
            {"name": "gpu0", "containerEdits": {
                "deviceNodes": [{"path": "/dev/gpu0", "hostPath": "/dev/null"}],
                "env": ["GPU=0"]}},
            {"name": "gpu1", "containerEdits": {"env": ["GPU=1"]}},
        ],
    }
    doc.update(over)
    return doc


def write(directory: Path, name: str, doc: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    text = json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc)
    path.write_text(text)
    return path


# -- spec files ---------------------------------------------------------------------------------


def test_json_and_yaml_parse_alike(tmp_path: Path) -> None:
    doc = spec_doc()
    a = cdi.parse_spec(json.dumps(doc).encode(), "a.json")
    b = cdi.parse_spec(yaml.safe_dump(doc).encode(), "b.yaml")
    assert (a.kind, a.version, a.edits, dict(a.devices)) == (
        b.kind, b.version, b.edits, dict(b.devices))
    assert a.devices["gpu0"].device_nodes == (cdi.DeviceNode("/dev/gpu0", "/dev/null"),)


def test_field_names_match_case_insensitively_as_go_decodes_them() -> None:
    doc = spec_doc(cdiVersion="0.7.0")
    doc["devices"][1]["containerEdits"] = {"additionalGIDs": [5, 0], "ENV": ["X=1"]}
    spec = cdi.parse_spec(json.dumps(doc).encode(), "x.json")
    assert spec.devices["gpu1"] == cdi.Edits(env=("X=1",), additional_gids=(5, 0))


@pytest.mark.parametrize(("change", "reason"), [
    ({"cdiVersion": "0.2.0"}, "cdiVersion '0.2.0' is not supported"),
    ({"cdiVersion": "1.1.0"}, "cdiVersion '1.1.0' is not supported"),
    # hostPath of a device node came with 0.5.0
    ({"cdiVersion": "0.4.0"}, "cdiVersion 0.4.0 is older than the features used need (0.5.0)"),
    ({"kind": "gpu"}, "kind 'gpu' is not <vendor>/<class>"),
    ({"kind": "example.com/a/b"}, "kind 'example.com/a/b' is not"),
    ({"devices": []}, "devices: at least one device is needed"),
    ({"netDevices": []}, "spec: unknown field 'netDevices'"),
    ({"devices": [{"name": "a", "containerEdits": {}}]},
     "devices[0].containerEdits: a device needs edits"),
    ({"devices": [{"name": "a", "containerEdits": {"env": ["A=1"]}},
                  {"name": "a", "containerEdits": {"env": ["A=2"]}}]},
     "devices[1].name: device 'a' is defined twice"),
    ({"devices": [{"name": "-a", "containerEdits": {"env": ["A"]}}]},
     "devices[0].name: '-a' is not a device name"),
    ({"devices": [{"name": "a", "containerEdits": {"env": ["=1"]}}]},
     "devices[0].containerEdits.env[0]: '=1' is not KEY=VALUE"),
    ({"devices": [{"name": "a", "containerEdits": {"deviceNodes": [{"path": "/d",
                                                                    "type": "x"}]}}]},
     "deviceNodes[0].type: 'x' is not b, c, u or p"),
    ({"devices": [{"name": "a", "containerEdits": {"deviceNodes": [{"path": "/d",
                                                                    "major": -1}]}}]},
     "deviceNodes[0].major: expected an integer from 0"),
    ({"devices": [{"name": "a", "containerEdits": {"deviceNodes": [
        {"path": "/d", "permissions": "rwx"}]}}]}, "permissions: 'rwx' is not made of r, w, m"),
    ({"devices": [{"name": "a", "containerEdits": {"hooks": [
        {"hookName": "preStart", "path": "/bin/true"}]}}]}, "hookName: 'preStart' is not one"),
    ({"devices": [{"name": "a", "containerEdits": {"hooks": [
        {"hookName": "poststop", "path": "/bin/true", "timeout": 0}]}}]},
     "hooks[0].timeout: expected an integer from 1"),
    ({"devices": [{"name": "a", "containerEdits": {"mounts": [{"hostPath": "/x"}]}}]},
     "mounts[0].containerPath: empty"),
    ({"devices": [{"name": "a", "containerEdits": {"mounts": [
        {"hostPath": "/x", "containerPath": "/y", "type": "bind"}]}}]}, None),
])
def test_invalid_specs_say_why(change: dict[str, Any], reason: str | None) -> None:
    doc = spec_doc(**change)
    if reason is None:  # the control: a 0.4.0 feature in a 0.5.0 file
        cdi.parse_spec(json.dumps(doc).encode(), "f.json")
        return
    with pytest.raises(InvalidArgument) as e:
        cdi.parse_spec(json.dumps(doc).encode(), "f.json")
    assert e.value.message.startswith("CDI spec f.json: ")
    assert reason in e.value.message


def test_features_need_their_versions() -> None:
    doc = spec_doc(cdiVersion="0.6.0")
    doc["devices"][1]["containerEdits"]["intelRdt"] = {"closID": "gold"}
    with pytest.raises(InvalidArgument, match=r"need \(0\.7\.0\)"):
        cdi.parse_spec(json.dumps(doc).encode(), "f.json")
    doc = spec_doc(cdiVersion="0.5.0", annotations={"a": "b"})
    with pytest.raises(InvalidArgument, match=r"need \(0\.6\.0\)"):
        cdi.parse_spec(json.dumps(doc).encode(), "f.json")
    doc = spec_doc(cdiVersion="0.5.0", kind="example.com/gpu.v2")
    with pytest.raises(InvalidArgument, match=r"need \(0\.6\.0\)"):
        cdi.parse_spec(json.dumps(doc).encode(), "f.json")
    assert cdi.parse_spec(json.dumps(spec_doc(cdiVersion="1.0.0")).encode(), "f.json")


def test_bad_syntax_is_named() -> None:
    with pytest.raises(InvalidArgument, match="CDI spec f.yaml: not valid YAML"):
        cdi.parse_spec(b"devices: [", "f.yaml")
    with pytest.raises(InvalidArgument, match="CDI spec f.json: not valid JSON"):
        cdi.parse_spec(b"{", "f.json")
    with pytest.raises(InvalidArgument, match="spec: expected an object"):
        cdi.parse_spec(b"- a\n", "f.yaml")


# -- requests -----------------------------------------------------------------------------------


def test_requests_from_the_field_then_the_annotations_once_each() -> None:
    got = cdi.requested(
        ["example.com/gpu=gpu1", "example.com/gpu=gpu0"],
        {"cdi.k8s.io/z_plugin": "example.com/gpu=gpu0,example.com/nic=eth1",
         "cdi.k8s.io/a_plugin": "example.com/gpu=gpu2", "other": "example.com/gpu=gpu3"})
    assert got == [
        ("config.CDI_devices[0].name", "example.com/gpu=gpu1"),
        ("config.CDI_devices[1].name", "example.com/gpu=gpu0"),
        ("config.annotations['cdi.k8s.io/a_plugin']", "example.com/gpu=gpu2"),
        ("config.annotations['cdi.k8s.io/z_plugin']", "example.com/nic=eth1"),
    ]
    for bad in ("gpu0", "example.com/gpu", "example.com=gpu0", "/dev/null",
                "example.com/gpu=", "example.com/gpu=-x"):
        with pytest.raises(InvalidArgument, match=r"config\.CDI_devices\[0\]\.name: .* is not "
                                                  "a fully qualified CDI device name"):
            cdi.requested([bad], {})
    with pytest.raises(InvalidArgument, match=r"config\.annotations\['cdi\.k8s\.io/p'\]"):
        cdi.requested([], {"cdi.k8s.io/p": "example.com/gpu=a,,"})


# -- the registry -------------------------------------------------------------------------------


def test_later_dirs_win_and_conflicts_in_one_dir_are_refused(tmp_path: Path) -> None:
    static, dynamic = tmp_path / "etc", tmp_path / "run"
    write(static, "vendor.json", spec_doc())
    registry = cdi.Registry([static, dynamic])
    edits = registry.resolve([("f", "example.com/gpu=gpu1")])
    # The spec's own edits first, then the device's.
    assert edits.env == ("SHARED=1", "GPU=1")
    override = spec_doc(containerEdits={})
    override["devices"][1]["containerEdits"]["env"] = ["GPU=override"]
    write(dynamic, "vendor.yaml", override)
    assert registry.resolve([("f", "example.com/gpu=gpu1")]).env == ("GPU=override",)
    # Another file of the same dir defining the same device: neither is used.
    write(dynamic, "again.json", override)
    with pytest.raises(InvalidArgument) as e:
        registry.resolve([("config.CDI_devices[0].name", "example.com/gpu=gpu1")])
    assert e.value.message.startswith(
        "config.CDI_devices[0].name: unresolvable CDI device 'example.com/gpu=gpu1'")
    assert "is defined by both" in e.value.message
    (dynamic / "again.json").unlink()
    assert registry.resolve([("f", "example.com/gpu=gpu1")]).env == ("GPU=override",)


def test_edits_of_one_spec_come_once_and_files_are_reread(tmp_path: Path) -> None:
    d = tmp_path / "cdi"
    path = write(d, "vendor.json", spec_doc())
    registry = cdi.Registry([d])
    edits = registry.resolve([("a", "example.com/gpu=gpu0"), ("b", "example.com/gpu=gpu1")])
    assert edits.env == ("SHARED=1", "GPU=0", "GPU=1")
    doc = spec_doc()
    doc["devices"][0]["containerEdits"]["env"] = ["GPU=changed"]
    path.write_text(json.dumps(doc))
    os.utime(path, ns=(0, 1))  # a changed mtime, even within the same tick
    assert registry.resolve([("a", "example.com/gpu=gpu0")]).env == ("SHARED=1", "GPU=changed")


def test_an_invalid_file_is_skipped_and_named(tmp_path: Path) -> None:
    d = tmp_path / "cdi"
    write(d, "good.json", spec_doc())
    write(d, "bad.yaml", spec_doc(kind="example.com/nic", cdiVersion="9.9.9"))
    (d / "notes.txt").write_text("not a spec")
    (d / "sub").mkdir()
    write(d / "sub", "deeper.json", spec_doc(kind="example.com/deep"))
    registry = cdi.Registry([d, tmp_path / "missing"])
    assert registry.resolve([("a", "example.com/gpu=gpu1")]).env == ("SHARED=1", "GPU=1")
    with pytest.raises(InvalidArgument) as e:
        registry.resolve([("a", "example.com/nic=gpu0")])
    assert "cdiVersion '9.9.9' is not supported" in e.value.message
    assert str(d / "bad.yaml") in e.value.message
    with pytest.raises(InvalidArgument, match="unresolvable CDI device 'example.com/deep=gpu0'"):
        registry.resolve([("a", "example.com/deep=gpu0")])  # subdirectories are not read


# -- applying edits -----------------------------------------------------------------------------


def base_doc() -> dict[str, Any]:
    return {
        "process": {"user": {"uid": 1000, "gid": 1000, "additionalGids": [1000]},
                    "env": ["PATH=/bin", "GPU=none"]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/data/x", "type": "bind", "source": "/old"},
                   {"destination": "/data", "type": "bind", "source": "/d"}],
        "linux": {"devices": [{"path": "/dev/gpu0", "type": "c", "major": 9, "minor": 9}],
                  "resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    }


def test_apply_every_kind_of_edit() -> None:
    doc = base_doc()
    edits = cdi.Edits(
        env=("GPU=0", "NEW=1"),
        device_nodes=(
            cdi.DeviceNode("/dev/gpu0", host_path="/dev/null"),
            cdi.DeviceNode("/dev/zero-ish", type="c", major=1, minor=5, file_mode=0o640,
                           permissions="r", uid=0, gid=0),
            cdi.DeviceNode("/dev/quiet", host_path="/dev/null", permissions="none"),
        ),
        mounts=(cdi.Mount("/host/lib", "/data/x", options=("ro", "bind")),
                cdi.Mount("/host/bin", "/a", type="bind", options=("rbind",))),
        hooks=(cdi.Hook("createRuntime", "/bin/hook", args=("hook", "x"), env=("A=1",),
                        timeout=5),
               cdi.Hook("poststop", "/bin/hook")),
        additional_gids=(0, 44, 1000),
        intel_rdt={"closID": "gold"},
    )
    cdi.apply(doc, edits)
    assert doc["process"]["env"] == ["PATH=/bin", "GPU=0", "NEW=1"]
    null = (os.major(NULL.st_rdev), os.minor(NULL.st_rdev))
    assert doc["linux"]["devices"] == [
        {"path": "/dev/gpu0", "type": "c", "major": null[0], "minor": null[1], "uid": 1000,
         "gid": 1000},
        {"path": "/dev/zero-ish", "type": "c", "major": 1, "minor": 5, "fileMode": 0o640,
         "uid": 0, "gid": 0},
        {"path": "/dev/quiet", "type": "c", "major": null[0], "minor": null[1], "uid": 1000,
         "gid": 1000},
    ]
    assert doc["linux"]["resources"]["devices"][1:] == [
        {"allow": True, "type": "c", "major": null[0], "minor": null[1], "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "r"},
    ]
    assert [(m["destination"], m["source"]) for m in doc["mounts"]] == [
        ("/proc", "proc"), ("/data", "/d"), ("/a", "/host/bin"), ("/data/x", "/host/lib")]
    assert doc["mounts"][3] == {"destination": "/data/x", "source": "/host/lib",
                                "options": ["ro", "bind"]}
    assert doc["hooks"] == {
        "createRuntime": [{"path": "/bin/hook", "args": ["hook", "x"], "env": ["A=1"],
                           "timeout": 5}],
        "poststop": [{"path": "/bin/hook"}]}
    assert doc["process"]["user"]["additionalGids"] == [1000, 44]
    assert doc["linux"]["intelRdt"] == {"closID": "gold"}


def test_device_nodes_must_match_the_host(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="type 'b', but the host's '/dev/null' is 'c'"):
        cdi.apply(base_doc(), cdi.Edits(device_nodes=(
            cdi.DeviceNode("/dev/x", "/dev/null", type="b"),)))
    with pytest.raises(InvalidArgument, match="CDI device node /dev/missing: host device"):
        cdi.apply(base_doc(), cdi.Edits(device_nodes=(cdi.DeviceNode("/dev/missing"),)))
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgument, match="is not a device node"):
        cdi.apply(base_doc(), cdi.Edits(device_nodes=(
            cdi.DeviceNode("/dev/x", str(tmp_path / "file")),)))
    # Given in full, nothing is looked up on the host.
    doc = base_doc()
    cdi.apply(doc, cdi.Edits(device_nodes=(cdi.DeviceNode("/dev/y", "/nowhere", type="b",
                                                          major=8, minor=1),)))
    assert doc["linux"]["devices"][-1]["major"] == 8
