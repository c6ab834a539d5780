"""The per-pod files: hostname, hosts, resolv.conf content and validation; shm size parsing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from moorage.errors import InvalidArgument
from moorage.sandbox import files
from moorage.sandbox.files import DnsConfig

# -- hostname -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "web-0",
        "a",
        "pod1.sub.ns.svc.cluster.local",
        "A0",
        "x" * 63,
        ("a" * 31 + ".") + "b" * 32,  # 64 characters in all
    ],
)
def test_valid_hostnames(name: str) -> None:
    files.validate_hostname(name)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "must not be empty"),
        ("x" * 64 + "y", "at most 64"),
        ("x" * 64 + ".b", "at most 64"),
        ("-web", "not a valid hostname"),
        ("web-", "not a valid hostname"),
        ("we_b", "not a valid hostname"),
        ("a..b", "not a valid hostname"),
        (".a", "not a valid hostname"),
        ("a.", "not a valid hostname"),
        ("a b", "not a valid hostname"),
        ("a\nb", "not a valid hostname"),
        ("x" * 64, "not a valid hostname"),  # a 64-character label
    ],
)
def test_invalid_hostnames(name: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^config.hostname: .*{why}"):
        files.validate_hostname(name)


# -- resolv.conf ----------------------------------------------------------------------------


def test_resolv_conf_from_dns_config(tmp_path: Path) -> None:
    dns = DnsConfig(
        servers=("10.96.0.10", "fd00::10"),
        searches=("default.svc.cluster.local", "svc.cluster.local", "cluster.local"),
        options=("ndots:5", "edns0"),
    )
    assert files.resolv_conf(dns, tmp_path / "missing") == (
        b"nameserver 10.96.0.10\n"
        b"nameserver fd00::10\n"
        b"search default.svc.cluster.local svc.cluster.local cluster.local\n"
        b"options ndots:5 edns0\n"
    )


def test_resolv_conf_partial_config() -> None:
    assert files.resolv_conf(DnsConfig(servers=("1.1.1.1",))) == b"nameserver 1.1.1.1\n"
    assert files.resolv_conf(DnsConfig(options=("ndots:2",))) == b"options ndots:2\n"
    assert files.resolv_conf(DnsConfig(searches=("example.org.",))) == b"search example.org.\n"


def test_empty_dns_config_copies_the_host_file(tmp_path: Path) -> None:
    host = tmp_path / "resolv.conf"
    content = b"# host\nnameserver 192.0.2.1\nsearch lan\noptions rotate\n"
    host.write_bytes(content)
    assert files.resolv_conf(DnsConfig(), host) == content
    assert files.resolv_conf(DnsConfig(), tmp_path / "none") == b""


@pytest.mark.parametrize(
    ("dns", "field"),
    [
        (DnsConfig(servers=("10.0.0.1", "dns.example")), r"servers\[1\]"),
        (DnsConfig(servers=("10.0.0.1\nnameserver 6.6.6.6",)), r"servers\[0\]"),
        (DnsConfig(servers=("10.0.0.256",)), r"servers\[0\]"),
        (DnsConfig(servers=("",)), r"servers\[0\]"),
        (DnsConfig(searches=("a b",)), r"searches\[0\]"),
        (DnsConfig(searches=("ok", "x\noptions debug")), r"searches\[1\]"),
        (DnsConfig(searches=("a..b",)), r"searches\[0\]"),
        (DnsConfig(searches=("",)), r"searches\[0\]"),
        (DnsConfig(searches=tuple(f"d{i}" for i in range(33))), "searches: 33 search domains"),
        (DnsConfig(searches=("x" * 60 + ".y",) * 33), "searches: 33"),
        (DnsConfig(options=("ndots:5 debug",)), r"options\[0\]"),
        (DnsConfig(options=("",)), r"options\[0\]"),
    ],
)
def test_invalid_dns_config(dns: DnsConfig, field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^config.dns_config.{field}"):
        files.validate_dns(dns)
    with pytest.raises(InvalidArgument):
        files.resolv_conf(dns)


def test_search_list_limits() -> None:
    # 32 domains are fine; 2048 characters joined by spaces are fine, 2049 are not.
    files.validate_dns(DnsConfig(searches=tuple(f"d{i}.example" for i in range(32))))
    label = "a" * 63
    domain = ".".join([label] * 4)[:253]  # 253 characters
    eight = (domain,) * 8  # 8 * 253 + 7 spaces = 2031
    files.validate_dns(DnsConfig(searches=(*eight, "b" * 16)))  # 2031 + 1 + 16 = 2048
    with pytest.raises(InvalidArgument, match="2049 characters, at most 2048"):
        files.validate_dns(DnsConfig(searches=(*eight, "b" * 17)))


def test_valid_dns_values() -> None:
    files.validate_dns(
        DnsConfig(
            servers=("8.8.8.8", "2001:4860:4860::8888", "fe80::1%eth0"),
            searches=("_tcp.example.com", "example.com."),
            options=("ndots:5", "timeout:2", "attempts:3", "single-request-reopen", "use-vc"),
        )
    )


# -- hosts ----------------------------------------------------------------------------------

KUBELET_HEADER = (
    b"# Kubernetes-managed hosts file.\n"
    b"127.0.0.1\tlocalhost\n"
    b"::1\tlocalhost ip6-localhost ip6-loopback\n"
    b"fe00::0\tip6-localnet\n"
    b"fe00::0\tip6-mcastprefix\n"
    b"fe00::1\tip6-allnodes\n"
    b"fe00::2\tip6-allrouters\n"
)


def test_hosts_file_like_kubelet(tmp_path: Path) -> None:
    got = files.hosts_file("web-0", ["10.244.1.94", "fd00:10:244::5e"], False, tmp_path / "x")
    assert got == KUBELET_HEADER + b"10.244.1.94\tweb-0\nfd00:10:244::5e\tweb-0\n"


def test_hosts_file_without_pod_ips() -> None:
    assert files.hosts_file("web-0", [], False) == KUBELET_HEADER


def test_hosts_file_host_network_copies_the_host_file(tmp_path: Path) -> None:
    host = tmp_path / "hosts"
    host.write_bytes(b"127.0.0.1 localhost\n192.0.2.7 node-a\n")
    assert files.hosts_file("node-a", ["192.0.2.7"], True, host) == host.read_bytes()
    assert files.hosts_file("node-a", [], True, tmp_path / "none") == KUBELET_HEADER


def test_hosts_file_bad_input() -> None:
    with pytest.raises(InvalidArgument, match=r"pod_ips\[1\]"):
        files.hosts_file("web", ["10.0.0.1", "10.0.0.1 evil"], False)
    with pytest.raises(InvalidArgument, match="config.hostname"):
        files.hosts_file("we b", ["10.0.0.1"], False)
    with pytest.raises(InvalidArgument, match="config.hostname"):
        files.hosts_file("", ["10.0.0.1"], False)


# -- writing them ---------------------------------------------------------------------------


def test_write_pod_files(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "sandbox1"
    old_umask = os.umask(0o077)
    try:
        paths = files.write_pod_files(
            directory, hostname="web-0", resolv=b"nameserver 10.0.0.10\n", hosts=b"h\n"
        )
    finally:
        os.umask(old_umask)
    assert paths == {
        "hostname": directory / "hostname",
        "hosts": directory / "hosts",
        "resolv.conf": directory / "resolv.conf",
    }
    assert (directory / "hostname").read_bytes() == b"web-0\n"
    assert (directory / "hosts").read_bytes() == b"h\n"
    assert (directory / "resolv.conf").read_bytes() == b"nameserver 10.0.0.10\n"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    for p in paths.values():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["hostname", "hosts", "resolv.conf"]


def test_write_pod_files_again_replaces(tmp_path: Path) -> None:
    files.write_pod_files(tmp_path, hostname="a", resolv=b"1", hosts=b"1")
    files.write_pod_files(tmp_path, hostname="b", resolv=b"2", hosts=b"2")
    assert (tmp_path / "hostname").read_bytes() == b"b\n"
    assert (tmp_path / "resolv.conf").read_bytes() == b"2"
    assert len(list(tmp_path.iterdir())) == 3  # no temp files left


def test_write_pod_files_refuses_a_hostname_that_breaks_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="config.hostname"):
        files.write_pod_files(tmp_path / "d", hostname="a\nb", resolv=b"", hosts=b"")


# -- shm size -------------------------------------------------------------------------------

CRIO = "io.kubernetes.cri-o.ShmSize"
OURS = "io.moorage.shm-size"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("65536", 65536),
        ("1", 1),
        ("64k", 64 << 10),
        ("64K", 64 << 10),
        ("64kb", 64 << 10),
        ("128Mi", 128 << 20),
        ("128MiB", 128 << 20),
        ("128MB", 128 << 20),
        ("128m", 128 << 20),
        ("128 m", 128 << 20),
        ("1G", 1 << 30),
        ("1g", 1 << 30),
        ("1.5G", 3 << 29),
        ("0.5k", 512),
        ("2t", 2 << 40),
        ("1p", 1 << 50),
        ("100b", 100),
        (" 16Mi ", 16 << 20),
    ],
)
def test_shm_size_parsing(text: str, size: int) -> None:
    assert files.shm_size({CRIO: text}) == size
    assert files.shm_size({OURS: text}) == size


def test_shm_size_default_and_precedence() -> None:
    assert files.shm_size({}) == files.SHM_DEFAULT == 64 * 1024 * 1024
    assert files.shm_size({"other": "1G"}) == files.SHM_DEFAULT
    assert files.shm_size({CRIO: "1M", OURS: "2M"}) == 1 << 20


@pytest.mark.parametrize(
    "text", ["", "abc", "-1", "1x", "1.2.3G", "1 G B", "0", "0k", "M", "1e6", "99999999999P"]
)
def test_shm_size_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument, match=f"annotations\\['{CRIO}'\\]"):
        files.shm_size({CRIO: text})
    with pytest.raises(InvalidArgument, match=f"annotations\\['{OURS}'\\]"):
        files.shm_size({OURS: text})


def test_mount_shm_refuses_an_unlimited_size(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="positive"):
        files.mount_shm(tmp_path / "shm", 0)
    assert not (tmp_path / "shm").exists()
