"""CNI config dir loading: file order, .conf wrapping, versions, refusals, default network,
and the NetworkReady status that the config dir and plugin dirs give."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from moorage.network import CNIManager, NetworkNotReady
from moorage.network.config import (
    SUPPORTED_VERSIONS,
    ConfigError,
    find_plugin,
    parse_bytes,
    scan,
    snapshot,
)


def conflist(name: str, version: str = "1.0.0", *types: str, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "name": name,
        "plugins": [{"type": t} for t in (types or ("bridge",))],
        **extra,
    }


def write(conf_dir: Path, filename: str, doc: Any) -> Path:
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / filename
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def make_plugin(plugin_dir: Path, name: str) -> Path:
    plugin_dir.mkdir(parents=True, exist_ok=True)
    path = plugin_dir / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_supported_versions_are_accepted(version: str) -> None:
    net = parse_bytes(json.dumps(conflist("n", version)).encode(), "a.conflist")
    assert net.cni_version == version
    assert net.plugin_types == ("bridge",)


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "1.0", "banana"])
def test_other_versions_are_refused(version: str) -> None:
    with pytest.raises(ConfigError, match="not supported"):
        parse_bytes(json.dumps(conflist("n", version)).encode(), "a.conflist")


def test_missing_version_is_refused() -> None:
    doc = conflist("n")
    del doc["cniVersion"]
    with pytest.raises(ConfigError, match="cniVersion is missing"):
        parse_bytes(json.dumps(doc).encode(), "a.conflist")


def test_cni_versions_picks_highest_supported() -> None:
    doc = conflist("n", "0.4.0", cniVersions=["1.0.0", "0.3.1", "9.9.9"])
    assert parse_bytes(json.dumps(doc).encode(), "a.conflist").cni_version == "1.0.0"


def test_single_plugin_conf_is_wrapped() -> None:
    doc = {"cniVersion": "0.3.1", "name": "lo-net", "type": "loopback"}
    net = parse_bytes(json.dumps(doc).encode(), "99-lo.conf")
    assert net.name == "lo-net"
    assert net.cni_version == "0.3.1"
    assert net.plugin_types == ("loopback",)
    assert net.document["plugins"] == [doc]
    assert net.document["name"] == "lo-net"


def test_json_file_may_hold_either_form() -> None:
    single = {"cniVersion": "1.0.0", "name": "a", "type": "ptp"}
    assert parse_bytes(json.dumps(single).encode(), "x.json").plugin_types == ("ptp",)
    listed = conflist("b", "1.0.0", "ptp", "portmap")
    assert parse_bytes(json.dumps(listed).encode(), "x.json").plugin_types == ("ptp", "portmap")


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "not a JSON object"),
        ({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}, "no 'name'"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "no 'plugins' list"),
        ({"cniVersion": "1.0.0", "name": "n"}, "no 'plugins' list"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"x": 1}]}, "has no 'type'"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../bin/sh"}]}, "not a path"),
        ({"cniVersion": "1.0.0", "name": "bad name", "plugins": [{"type": "b"}]}, "characters"),
        (
            {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "b", "capabilities": []}]},
            "capabilities",
        ),
        (conflist("n", "1.0.0", disableCheck="maybe"), "disableCheck must be"),
    ],
)
def test_bad_conflists_are_refused_with_reason(doc: Any, why: str) -> None:
    data = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(ConfigError, match=why):
        parse_bytes(data.encode(), "a.conflist")


def test_conf_without_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="no 'type'"):
        parse_bytes(json.dumps({"cniVersion": "1.0.0", "name": "n"}).encode(), "a.conf")


def test_disable_check_and_gc_accepted_as_bool_or_string() -> None:
    doc = conflist("n", "1.1.0", disableCheck=True, disableGC="true")
    net = parse_bytes(json.dumps(doc).encode(), "a.conflist")
    assert net.disable_check and net.disable_gc
    doc = conflist("n", "1.1.0", disableCheck="False")
    assert not parse_bytes(json.dumps(doc).encode(), "a.conflist").disable_check


# -- the directory --------------------------------------------------------------------------


def test_scan_orders_by_file_name_and_skips_other_suffixes(tmp_path: Path) -> None:
    write(tmp_path, "20-b.conflist", conflist("b"))
    write(tmp_path, "10-a.conf", {"cniVersion": "1.0.0", "name": "a", "type": "ptp"})
    write(tmp_path, "30-c.json", conflist("c"))
    write(tmp_path, "05-z.conflist.tmp", conflist("z"))
    write(tmp_path, "README", "hello")
    (tmp_path / "00-dir.conflist").mkdir()
    result = scan(tmp_path)
    assert [n.name for n in result.networks] == ["a", "b", "c"]
    assert result.refused == ()
    net, message = result.select()
    assert net is not None and net.name == "a" and message == ""


def test_first_valid_file_wins_and_refusals_are_listed(tmp_path: Path) -> None:
    write(tmp_path, "10-broken.conflist", "{oops")
    write(tmp_path, "20-old.conflist", conflist("old", "0.2.0"))
    write(tmp_path, "30-good.conflist", conflist("good"))
    result = scan(tmp_path)
    net, _ = result.select()
    assert net is not None and net.name == "good"
    assert [name for name, _ in result.refused] == ["10-broken.conflist", "20-old.conflist"]


def test_nothing_valid_message_names_dir_and_each_reason(tmp_path: Path) -> None:
    write(tmp_path, "10-broken.conflist", "{oops")
    write(tmp_path, "20-old.conf", {"cniVersion": "0.2.0", "name": "old", "type": "bridge"})
    net, message = scan(tmp_path).select()
    assert net is None
    assert str(tmp_path) in message
    assert "10-broken.conflist skipped: invalid JSON" in message
    assert "20-old.conf skipped: cniVersion '0.2.0' is not supported" in message


def test_empty_and_missing_dirs(tmp_path: Path) -> None:
    net, message = scan(tmp_path).select()
    assert net is None and "no CNI network config found in" in message
    net, message = scan(tmp_path / "nope").select()
    assert net is None and "does not exist" in message


def test_named_default_network(tmp_path: Path) -> None:
    write(tmp_path, "10-a.conflist", conflist("a"))
    write(tmp_path, "20-b.conflist", conflist("b"))
    write(tmp_path, "30-b.conflist", conflist("b", "0.4.0"))
    net, _ = scan(tmp_path).select("b")
    assert net is not None and net.name == "b" and net.source.endswith("20-b.conflist")
    net, message = scan(tmp_path).select("c")
    assert net is None
    assert "default CNI network 'c' not found" in message
    assert "a (10-a.conflist)" in message


def test_named_default_network_refused_says_why(tmp_path: Path) -> None:
    write(tmp_path, "10-a.conflist", conflist("a"))
    write(tmp_path, "20-b.conflist", conflist("b", "0.1.0"))
    net, message = scan(tmp_path).select("b")
    assert net is None
    assert "20-b.conflist skipped: cniVersion '0.1.0' is not supported" in message


def test_snapshot_changes_with_content(tmp_path: Path) -> None:
    assert snapshot(tmp_path / "nope") is None
    first = snapshot(tmp_path)
    path = write(tmp_path, "10-a.conflist", conflist("a"))
    second = snapshot(tmp_path)
    assert second != first
    path.write_text(json.dumps(conflist("a", "0.4.0")))
    os.utime(path, ns=(1, 1))
    assert snapshot(tmp_path) != second


def test_find_plugin_searches_dirs_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    make_plugin(second, "bridge")
    assert find_plugin("bridge", [first, second]) == second / "bridge"
    make_plugin(first, "bridge")
    assert find_plugin("bridge", [first, second]) == first / "bridge"
    (first / "noexec").write_text("x")
    assert find_plugin("noexec", [first]) is None
    assert find_plugin("../one/bridge", [second]) is None
    assert find_plugin("missing", [first, second]) is None


# -- status ---------------------------------------------------------------------------------


def manager(tmp_path: Path, **kwargs: Any) -> CNIManager:
    return CNIManager(tmp_path / "net.d", [tmp_path / "bin"], tmp_path / "cache", **kwargs)


def test_status_not_ready_until_config_appears(tmp_path: Path) -> None:
    m = manager(tmp_path)
    ready, reason, message = m.status()
    assert (ready, reason) == (False, "NetworkPluginNotReady")
    assert "does not exist" in message
    (tmp_path / "net.d").mkdir()
    ready, reason, message = m.status()
    assert not ready and "no CNI network config found" in message
    make_plugin(tmp_path / "bin", "bridge")
    write(tmp_path / "net.d", "10-a.conflist", conflist("a"))
    assert m.status() == (True, "", "")
    with pytest.raises(NetworkNotReady):
        manager(tmp_path / "other").default()
    assert m.default().name == "a"


def test_status_reports_missing_plugins_and_sees_them_installed(tmp_path: Path) -> None:
    m = manager(tmp_path)
    write(tmp_path / "net.d", "10-a.conflist", conflist("a", "1.0.0", "bridge", "portmap"))
    make_plugin(tmp_path / "bin", "bridge")
    ready, reason, message = m.status()
    assert not ready and reason == "NetworkPluginNotReady"
    assert '"portmap" not found in' in message and str(tmp_path / "bin") in message
    make_plugin(tmp_path / "bin", "portmap")
    assert m.status()[0]


def test_status_follows_edits_and_removal(tmp_path: Path) -> None:
    make_plugin(tmp_path / "bin", "bridge")
    m = manager(tmp_path)
    path = write(tmp_path / "net.d", "10-a.conflist", conflist("a"))
    assert m.status()[0]
    path.write_text("{broken")
    ready, _, message = m.status()
    assert not ready and "10-a.conflist skipped: invalid JSON" in message
    path.write_text(json.dumps(conflist("b")))
    assert m.status()[0] and m.default().name == "b"
    path.unlink()
    assert not m.status()[0]


def test_status_with_named_default(tmp_path: Path) -> None:
    make_plugin(tmp_path / "bin", "bridge")
    write(tmp_path / "net.d", "10-a.conflist", conflist("a"))
    m = manager(tmp_path, default_network="b")
    ready, _, message = m.status()
    assert not ready and "'b' not found" in message
    write(tmp_path / "net.d", "20-b.conflist", conflist("b"))
    assert m.status()[0] and m.default().name == "b"


def test_status_does_not_reread_unchanged_dir(tmp_path: Path) -> None:
    make_plugin(tmp_path / "bin", "bridge")
    path = write(tmp_path / "net.d", "10-a.conflist", conflist("a"))
    m = manager(tmp_path)
    assert m.status()[0]
    first = m.default()
    assert m.status()[0]
    assert m.default() is first  # same listing, sizes and mtimes: not parsed again
    path.write_text(json.dumps(conflist("a", "0.4.0")))
    os.utime(path, ns=(1, 1))
    assert m.default() is not first
