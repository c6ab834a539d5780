"""CNIManager with real executables that play CNI plugins (no root needed).

The plugin is a small Python program installed under several names. It appends what it was
given (its name, the CNI_* environment, its stdin) to a log and behaves as its network config
says: print a result, fail with a CNI error, hang. The pod netns is ``/proc/self/ns/net``
(a real nsfs inode, so the manager's netns check passes); loopback set-up is off.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moorage import errors
from moorage.network import (
    AttachRequest,
    Bandwidth,
    CNIError,
    CNIManager,
    NetworkNotReady,
    PortMapping,
)

NETNS = "/proc/self/ns/net"
SANDBOX = "0123456789abcdef"

FAKE_PLUGIN = """\
import json, os, sys, time
name = os.path.basename(sys.argv[0])
conf = json.loads(sys.stdin.read() or "{}")
cmd = os.environ.get("CNI_COMMAND", "")
env = {k: v for k, v in os.environ.items() if k.startswith("CNI_")}
with open(conf["log"], "a") as f:
    f.write(json.dumps({"plugin": name, "cmd": cmd, "env": env, "stdin": conf,
                        "pid": os.getpid()}) + "\\n")
behave = conf.get("behave", {}).get(name, {})
if cmd in behave.get("sleep_on", []):
    time.sleep(60)
fail_flag = behave.get("fail_if_exists")
if cmd in behave.get("fail_on", []) and (not fail_flag or os.path.exists(fail_flag)):
    if behave.get("raw_error"):
        sys.stderr.write(behave["raw_error"])
    else:
        print(json.dumps({"cniVersion": conf.get("cniVersion"), "code": 7,
                          "msg": name + " says no", "details": "on " + cmd}))
    sys.exit(behave.get("exit", 3))
if cmd == "ADD":
    if behave.get("garbage"):
        print("this is not json")
        sys.exit(0)
    result = conf.get("prevResult") or {"cniVersion": conf["cniVersion"], "interfaces": [],
                                         "ips": []}
    if behave.get("address"):
        result["interfaces"].append({"name": os.environ["CNI_IFNAME"],
                                     "sandbox": os.environ["CNI_NETNS"]})
        result["ips"].append({"interface": len(result["interfaces"]) - 1,
                              "address": behave["address"]})
    result.setdefault("seen", []).append(name)
    print(json.dumps(result))
"""


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf_dir = root / "net.d"
        self.bin_dirs = [root / "bin1", root / "bin2"]
        self.cache_dir = root / "cache"
        self.log = root / "calls.jsonl"
        for d in (self.conf_dir, *self.bin_dirs):
            d.mkdir(parents=True)
        script = f"#!{sys.executable}\n{FAKE_PLUGIN}"
        # Plugins spread over two dirs: the manager must search them in order.
        for i, name in enumerate(("fake-a", "fake-b", "fake-c", "fake-d")):
            path = self.bin_dirs[i % 2] / name
            path.write_text(script)
            path.chmod(0o755)

    def write_conf(
        self,
        filename: str = "10-net.conflist",
        name: str = "podnet",
        version: str = "1.0.0",
        plugins: tuple[str, ...] = ("fake-a", "fake-b", "fake-c"),
        behave: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        behave = {"fake-a": {"address": "10.9.0.2/24"}, **(behave or {})}
        entries = []
        for p in plugins:
            entry: dict[str, Any] = {"type": p, "log": str(self.log), "behave": behave}
            if p == "fake-b":
                entry["capabilities"] = {"portMappings": True, "ipRanges": True}
            if p == "fake-c":
                entry["capabilities"] = {"bandwidth": False}
            entries.append(entry)
        doc = {"cniVersion": version, "name": name, "plugins": entries, **extra}
        (self.conf_dir / filename).write_text(json.dumps(doc))

    def manager(self, **kwargs: Any) -> CNIManager:
        return CNIManager(self.conf_dir, self.bin_dirs, self.cache_dir, loopback=False, **kwargs)

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def sequence(self) -> list[tuple[str, str]]:
        return [(c["cmd"], c["plugin"]) for c in self.calls()]

    def reset(self) -> None:
        self.log.unlink(missing_ok=True)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield Env(tmp_path)


def request(**kwargs: Any) -> AttachRequest:
    args: dict[str, Any] = {
        "sandbox_id": SANDBOX,
        "netns_path": NETNS,
        "pod_namespace": "default",
        "pod_name": "web-0",
        "pod_uid": "uid-1",
    }
    args.update(kwargs)
    return AttachRequest(**args)


async def test_add_chains_plugins_and_caches(env: Env) -> None:
    env.write_conf()
    m = env.manager()
    res = await m.attach(
        request(
            port_mappings=(PortMapping(8080, 80), PortMapping(0, 81)),
            bandwidth=Bandwidth(1, 2, 3, 4),
            pod_cidr="10.9.0.0/24",
        )
    )
    assert res.network == "podnet"
    assert res.ips == ("10.9.0.2",)
    assert res.result["seen"] == ["fake-a", "fake-b", "fake-c"]
    calls = env.calls()
    assert [(c["cmd"], c["plugin"]) for c in calls] == [
        ("ADD", "fake-a"),
        ("ADD", "fake-b"),
        ("ADD", "fake-c"),
    ]
    a, b, c = (call["stdin"] for call in calls)
    assert "prevResult" not in a
    assert b["prevResult"]["seen"] == ["fake-a"]
    assert c["prevResult"]["seen"] == ["fake-a", "fake-b"]
    assert all(s["name"] == "podnet" and s["cniVersion"] == "1.0.0" for s in (a, b, c))
    assert "runtimeConfig" not in a
    assert b["runtimeConfig"] == {
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}],
        "ipRanges": [[{"subnet": "10.9.0.0/24"}]],
    }
    assert "runtimeConfig" not in c  # declared false
    assert calls[0]["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": SANDBOX,
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
        f"K8S_POD_INFRA_CONTAINER_ID={SANDBOX};K8S_POD_UID=uid-1",
        "CNI_PATH": ":".join(str(d) for d in env.bin_dirs),
    }
    cached = m.cached(SANDBOX)
    assert cached is not None
    assert cached["state"] == "attached"
    assert cached["result"] == res.result
    assert cached["config"] == json.loads((env.conf_dir / "10-net.conflist").read_text())
    assert cached["ifname"] == "eth0"
    assert cached["cni_args"] == calls[0]["env"]["CNI_ARGS"]
    assert cached["capability_args"]["bandwidth"]["egressBurst"] == 4
    assert m.cached_sandboxes() == [SANDBOX]
    raw = json.loads((env.cache_dir / f"{SANDBOX}.json").read_text())
    assert raw["kind"] == "cni-attachment"


async def test_attach_again_gives_the_cached_result(env: Env) -> None:
    env.write_conf()
    m = env.manager()
    first = await m.attach(request())
    env.reset()
    again = await m.attach(request())
    assert again == first
    assert env.sequence() == []


async def test_del_reverse_order_with_cached_result_then_idempotent(env: Env) -> None:
    env.write_conf()
    m = env.manager()
    res = await m.attach(request(port_mappings=(PortMapping(8080, 80),)))
    env.reset()
    await m.detach(SANDBOX, NETNS)
    calls = env.calls()
    assert env.sequence() == [("DEL", "fake-c"), ("DEL", "fake-b"), ("DEL", "fake-a")]
    assert all(c["stdin"]["prevResult"] == res.result for c in calls)
    assert calls[1]["stdin"]["runtimeConfig"]["portMappings"][0]["hostPort"] == 8080
    assert calls[0]["env"]["CNI_ARGS"].startswith("IgnoreUnknown=1;K8S_POD_NAMESPACE=default")
    assert m.cached(SANDBOX) is None
    assert not (env.cache_dir / f"{SANDBOX}.json").exists()
    # Again: no cache, so the current config with what is known; still succeeds.
    env.reset()
    await m.detach(SANDBOX, NETNS)
    calls = env.calls()
    assert env.sequence() == [("DEL", "fake-c"), ("DEL", "fake-b"), ("DEL", "fake-a")]
    assert all("prevResult" not in c["stdin"] for c in calls)
    assert calls[0]["env"]["CNI_ARGS"] == f"IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID={SANDBOX}"


async def test_del_without_prev_result_before_0_4_0(env: Env) -> None:
    env.write_conf(version="0.3.1")
    m = env.manager()
    await m.attach(request())
    env.reset()
    await m.detach(SANDBOX, NETNS)
    assert [c["stdin"].get("prevResult") for c in env.calls()] == [None, None, None]


async def test_del_with_gone_or_no_netns_passes_empty_netns(env: Env, tmp_path: Path) -> None:
    env.write_conf()
    m = env.manager()
    await m.attach(request())
    env.reset()
    await m.detach(SANDBOX, str(tmp_path / "gone"))
    assert {c["env"]["CNI_NETNS"] for c in env.calls()} == {""}
    env.reset()
    await m.detach(SANDBOX, None)
    assert {c["env"]["CNI_NETNS"] for c in env.calls()} == {""}


async def test_del_uses_cached_config_after_a_config_change(env: Env) -> None:
    env.write_conf(name="old-net", plugins=("fake-a", "fake-b"))
    m = env.manager()
    await m.attach(request(ifname="net1"))
    (env.conf_dir / "10-net.conflist").unlink()
    env.write_conf(filename="20-new.conflist", name="new-net", plugins=("fake-d",))
    assert m.status()[0] and m.default().name == "new-net"
    env.reset()
    # A restarted daemon: a fresh manager reading the same cache dir.
    await env.manager().detach(SANDBOX, NETNS)
    calls = env.calls()
    assert env.sequence() == [("DEL", "fake-b"), ("DEL", "fake-a")]
    assert {c["stdin"]["name"] for c in calls} == {"old-net"}
    assert {c["env"]["CNI_IFNAME"] for c in calls} == {"net1"}


async def test_add_failure_rolls_back_whole_list(env: Env) -> None:
    env.write_conf(behave={"fake-b": {"fail_on": ["ADD"], "exit": 3}})
    m = env.manager()
    with pytest.raises(CNIError) as info:
        await m.attach(request())
    e = info.value
    assert (e.plugin, e.command, e.exit_code, e.cni_code) == ("fake-b", "ADD", 3, 7)
    assert (e.cni_msg, e.details) == ("fake-b says no", "on ADD")
    for part in ('"fake-b"', "ADD", "exit code 3", "fake-b says no", "details: on ADD"):
        assert part in e.message
    seq = env.sequence()
    assert seq == [
        ("ADD", "fake-a"),
        ("ADD", "fake-b"),
        ("DEL", "fake-c"),
        ("DEL", "fake-b"),
        ("DEL", "fake-a"),
    ]
    a_result = json.loads(json.dumps(env.calls()[1]["stdin"]["prevResult"]))
    assert all(c["stdin"]["prevResult"] == a_result for c in env.calls()[2:])
    assert m.cached(SANDBOX) is None
    assert m.cached_sandboxes() == []


async def test_failed_rollback_keeps_record_for_the_next_detach(env: Env) -> None:
    flag = env.root / "fail-del"
    flag.touch()
    env.write_conf(
        behave={
            "fake-b": {"fail_on": ["ADD"]},
            "fake-a": {"address": "10.9.0.2/24", "fail_on": ["DEL"], "fail_if_exists": str(flag)},
        }
    )
    m = env.manager()
    with pytest.raises(CNIError) as info:
        await m.attach(request())
    assert "fake-b says no" in info.value.message
    assert "cleanup DEL failed too" in info.value.message
    assert "fake-a says no" in info.value.message
    record = m.cached(SANDBOX)
    assert record is not None and record["state"] == "adding"
    assert record["result"]["seen"] == ["fake-a"]
    # The DEL keeps failing: detach raises and keeps the record.
    with pytest.raises(CNIError, match="fake-a says no"):
        await m.detach(SANDBOX, NETNS)
    assert m.cached(SANDBOX) is not None
    flag.unlink()
    env.reset()
    await m.detach(SANDBOX, NETNS)
    assert env.sequence() == [("DEL", "fake-c"), ("DEL", "fake-b"), ("DEL", "fake-a")]
    assert m.cached(SANDBOX) is None


async def test_leftover_record_is_cleaned_before_a_new_attach(env: Env) -> None:
    flag = env.root / "fail-del"
    flag.touch()
    env.write_conf(
        behave={
            "fake-c": {"fail_on": ["ADD"]},
            "fake-a": {"address": "10.9.0.2/24", "fail_on": ["DEL"], "fail_if_exists": str(flag)},
        }
    )
    m = env.manager()
    with pytest.raises(CNIError):
        await m.attach(request())
    flag.unlink()
    env.write_conf()
    env.reset()
    res = await m.attach(request())
    assert res.ips == ("10.9.0.2",)
    assert env.sequence()[:3] == [("DEL", "fake-c"), ("DEL", "fake-b"), ("DEL", "fake-a")]
    assert env.sequence()[3:] == [("ADD", "fake-a"), ("ADD", "fake-b"), ("ADD", "fake-c")]


async def test_missing_plugin(env: Env) -> None:
    env.write_conf(plugins=("fake-a", "no-such-plugin", "fake-c"))
    m = env.manager()
    ready, _, message = m.status()
    assert not ready and '"no-such-plugin" not found' in message
    with pytest.raises(CNIError) as info:
        await m.attach(request())
    assert info.value.plugin == "no-such-plugin"
    assert '"no-such-plugin"' in info.value.message
    assert ":".join(str(d) for d in env.bin_dirs) in info.value.message
    # The rollback DELs the plugins that exist (a missing one never ran).
    assert env.sequence() == [("ADD", "fake-a"), ("DEL", "fake-c"), ("DEL", "fake-a")]
    assert m.cached(SANDBOX) is None


async def test_plugin_without_result_fails_and_rolls_back(env: Env) -> None:
    env.write_conf(behave={"fake-b": {"garbage": True}})
    m = env.manager()
    with pytest.raises(CNIError, match="printed no usable result"):
        await m.attach(request())
    assert env.sequence()[-3:] == [("DEL", "fake-c"), ("DEL", "fake-b"), ("DEL", "fake-a")]


async def test_error_without_cni_json_shows_stderr(env: Env) -> None:
    env.write_conf(behave={"fake-a": {"fail_on": ["ADD"], "raw_error": "panic: boom", "exit": 2}})
    m = env.manager()
    with pytest.raises(CNIError, match="exit code 2.*panic: boom") as info:
        await m.attach(request())
    assert info.value.cni_code is None and info.value.exit_code == 2


async def test_plugin_timeout_kills_it(env: Env) -> None:
    env.write_conf(plugins=("fake-a", "fake-b"), behave={"fake-b": {"sleep_on": ["ADD"]}})
    m = env.manager(plugin_timeout=1.0)
    with pytest.raises(CNIError, match="timed out after 1s") as info:
        await m.attach(request())
    assert info.value.plugin == "fake-b"
    assert info.value.code == "DEADLINE_EXCEEDED"  # (after the rollback, too)
    hung = next(c for c in env.calls() if c["plugin"] == "fake-b" and c["cmd"] == "ADD")
    for _ in range(100):
        try:
            os.kill(hung["pid"], 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the timed-out plugin is still running")
    assert env.sequence()[-2:] == [("DEL", "fake-b"), ("DEL", "fake-a")]


async def test_cancelled_attach_kills_plugin_and_rolls_back(env: Env) -> None:
    env.write_conf(plugins=("fake-a", "fake-b"), behave={"fake-b": {"sleep_on": ["ADD"]}})
    m = env.manager()
    task = asyncio.create_task(m.attach(request()))
    for _ in range(200):
        if ("ADD", "fake-b") in env.sequence():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert env.sequence()[-2:] == [("DEL", "fake-b"), ("DEL", "fake-a")]
    assert m.cached(SANDBOX) is None


async def test_check(env: Env) -> None:
    env.write_conf()
    m = env.manager()
    with pytest.raises(CNIError, match="no CNI attachment"):
        await m.check(SANDBOX, NETNS)
    res = await m.attach(request())
    env.reset()
    await m.check(SANDBOX, NETNS)
    assert env.sequence() == [("CHECK", "fake-a"), ("CHECK", "fake-b"), ("CHECK", "fake-c")]
    assert all(c["stdin"]["prevResult"] == res.result for c in env.calls())


@pytest.mark.parametrize(("version", "extra"), [("0.3.1", {}), ("1.0.0", {"disableCheck": True})])
async def test_check_skipped(env: Env, version: str, extra: dict[str, Any]) -> None:
    env.write_conf(version=version, **extra)
    m = env.manager()
    await m.attach(request())
    env.reset()
    await m.check(SANDBOX, NETNS)
    assert env.sequence() == []


async def test_check_failure(env: Env) -> None:
    env.write_conf(behave={"fake-b": {"fail_on": ["CHECK"]}})
    m = env.manager()
    await m.attach(request())
    with pytest.raises(CNIError, match='"fake-b" CHECK') as info:
        await m.check(SANDBOX, NETNS)
    assert info.value.command == "CHECK"


async def test_pod_cidr_from_runtime_config(env: Env) -> None:
    env.write_conf()
    m = env.manager()
    m.set_pod_cidr("10.9.0.0/24,fd00:9::/64")
    await m.attach(request())
    b = env.calls()[1]["stdin"]
    assert b["runtimeConfig"]["ipRanges"] == [
        [{"subnet": "10.9.0.0/24"}],
        [{"subnet": "fd00:9::/64"}],
    ]


async def test_not_ready(env: Env) -> None:
    m = env.manager()
    with pytest.raises(NetworkNotReady, match="no CNI network config found in"):
        await m.attach(request())
    assert isinstance(NetworkNotReady("x"), errors.FailedPrecondition)
    # Nothing cached and nothing configured: detach has nothing to ask anyone.
    await m.detach(SANDBOX, None)
    assert env.sequence() == []


async def test_bad_requests(env: Env, tmp_path: Path) -> None:
    env.write_conf()
    m = env.manager()
    with pytest.raises(errors.InvalidArgument, match="sandbox_id"):
        await m.attach(request(sandbox_id="../etc"))
    with pytest.raises(errors.InvalidArgument, match="ifname"):
        await m.attach(request(ifname="a-very-long-interface-name"))
    with pytest.raises(errors.InvalidArgument, match="not a network namespace"):
        await m.attach(request(netns_path=str(tmp_path)))
    with pytest.raises(errors.InvalidArgument, match="K8S_POD_NAME"):
        await m.attach(request(pod_name="a;b"))
    with pytest.raises(errors.InvalidArgument, match="sandbox_id"):
        await m.detach("a/b", None)
    assert env.sequence() == []


async def test_corrupt_cache_record_falls_back_to_current_config(env: Env) -> None:
    env.write_conf()
    m = env.manager()
    env.cache_dir.mkdir()
    (env.cache_dir / f"{SANDBOX}.json").write_text("{garbage")
    assert m.cached(SANDBOX) is None
    await m.detach(SANDBOX, NETNS)
    assert env.sequence() == [("DEL", "fake-c"), ("DEL", "fake-b"), ("DEL", "fake-a")]
    assert not (env.cache_dir / f"{SANDBOX}.json").exists()


async def test_parallel_attaches_of_different_sandboxes(env: Env) -> None:
    env.write_conf(plugins=("fake-a",))
    m = env.manager()
    ids = [f"sb{i:02d}" for i in range(8)]
    results = await asyncio.gather(*(m.attach(request(sandbox_id=i)) for i in ids))
    assert [r.network for r in results] == ["podnet"] * 8
    assert sorted(m.cached_sandboxes()) == ids
    await asyncio.gather(*(m.detach(i, NETNS) for i in ids))
    assert m.cached_sandboxes() == []
