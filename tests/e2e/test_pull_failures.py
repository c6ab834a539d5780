"""Pulls that need auth, TLS, mirrors, or that must fail clearly and leave a clean store."""

from __future__ import annotations

import os
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_images import insecure_conf, layer_dirs, pull, rpc_error, status
from tests.fixtures.daemon import Daemon
from tests.fixtures.oci import Image, Layer, corrupt_manifest, push_image, push_schema1
from tests.fixtures.registry import Registry
from tests.fixtures.stallproxy import StallProxy

RegistryFactory = Callable[..., Registry]


def assert_store_clean(d: Daemon) -> None:
    """No image, no layer, no unpack or download in progress left behind."""
    assert not d.images.ListImages(pb.ListImagesRequest()).images
    assert layer_dirs(d) == set()
    assert list((d.root / "images/ingest").iterdir()) == []
    assert list((d.root / "images/records").iterdir()) == []


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def factory(conf: str, config_text: str = "") -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", registries_conf_text=conf,
                   config_text=config_text)
        started.append(d)
        return d.start()

    yield factory
    for d in started:
        d.stop()


def test_basic_auth_with_password_and_auth_field(
    make_daemon: Callable[..., Daemon], auth_registry: Registry
) -> None:
    push_image(auth_registry, "private/app", "1", Image.busybox(labels={"t": "basic"}))
    d = make_daemon(insecure_conf(auth_registry))
    ref = auth_registry.ref("private/app", "1")
    e = rpc_error(pull, d, ref)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no credentials" in (e.details() or "")
    e = rpc_error(lambda: pull(d, ref, username="alice", password="wrong"))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "rejected" in (e.details() or "")
    assert pull(d, ref, username="alice", password="secret").startswith("sha256:")
    import base64

    assert pull(d, ref, auth=base64.b64encode(b"alice:secret").decode())
    e = rpc_error(lambda: pull(d, ref, auth="!!not-base64"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "auth.auth" in (e.details() or "")
    assert "secret" not in d.log_path.read_text()


def test_bearer_token_auth_all_credential_kinds(
    make_daemon: Callable[..., Daemon], token_registry: Registry
) -> None:
    push_image(token_registry, "private/tok", "1", Image.busybox(labels={"t": "token"}))
    push_image(token_registry, "public/tok", "1", Image.busybox(labels={"t": "public"}))
    d = make_daemon(insecure_conf(token_registry))
    # Anonymous pulls of a public repository get an anonymous token.
    assert pull(d, token_registry.ref("public/tok", "1"))
    ref = token_registry.ref("private/tok", "1")
    e = rpc_error(pull, d, ref)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    e = rpc_error(lambda: pull(d, ref, username="alice", password="nope"))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert pull(d, ref, username="alice", password="secret")
    server = token_registry.token_server
    assert server is not None
    d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))
    identity = server.issue_refresh_token("alice")
    assert pull(d, ref, identity_token=identity)
    assert any(r.grant_type == "refresh_token" for r in server.requests)
    d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))
    token = server.issue_token("alice", ["repository:private/tok:pull"])
    assert pull(d, ref, registry_token=token)


def test_tls_registry_with_certs_dir(
    make_daemon: Callable[..., Daemon], tls_registry: Registry
) -> None:
    push_image(tls_registry, "tls/app", "1", Image.busybox(labels={"t": "tls"}))
    d = make_daemon("")  # not insecure: TLS verified
    ref = tls_registry.ref("tls/app", "1")
    e = rpc_error(pull, d, ref)
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert "certificate" in (e.details() or "").lower()
    assert tls_registry.ca_cert_path is not None
    (d.certs_dir / tls_registry.host).mkdir(parents=True)
    shutil.copy(tls_registry.ca_cert_path, d.certs_dir / tls_registry.host / "ca.crt")
    d.restart()
    assert pull(d, ref).startswith("sha256:")


def test_plain_http_needs_insecure(
    make_daemon: Callable[..., Daemon], registry: Registry
) -> None:
    push_image(registry, "plain/app", "1", Image.busybox(labels={"t": "plain"}))
    d = make_daemon("")
    e = rpc_error(pull, d, registry.ref("plain/app", "1"))
    assert e.code() == grpc.StatusCode.UNAVAILABLE and registry.host in (e.details() or "")


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_mirror_tried_before_location_and_blocked(
    make_daemon: Callable[..., Daemon], registry: Registry
) -> None:
    push_image(registry, "mirrored/lib/app", "1", Image.busybox(labels={"t": "mirror"}))
    dead = f"127.0.0.1:{_dead_port()}"
    broken_mirror = f"127.0.0.1:{_dead_port()}"
    conf = (
        f'[[registry]]\nprefix = "{dead}/lib"\nlocation = "{dead}/lib"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{broken_mirror}/x"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{registry.host}/mirrored/lib"\ninsecure = true\n'
        f'[[registry]]\nlocation = "{registry.host}/blocked"\nblocked = true\n'
    )
    d = make_daemon(conf)
    ref = pull(d, f"{dead}/lib/app:1")
    # The image is known by the name asked for, not by the mirror's.
    assert list(status(d, ref).image.repo_tags) == [f"{dead}/lib/app:1"]
    e = rpc_error(pull, d, f"{registry.host}/blocked/app:1")
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "blocked" in (e.details() or "")
    e = rpc_error(pull, d, f"{dead}/other:1")
    assert e.code() == grpc.StatusCode.UNAVAILABLE and dead in (e.details() or "")


def test_schema1_is_refused_clearly(
    make_daemon: Callable[..., Daemon], schema1_registry: Registry
) -> None:
    push_schema1(schema1_registry, "old/app", "1", Image.busybox(labels={"t": "s1"}))
    d = make_daemon(insecure_conf(schema1_registry))
    e = rpc_error(pull, d, schema1_registry.ref("old/app", "1"))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "schema 1" in (e.details() or "")
    assert_store_clean(d)


def test_corrupt_blob_and_manifest(
    make_daemon: Callable[..., Daemon], fresh_registry: RegistryFactory
) -> None:
    reg = fresh_registry()
    extra = Layer()
    extra.add_file("data", os.urandom(4096))
    image = Image(layers=[extra.build("gzip")], labels={"t": "corrupt"})
    digest = push_image(reg, "bad/blob", "1", image)
    reg.corrupt_blob(image.layers[0].digest)
    d = make_daemon(insecure_conf(reg))
    e = rpc_error(pull, d, reg.ref("bad/blob", "1"))
    assert e.code() == grpc.StatusCode.DATA_LOSS and "corrupt" in (e.details() or "")
    assert_store_clean(d)
    other = Image.busybox(labels={"t": "corrupt-manifest"})
    digest = push_image(reg, "bad/manifest", "1", other)
    corrupt_manifest(reg, digest)
    e = rpc_error(pull, d, f"{reg.host}/bad/manifest@{digest}")
    assert e.code() == grpc.StatusCode.DATA_LOSS and digest in (e.details() or "")
    assert_store_clean(d)


def test_config_that_lies_about_diff_ids(
    make_daemon: Callable[..., Daemon], registry: Registry
) -> None:
    layer = Layer()
    layer.add_file("f", b"x")
    image = Image(layers=[layer.build()], diff_ids=["sha256:" + "1" * 64],
                  labels={"t": "lies"})
    push_image(registry, "bad/diffid", "1", image)
    d = make_daemon(insecure_conf(registry))
    e = rpc_error(pull, d, registry.ref("bad/diffid", "1"))
    assert e.code() == grpc.StatusCode.DATA_LOSS and "diff" in (e.details() or "")
    assert_store_clean(d)


def _hostile(kind: str, victim: Path) -> Layer:
    layer = Layer()

    def entry(name: str, type_: bytes = tarfile.REGTYPE, link: str = "",
              data: bytes = b"pwned") -> None:
        info = tarfile.TarInfo(name)
        info.type = type_
        info.linkname = link
        layer.add_tarinfo(info, data if type_ == tarfile.REGTYPE else None)

    if kind == "dotdot":
        entry("../../../../../../../" + str(victim).lstrip("/") + "/dotdot")
    elif kind == "absolute":
        entry(str(victim / "absolute"))
    elif kind == "symlink-abs":
        entry("x", tarfile.SYMTYPE, str(victim))
        entry("x/symlink-abs")
    elif kind == "symlink-rel":
        entry("y", tarfile.SYMTYPE, "../../../../../../../../" + str(victim).lstrip("/"))
        entry("y/symlink-rel")
    elif kind == "hardlink-abs":
        entry("passwd", tarfile.LNKTYPE, "/etc/passwd")
    elif kind == "hardlink-dotdot":
        entry("h", tarfile.LNKTYPE, "../../../../../etc/passwd")
    return layer


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink-abs", "symlink-rel",
                                  "hardlink-abs", "hardlink-dotdot"])
def test_hostile_layers_fail_and_write_nothing_outside(
    make_daemon: Callable[..., Daemon], registry: Registry, tmp_path: Path, kind: str
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    passwd_links = os.stat("/etc/passwd").st_nlink
    image = Image(layers=[_hostile(kind, victim).build()], labels={"t": kind})
    push_image(registry, f"hostile/{kind}", "1", image)
    d = make_daemon(insecure_conf(registry))
    e = rpc_error(pull, d, registry.ref(f"hostile/{kind}", "1"))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
    assert image.layers[0].digest in (e.details() or "") or "layer" in (e.details() or "")
    assert list(victim.iterdir()) == []
    assert os.stat("/etc/passwd").st_nlink == passwd_links
    assert_store_clean(d)


def test_stalled_pull_fails_then_resumes(
    make_daemon: Callable[..., Daemon], registry: Registry
) -> None:
    big = Layer()
    big.add_file("blob", os.urandom(2 << 20))
    image = Image(layers=[big.build("none")], labels={"t": "stall"})
    push_image(registry, "slow/app", "1", image)
    with StallProxy(registry) as proxy:
        proxy.stall = True
        d = make_daemon(insecure_conf(registry) + f'[[registry]]\nlocation = "{proxy.host}"\n'
                        "insecure = true\n", "[image]\npull_progress_timeout = 1\n")
        ref = f"{proxy.host}/slow/app:1"
        e = rpc_error(pull, d, ref)
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "pull_progress_timeout" in (e.details() or "")
        assert not d.images.ListImages(pb.ListImagesRequest()).images
        partial = list((d.root / "images/ingest").iterdir())
        assert len(partial) == 1 and partial[0].stat().st_size > 0
        proxy.stall = False
        assert pull(d, ref).startswith("sha256:")
        blob_requests = [r for r in proxy.requests if image.layers[0].digest in r[0]]
        assert blob_requests[-1][1].startswith("bytes=") and blob_requests[-1][1] != "bytes=0-"
        assert list((d.root / "images/ingest").iterdir()) == []


def test_kill9_during_pull_leaves_no_half_image(
    make_daemon: Callable[..., Daemon], registry: Registry
) -> None:
    big = Layer()
    big.add_file("blob", os.urandom(2 << 20))
    image = Image(layers=[*Image.busybox().layers, big.build("none")], labels={"t": "kill"})
    push_image(registry, "slow/kill", "1", image)
    with StallProxy(registry) as proxy:
        proxy.stall = True
        d = make_daemon(f'[[registry]]\nlocation = "{proxy.host}"\ninsecure = true\n')
        errors: list[BaseException] = []

        def bg() -> None:
            try:
                pull(d, f"{proxy.host}/slow/kill:1")
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=bg)
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            image.layers[1].digest in path for path, _ in proxy.requests
        ):
            time.sleep(0.05)
        time.sleep(0.3)
        d.kill9()
        t.join()
        assert errors
        d.start()
        assert not d.images.ListImages(pb.ListImagesRequest()).images
        assert not list((d.root / "images/layers").glob(".tmp-*"))
        assert layer_dirs(d) == set()  # the busybox layer had no image: collected
        proxy.stall = False
        assert pull(d, f"{proxy.host}/slow/kill:1").startswith("sha256:")
