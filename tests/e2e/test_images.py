"""ImageService end to end: the daemon from its CLI, real registries, the generated client."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.fixtures.daemon import Daemon
from tests.fixtures.oci import Image, Layer, multiplatform_entries, push_image, push_index
from tests.fixtures.registry import Registry


def insecure_conf(*registries: Registry, search: bool = True) -> str:
    hosts = [r.host for r in registries]
    text = f"unqualified-search-registries = {json.dumps(hosts)}\n" if search else ""
    for host in hosts:
        text += f'[[registry]]\nlocation = "{host}"\ninsecure = true\n'
    return text


def pull(d: Daemon, ref: str, **auth: str) -> str:
    req = pb.PullImageRequest(image=pb.ImageSpec(image=ref), auth=pb.AuthConfig(**auth))
    return str(d.images.PullImage(req, timeout=120).image_ref)


def status(d: Daemon, ref: str, verbose: bool = False) -> pb.ImageStatusResponse:
    return d.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref),
                                                      verbose=verbose))


def remove(d: Daemon, ref: str) -> None:
    d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))


def rpc_error(fn: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value


def layer_dirs(d: Daemon) -> set[str]:
    return {p.name for p in (d.root / "images/layers").iterdir()}


def blob_gets(reg: Registry, digest: str) -> int:
    """How many times the registry served (or started serving) a blob."""
    return sum(1 for line in reg.log_path.read_text(errors="replace").splitlines()
               if f"/blobs/{digest}" in line and "response completed" in line
               and "GET" in line)


@pytest.fixture
def daemon(tmp_path: Path, registry: Registry) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "d", registries_conf_text=insecure_conf(registry)).start()
    yield d
    d.stop()


@pytest.mark.parametrize(("fmt", "compression"), [
    ("docker", "gzip"), ("oci", "gzip"), ("oci", "zstd"), ("oci", "none"), ("docker", "zstd"),
])
def test_pull_by_tag_formats_and_compressions(
    daemon: Daemon, registry: Registry, fmt: str, compression: str
) -> None:
    image = Image.busybox(compression, labels={"fmt": fmt})  # type: ignore[arg-type]
    repo = f"e2e/fmt-{fmt}-{compression}"
    digest = push_image(registry, repo, "v1", image, fmt=fmt)  # type: ignore[arg-type]
    ref = pull(daemon, registry.ref(repo, "v1"))
    config_digest = image.config_blob(fmt).digest  # type: ignore[arg-type]
    assert ref == config_digest
    img = status(daemon, ref).image
    assert img.id == ref
    assert list(img.repo_tags) == [f"{registry.host}/{repo}:v1"]
    assert list(img.repo_digests) == [f"{registry.host}/{repo}@{digest}"]
    assert img.size > 0
    layer = daemon.root / "images/layers" / image.layers[0].diff_id.split(":")[1]
    assert (layer / "bin/busybox").is_file()


def test_pull_by_digest_and_short_name_and_lookups(daemon: Daemon, registry: Registry) -> None:
    image = Image.busybox(user="1000", labels={"t": "lookups"})
    digest = push_image(registry, "busybox", "latest", image)
    # By digest: no tag is recorded, the digest reference is.
    ref = pull(daemon, f"{registry.host}/busybox@{digest}")
    img = status(daemon, ref).image
    assert list(img.repo_tags) == []
    assert list(img.repo_digests) == [f"{registry.host}/busybox@{digest}"]
    assert img.uid.value == 1000 and img.username == ""
    # A short name resolves through unqualified-search-registries and gets :latest.
    assert pull(daemon, "busybox") == ref
    img = status(daemon, ref).image
    assert list(img.repo_tags) == [f"{registry.host}/busybox:latest"]
    # Every way of naming the image finds it.
    for name in (ref, ref.removeprefix("sha256:"), ref[:19], ref[7:19], "busybox",
                 "busybox:latest", f"{registry.host}/busybox",
                 f"{registry.host}/busybox@{digest}"):
        assert status(daemon, name).image.id == ref, name
    # Unknown images are an empty answer, not an error.
    assert not status(daemon, "nothing-here:1").HasField("image")
    assert not status(daemon, "sha256:" + "0" * 64).HasField("image")
    verbose = status(daemon, ref, verbose=True)
    info = json.loads(verbose.info["info"])
    assert info["imageSpec"]["config"]["User"] == "1000"
    assert info["imageSpec"]["config"]["Labels"] == {"t": "lookups"}
    assert info["layers"] == [image.layers[0].diff_id]


def test_list_stream_filter_and_fsinfo(daemon: Daemon, registry: Registry) -> None:
    push_image(registry, "e2e/list-a", "1", Image.busybox(labels={"n": "a"}))
    push_image(registry, "e2e/list-b", "1", Image.busybox(labels={"n": "b"}))
    a = pull(daemon, registry.ref("e2e/list-a", "1"))
    b = pull(daemon, registry.ref("e2e/list-b", "1"))
    listed = {i.id for i in daemon.images.ListImages(pb.ListImagesRequest()).images}
    assert listed == {a, b}
    streamed = {i.id for r in daemon.images.StreamImages(pb.StreamImagesRequest())
                for i in r.images}
    assert streamed == listed
    flt = pb.ImageFilter(image=pb.ImageSpec(image=registry.ref("e2e/list-b", "1")))
    only = daemon.images.ListImages(pb.ListImagesRequest(filter=flt)).images
    assert [i.id for i in only] == [b]
    flt = pb.ImageFilter(image=pb.ImageSpec(image="absent:1"))
    assert not daemon.images.ListImages(pb.ListImagesRequest(filter=flt)).images
    fs = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest())
    (image_fs,) = fs.image_filesystems
    assert image_fs.fs_id.mountpoint == str(daemon.root / "images")
    assert image_fs.used_bytes.value > 1_000_000  # busybox is ~1-2 MB unpacked
    assert image_fs.inodes_used.value > 10 and image_fs.timestamp > 0
    (container_fs,) = fs.container_filesystems
    assert container_fs.fs_id.mountpoint == str(daemon.root / "overlay")


def test_remove_by_tag_then_id_shared_layers_and_gc(daemon: Daemon, registry: Registry) -> None:
    base = Image.busybox(labels={"t": "rm"})
    extra = Layer()
    extra.add_file("etc/extra", b"x\n")
    top = Image(layers=[*base.layers, extra.build("gzip")], labels={"t": "rm2"})
    push_image(registry, "e2e/rm", "one", base)
    push_image(registry, "e2e/rm", "two", base)
    push_image(registry, "e2e/rm2", "1", top)
    one = pull(daemon, registry.ref("e2e/rm", "one"))
    assert pull(daemon, registry.ref("e2e/rm", "two")) == one
    other = pull(daemon, registry.ref("e2e/rm2", "1"))
    base_layer = base.layers[0].diff_id.split(":")[1]
    assert layer_dirs(daemon) == {base_layer, top.layers[1].diff_id.split(":")[1]}
    # By tag: only that tag goes while another name is left.
    remove(daemon, registry.ref("e2e/rm", "one"))
    img = status(daemon, one).image
    assert list(img.repo_tags) == [registry.ref("e2e/rm", "two")]
    # Removing the last tag removes the image; its layer stays, used by the other image.
    remove(daemon, registry.ref("e2e/rm", "two"))
    assert not status(daemon, one).HasField("image")
    assert layer_dirs(daemon) == {base_layer, top.layers[1].diff_id.split(":")[1]}
    remove(daemon, registry.ref("e2e/rm", "two"))  # idempotent
    # By id: the image and every name of it; now nothing uses the layers.
    remove(daemon, other)
    remove(daemon, other)
    assert not daemon.images.ListImages(pb.ListImagesRequest()).images
    assert layer_dirs(daemon) == set()
    assert list((daemon.root / "images/blobs/sha256").iterdir()) == []
    assert list((daemon.root / "images/records").iterdir()) == []


def test_retag_moves_the_tag(daemon: Daemon, registry: Registry) -> None:
    push_image(registry, "e2e/retag", "latest", Image.busybox(labels={"v": "1"}))
    first = pull(daemon, registry.ref("e2e/retag"))
    push_image(registry, "e2e/retag", "latest", Image.busybox(labels={"v": "2"}))
    second = pull(daemon, registry.ref("e2e/retag"))
    assert first != second
    assert list(status(daemon, first).image.repo_tags) == []  # kept untagged, as CRI-O does
    assert list(status(daemon, second).image.repo_tags) == [registry.ref("e2e/retag")]


def test_multiplatform_index_selects_this_machine(daemon: Daemon, registry: Registry) -> None:
    entries = multiplatform_entries(Image.busybox(labels={"t": "index"}))
    for fmt in ("oci", "docker"):
        index_digest = push_index(registry, f"e2e/multi-{fmt}", "1", entries, fmt=fmt)  # type: ignore[arg-type]
        ref = pull(daemon, registry.ref(f"e2e/multi-{fmt}", "1"))
        native = entries[0][0]
        assert ref == native.config_blob(fmt).digest  # type: ignore[arg-type]
        img = status(daemon, ref).image
        assert f"{registry.host}/e2e/multi-{fmt}@{index_digest}" in img.repo_digests


def test_images_survive_restart_and_kill(daemon: Daemon, registry: Registry) -> None:
    push_image(registry, "e2e/persist", "1", Image.busybox(labels={"t": "persist"}))
    ref = pull(daemon, registry.ref("e2e/persist", "1"))
    before = status(daemon, ref).image
    daemon.kill9()
    daemon.start()
    assert status(daemon, ref).image == before
    daemon.restart()
    assert status(daemon, ref).image == before


def test_layer_dirs_are_in_overlay_form(daemon: Daemon, registry: Registry) -> None:
    lower = Layer()
    lower.add_dir("data")
    lower.add_file("data/old", b"old")
    lower.add_file("gone", b"bye")
    lower.add_file("bin/su", b"#!", mode=0o4755)
    lower.add_dir("tmp", mode=0o1777)
    upper = Layer()
    upper.add_opaque("data")
    upper.add_file("data/new", b"new")
    upper.add_whiteout("gone")
    upper.add_file("hl-target", b"same")
    upper.add_hardlink("hl-link", "hl-target")
    upper.add_symlink("abs-link", "/etc/passwd")
    image = Image(layers=[*Image.busybox().layers, lower.build("gzip"), upper.build("zstd")])
    push_image(registry, "e2e/overlay", "1", image, fmt="oci")
    pull(daemon, registry.ref("e2e/overlay", "1"))
    low = daemon.root / "images/layers" / image.layers[1].diff_id.split(":")[1]
    up = daemon.root / "images/layers" / image.layers[2].diff_id.split(":")[1]
    assert stat.S_IMODE((low / "bin/su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((low / "tmp").stat().st_mode) == 0o1777
    assert os.getxattr(up / "data", "trusted.overlay.opaque") == b"y"
    wh = (up / "gone").lstat()
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert (up / "hl-link").stat().st_ino == (up / "hl-target").stat().st_ino
    assert os.readlink(up / "abs-link") == "/etc/passwd"


def test_concurrent_pulls_share_one_download(daemon: Daemon, registry: Registry) -> None:
    big = Layer()
    big.add_file("blob", os.urandom(8 << 20))
    image = Image(layers=[*Image.busybox().layers, big.build("gzip")])
    push_image(registry, "e2e/dedupe", "1", image)
    results: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(pull(daemon, registry.ref("e2e/dedupe", "1")))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(results) == 4
    assert blob_gets(registry, image.layers[1].digest) == 1
    # A second image that shares the busybox layer does not fetch it again.
    gets = blob_gets(registry, image.layers[0].digest)
    extra = Layer()
    extra.add_file("x", b"x")
    push_image(registry, "e2e/dedupe2", "1", Image(layers=[image.layers[0], extra.build()]))
    pull(daemon, registry.ref("e2e/dedupe2", "1"))
    assert blob_gets(registry, image.layers[0].digest) == gets


def test_bad_requests_get_clear_codes(daemon: Daemon, registry: Registry) -> None:
    e = rpc_error(pull, daemon, "")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "image.image" in (e.details() or "")
    e = rpc_error(pull, daemon, "UPPER/Case:tag")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid image reference" in (e.details() or "")
    e = rpc_error(pull, daemon, registry.ref("e2e/never-pushed", "1"))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "never-pushed" in (e.details() or "")
    e = rpc_error(remove, daemon, "")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    e = rpc_error(status, daemon, " ")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    remove(daemon, "never:pulled")  # idempotent
