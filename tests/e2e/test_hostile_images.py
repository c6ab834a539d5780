"""The hostile corpus: images and registries built to break a pull, each against the real
daemon started from its CLI.

Hostile *images* are pushed to the real registry (Debian's docker-registry); hostile
*registries* are :class:`tests.fixtures.hostile_registry.HostileRegistry` servers on
loopback. Every case asserts the exact gRPC code and a message naming the thing (the layer's
digest, the manifest, the limit's config key), then that the store is as clean as before
the pull: no image record, no blob, ingest or layer file, no unpack helper left, no mount,
nothing written outside the layer directory, the same ImageFsInfo usage; and the daemon
still runs. Cases the runtime accepts on purpose (device nodes as root, setuid bits, a
hardlink to a symlink) check what they unpack to, then remove the image and check the same.

One daemon serves the whole module, configured with small bounds::

    max_layer_size = 8 MiB, max_layer_entries = 2000, max_manifest_size = 2 MiB,
    pull_progress_timeout = 2 s
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_images import insecure_conf, pull, rpc_error
from tests.fixtures.daemon import MIB, Daemon
from tests.fixtures.hostile_registry import (
    HostileRegistry,
    Sent,
    endless,
    redirect,
    respond,
    stall_before_headers,
)
from tests.fixtures.oci import Compression, Image, Layer, push_image
from tests.fixtures.procs import has_arg, pids_where
from tests.fixtures.registry import Registry

MAX_LAYER = 8 * MIB
MAX_ENTRIES = 2000
MAX_MANIFEST = 2 * MIB
STALL_SECONDS = 2

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


# -- the daemon and the store's state ------------------------------------------------------


@dataclass
class Env:
    daemon: Daemon
    registry: Registry
    main: HostileRegistry
    other: HostileRegistry
    victim: Path
    baseline: tuple[set[tuple[str, str, int]], tuple[int, int]]

    @property
    def d(self) -> Daemon:
        return self.daemon


def store_files(d: Daemon) -> set[tuple[str, str, int]]:
    """Every path under the image store: (relative path, kind, size of files)."""
    root = d.root / "images"
    found: set[tuple[str, str, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            found.add((os.path.relpath(path, root), kind, st.st_size if kind == "f" else 0))
    return found


def fs_usage(d: Daemon) -> tuple[int, int]:
    (fs,) = d.images.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems
    return fs.used_bytes.value, fs.inodes_used.value


def unpack_helpers(d: Daemon) -> list[int]:
    """Unpack helper processes working for this daemon."""
    return pids_where(lambda a: b"moorage.image.unpack" in a and has_arg(a, d.root))


def mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def assert_clean(env: Env) -> None:
    d = env.d
    assert d.proc is not None and d.proc.poll() is None, f"daemon died:\n{d.log_tail()}"
    assert not d.images.ListImages(pb.ListImagesRequest()).images
    files, usage = env.baseline
    assert store_files(d) == files
    assert fs_usage(d) == usage
    assert unpack_helpers(d) == []
    assert mounts_under(d.base) == []
    assert list(env.victim.iterdir()) == []
    for path in ("/evil", "/pwned", "/etc/evil", "/etc/pwned", "/dotdot"):
        assert not os.path.lexists(path), path


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[HostileRegistry, HostileRegistry]]:
    with HostileRegistry() as main, HostileRegistry() as other:
        yield main, other


@pytest.fixture(scope="module")
def module_env(
    tmp_path_factory: pytest.TempPathFactory,
    registry: Registry,
    servers: tuple[HostileRegistry, HostileRegistry],
) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("hostile")
    victim = base / "victim"
    victim.mkdir()
    main, other = servers
    conf = insecure_conf(registry, search=False)
    for server in servers:
        conf += f'[[registry]]\nlocation = "{server.host}"\ninsecure = true\n'
    d = Daemon(
        base / "d", registries_conf_text=conf,
        config_text=(
            f"[image]\nmax_layer_size = {MAX_LAYER}\nmax_layer_entries = {MAX_ENTRIES}\n"
            f"max_manifest_size = {MAX_MANIFEST}\npull_progress_timeout = {STALL_SECONDS}\n"
        ),
    ).start()
    try:
        yield Env(d, registry, main, other, victim, (store_files(d), fs_usage(d)))
    finally:
        d.stop()


@pytest.fixture
def env(module_env: Env) -> Iterator[Env]:
    module_env.main.reset()
    module_env.other.reset()
    passwd_links = os.stat("/etc/passwd").st_nlink
    yield module_env
    assert os.stat("/etc/passwd").st_nlink == passwd_links


def expect_failure(env: Env, ref: str, code: grpc.StatusCode, *fragments: str) -> str:
    e = rpc_error(pull, env.d, ref)
    details = e.details() or ""
    assert e.code() == code, details
    for fragment in fragments:
        assert fragment in details, (fragment, details)
    return details


# -- hostile images (pushed to the real registry) ------------------------------------------


def _raw(layer: Layer, name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
         data: bytes = b"pwned", pax: dict[str, str] | None = None) -> Layer:
    """An entry exactly as given (names with ``..`` or a leading ``/`` stay)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    if pax:
        info.pax_headers = pax
    return layer.add_tarinfo(info, data if kind == tarfile.REGTYPE else None)


def _check_hardlink_to_symlink(layer_dir: Path, victim: Path) -> None:
    # A link to a symlink links the symlink itself (as tar does): the link stays inside the
    # layer and is resolved in the container, never on the host.
    link = layer_dir / "h"
    assert stat.S_ISLNK(link.lstat().st_mode) and os.readlink(link) == "/etc/passwd"
    assert link.lstat().st_ino == (layer_dir / "s").lstat().st_ino
    assert link.lstat().st_nlink == 2


def _check_devices(layer_dir: Path, victim: Path) -> None:
    # As root, containers/storage and containerd create device nodes from layers (only
    # rootless unpacking skips them); the device cgroup decides what a container may open.
    mem = (layer_dir / "dev/mem-copy").lstat()
    assert stat.S_ISCHR(mem.st_mode) and os.major(mem.st_rdev) == 1 and os.minor(mem.st_rdev) == 1
    loop = (layer_dir / "dev/loop-copy").lstat()
    assert stat.S_ISBLK(loop.st_mode) and os.major(loop.st_rdev) == 7
    assert stat.S_ISFIFO((layer_dir / "run/fifo").lstat().st_mode)


def _check_setuid(layer_dir: Path, victim: Path) -> None:
    # Kept, as docker, containerd and CRI-O keep them: no_new_privs and the user decide.
    assert stat.S_IMODE((layer_dir / "bin/suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((layer_dir / "bin/sgid").stat().st_mode) == 0o2755


@dataclass(frozen=True)
class LayerCase:
    id: str
    build: Callable[[Path], Layer]
    #: None: the layer is accepted, and ``check`` looks at what it unpacked to.
    code: grpc.StatusCode | None
    reason: str = ""
    compression: Compression = "gzip"
    check: Callable[[Path, Path], None] | None = None


def _many_entries(victim: Path) -> Layer:
    layer = Layer()
    for i in range(MAX_ENTRIES + 500):
        layer.add_file(f"f{i}")
    return layer


def _bomb(victim: Path) -> Layer:
    # 64 MiB of zeros: about 64 KiB gzipped, a few KiB as zstd.
    return Layer().add_file("bomb", bytes(64 * MIB))


LAYER_CASES = [
    LayerCase("dotdot", lambda v: _raw(Layer(), "../" * 8 + str(v).lstrip("/") + "/dotdot"),
              grpc.StatusCode.FAILED_PRECONDITION, "'..' component"),
    LayerCase("absolute", lambda v: _raw(Layer(), str(v / "absolute")),
              grpc.StatusCode.FAILED_PRECONDITION, "is absolute"),
    LayerCase("symlink-then-write-through",
              lambda v: _raw(_raw(Layer(), "a", tarfile.SYMTYPE, "/etc"), "a/passwd"),
              grpc.StatusCode.FAILED_PRECONDITION, "symlink escape"),
    LayerCase("symlink-to-victim-dir",
              lambda v: _raw(_raw(Layer(), "x", tarfile.SYMTYPE, str(v)), "x/pwned"),
              grpc.StatusCode.FAILED_PRECONDITION, "symlink escape"),
    LayerCase("symlink-dotdot-chain",
              lambda v: _raw(_raw(_raw(Layer(), "a", tarfile.SYMTYPE, ".."),
                                  "b", tarfile.SYMTYPE, "a/.."), "b/pwned"),
              grpc.StatusCode.FAILED_PRECONDITION, "symlink escape"),
    LayerCase("symlink-dotdot-in-subdir",
              lambda v: _raw(Layer().add_dir("d").add_symlink("d/up", "../../../.."),
                             "d/up/pwned"),
              grpc.StatusCode.FAILED_PRECONDITION, "symlink escape"),
    LayerCase("hardlink-absolute",
              lambda v: _raw(Layer(), "passwd", tarfile.LNKTYPE, "/etc/passwd"),
              grpc.StatusCode.FAILED_PRECONDITION, "hardlink target '/etc/passwd' is absolute"),
    LayerCase("hardlink-dotdot",
              lambda v: _raw(Layer(), "h", tarfile.LNKTYPE, "../../../../etc/passwd"),
              grpc.StatusCode.FAILED_PRECONDITION, "'..' component"),
    LayerCase("hardlink-through-symlink",
              lambda v: _raw(_raw(Layer(), "x", tarfile.SYMTYPE, "/etc"),
                             "h", tarfile.LNKTYPE, "x/passwd"),
              grpc.StatusCode.FAILED_PRECONDITION, "symlink escape"),
    LayerCase("hardlink-to-symlink-pointing-out",
              lambda v: _raw(_raw(Layer(), "s", tarfile.SYMTYPE, "/etc/passwd"),
                             "h", tarfile.LNKTYPE, "s"),
              None, check=_check_hardlink_to_symlink),
    LayerCase("whiteout-dot", lambda v: _raw(Layer(), ".wh..", data=b""),
              grpc.StatusCode.FAILED_PRECONDITION, "names no file"),
    LayerCase("whiteout-dotdot", lambda v: _raw(Layer(), "etc/.wh...", data=b""),
              grpc.StatusCode.FAILED_PRECONDITION, "names no file"),
    LayerCase("whiteout-parent-escape", lambda v: _raw(Layer(), "../.wh.passwd", data=b""),
              grpc.StatusCode.FAILED_PRECONDITION, "'..' component"),
    LayerCase("whiteout-through-symlink",
              lambda v: _raw(_raw(Layer(), "s", tarfile.SYMTYPE, str(v)), "s/.wh.x", data=b""),
              grpc.StatusCode.FAILED_PRECONDITION, "symlink escape"),
    LayerCase("device-nodes",
              lambda v: Layer().add_char_device("dev/mem-copy", 1, 1)
              .add_block_device("dev/loop-copy", 7, 0).add_fifo("run/fifo"),
              None, check=_check_devices),
    LayerCase("setuid-kept",
              lambda v: Layer().add_file("bin/suid", b"#!", mode=0o4755)
              .add_file("bin/sgid", b"#!", mode=0o2755),
              None, check=_check_setuid),
    LayerCase("many-entries", _many_entries, grpc.StatusCode.RESOURCE_EXHAUSTED,
              f"more than {MAX_ENTRIES} entries (max_layer_entries)", compression="zstd"),
    LayerCase("name-5000-bytes", lambda v: _raw(Layer(), "n" * 5000),
              grpc.StatusCode.FAILED_PRECONDITION, "File name too long"),
    LayerCase("path-4200-bytes", lambda v: _raw(Layer(), "d/" * 2100 + "f"),
              grpc.StatusCode.FAILED_PRECONDITION, "File name too long"),
    LayerCase("pax-path-escape",
              lambda v: _raw(Layer(), "benign", pax={"path": "../../../etc/evil"}),
              grpc.StatusCode.FAILED_PRECONDITION, "'..' component"),
    LayerCase("pax-absolute-path",
              lambda v: _raw(Layer(), "benign", pax={"path": "/etc/evil"}),
              grpc.StatusCode.FAILED_PRECONDITION, "is absolute"),
    LayerCase("pax-linkpath-escape",
              lambda v: _raw(Layer().add_file("ok", b"ok"), "h", tarfile.LNKTYPE, "ok",
                             pax={"linkpath": "/etc/shadow"}),
              grpc.StatusCode.FAILED_PRECONDITION, "hardlink target '/etc/shadow' is absolute"),
    LayerCase("pax-header-2mib",
              lambda v: _raw(Layer(), "f", pax={"comment": "x" * (2 * MIB)}),
              grpc.StatusCode.FAILED_PRECONDITION, "tar metadata header"),
    LayerCase("gzip-bomb", _bomb, grpc.StatusCode.RESOURCE_EXHAUSTED,
              f"larger than the limit of {MAX_LAYER} uncompressed bytes (max_layer_size)"),
    LayerCase("zstd-bomb", _bomb, grpc.StatusCode.RESOURCE_EXHAUSTED,
              f"larger than the limit of {MAX_LAYER} uncompressed bytes (max_layer_size)",
              compression="zstd"),
    LayerCase("declared-over-max-layer-size",
              lambda v: Layer().add_file("big", os.urandom(MAX_LAYER + MIB)),
              grpc.StatusCode.RESOURCE_EXHAUSTED, "compressed, over the limit",
              compression="none"),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_hostile_layer(env: Env, case: LayerCase) -> None:
    blob = case.build(env.victim).build(case.compression)
    image = Image(layers=[blob], labels={"hostile": case.id})
    repo = f"hostile/{case.id}"
    push_image(env.registry, repo, "1", image)
    ref = env.registry.ref(repo, "1")
    if case.code is None:
        image_id = pull(env.d, ref)
        assert case.check is not None and blob.diff_id is not None
        case.check(env.d.root / "images/layers" / blob.diff_id.split(":")[1], env.victim)
        env.d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))
    else:
        details = expect_failure(env, ref, case.code, case.reason)
        assert blob.digest in details  # names the layer
        assert len(details) < 4096, "a message stays short however long the entry's name"
    assert_clean(env)


# -- hostile registries --------------------------------------------------------------------


def small_image(label: str) -> Image:
    layer = Layer().add_file("hello", b"hello from a hostile registry\n")
    return Image(layers=[layer.build("gzip")], labels={"hostile-registry": label})


def index_doc(count: int, arch: Callable[[int], str]) -> bytes:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": "sha256:" + f"{i:064x}", "size": 1000,
             "platform": {"os": "linux", "architecture": arch(i)}}
            for i in range(count)
        ],
    }).encode()


def _manifest_json(image: Image) -> dict[str, Any]:
    return image.manifest_dict("docker")


@dataclass(frozen=True)
class RegistryCase:
    id: str
    #: Sets up the servers; returns the reference to pull.
    setup: Callable[[HostileRegistry, HostileRegistry], str]
    code: grpc.StatusCode
    reasons: tuple[str, ...]
    #: Checks what the servers saw (bounded retries, bodies left unread, ...).
    after: Callable[[HostileRegistry, HostileRegistry], None] | None = None


def _oversized_manifest(no_length: bool) -> Callable[[HostileRegistry, HostileRegistry], str]:
    def setup(main: HostileRegistry, other: HostileRegistry) -> str:
        body = b'{"schemaVersion": 2, "pad": "' + b"x" * (3 * MIB) + b'"}'
        main.routes[main.manifest_path("evil/big", "1")] = respond(
            body, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            no_length=no_length)
        return main.ref("evil/big")
    return setup


def _index_100k(main: HostileRegistry, other: HostileRegistry) -> str:
    main.serve_manifest("evil/index", "1", index_doc(100_000, lambda i: f"arch{i}"),
                        "application/vnd.oci.image.index.v1+json")
    return main.ref("evil/index")


def _index_many_platforms(main: HostileRegistry, other: HostileRegistry) -> str:
    # Under the size limit, but thousands of platforms, none of them this machine's.
    main.serve_manifest("evil/platforms", "1", index_doc(5000, lambda i: f"arch{i}"),
                        "application/vnd.oci.image.index.v1+json")
    return main.ref("evil/platforms")


def _config_declared_huge(main: HostileRegistry, other: HostileRegistry) -> str:
    image = small_image("config-huge")
    doc = _manifest_json(image)
    doc["config"]["size"] = 100 * MIB
    main.serve_image("evil/config-huge", "1", image, doc)
    return main.ref("evil/config-huge")


def _no_config_fetched(main: HostileRegistry, other: HostileRegistry) -> None:
    assert not [p for p in main.paths_requested() if "/blobs/" in p]


def _config_longer_than_declared(main: HostileRegistry, other: HostileRegistry) -> str:
    image = small_image("config-long")
    main.serve_image("evil/config-long", "1", image)
    config = image.config_blob("docker")
    main.routes[main.blob_path("evil/config-long", config.digest)] = respond(
        config.data + b" " * 4096)
    return main.ref("evil/config-long")


def _bad_manifest_answer(main: HostileRegistry, name: str, reference: str = "1", *,
                         headers: dict[str, str] | None = None, extra_length: int = 0,
                         **answer: Any) -> str:
    """``evil/<name>:1`` served well, except that its manifest, asked for by
    ``reference``, is answered with ``respond(manifest, headers=..., **answer)``, whose
    Content-Length claims ``extra_length`` bytes more than it has."""
    image = small_image(name)
    repo = f"evil/{name}"
    main.serve_image(repo, "1", image)
    data = json.dumps(_manifest_json(image)).encode()
    main.routes[main.manifest_path(repo, reference)] = respond(
        data, headers={"Content-Type": image.manifest_media_type("docker"), **(headers or {})},
        length=len(data) + extra_length if extra_length else None, **answer)
    return main.ref(repo, reference)


def _manifest_header_digest_lies(main: HostileRegistry, other: HostileRegistry) -> str:
    return _bad_manifest_answer(main, "header-digest",
                                headers={"Docker-Content-Digest": "sha256:" + "e" * 64})


def _manifest_by_digest_lies(main: HostileRegistry, other: HostileRegistry) -> str:
    return _bad_manifest_answer(main, "by-digest", "sha256:" + "d" * 64)


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


def _config_digest_lies(main: HostileRegistry, other: HostileRegistry) -> str:
    image = small_image("config-digest")
    main.serve_image("evil/config-digest", "1", image)
    config = image.config_blob("docker")
    main.routes[main.blob_path("evil/config-digest", config.digest)] = respond(
        _flip(config.data))
    return main.ref("evil/config-digest")


def _layer_digest_lies(main: HostileRegistry, other: HostileRegistry) -> str:
    image = small_image("layer-digest")
    main.serve_image("evil/layer-digest", "1", image)
    layer = image.layers[0]
    main.routes[main.blob_path("evil/layer-digest", layer.digest)] = respond(_flip(layer.data))
    return main.ref("evil/layer-digest")


def _manifest_truncated(main: HostileRegistry, other: HostileRegistry) -> str:
    return _bad_manifest_answer(main, "manifest-cut", extra_length=1000)


def _big_layer_image(label: str) -> Image:
    layer = Layer().add_file("data", os.urandom(256 * 1024))
    return Image(layers=[layer.build("gzip")], labels={"hostile-registry": label})


def _layer_truncated(main: HostileRegistry, other: HostileRegistry) -> str:
    image = _big_layer_image("layer-cut")
    main.serve_image("evil/layer-cut", "1", image)
    layer = image.layers[0]
    main.routes[main.blob_path("evil/layer-cut", layer.digest)] = respond(
        layer.data, cut=layer.size // 2)
    return main.ref("evil/layer-cut")


def _layer_retries_bounded(main: HostileRegistry, other: HostileRegistry) -> None:
    blob_gets = [p for p in main.paths_requested() if "/blobs/" in p]
    # One config fetch, then the layer: a few attempts, never an endless loop.
    assert 2 <= len(blob_gets) <= 4, blob_gets


def _config_truncated(main: HostileRegistry, other: HostileRegistry) -> str:
    image = small_image("config-cut")
    main.serve_image("evil/config-cut", "1", image)
    config = image.config_blob("docker")
    main.routes[main.blob_path("evil/config-cut", config.digest)] = respond(
        config.data, cut=10)
    return main.ref("evil/config-cut")


def _redirect_loop(main: HostileRegistry, other: HostileRegistry) -> str:
    path = main.manifest_path("evil/loop", "1")
    main.routes[path] = redirect(f"http://{main.host}{path}", status=302)
    return main.ref("evil/loop")


def _loop_bounded(main: HostileRegistry, other: HostileRegistry) -> None:
    assert 1 < len(main.requests) + len(other.requests) <= 12


def _redirect_ping_pong(main: HostileRegistry, other: HostileRegistry) -> str:
    path = main.manifest_path("evil/pingpong", "1")
    main.routes[path] = redirect(f"http://{other.host}{path}")
    other.routes[path] = redirect(f"http://{main.host}{path}")
    return main.ref("evil/pingpong")


def _redirect_not_http(main: HostileRegistry, other: HostileRegistry) -> str:
    path = main.manifest_path("evil/file-redirect", "1")
    main.routes[path] = redirect("file:///etc/passwd")
    return main.ref("evil/file-redirect")


def _stall_after_headers(main: HostileRegistry, other: HostileRegistry) -> str:
    return _bad_manifest_answer(main, "stall", cut=20, stall=True)


def _stall_before_headers(main: HostileRegistry, other: HostileRegistry) -> str:
    main.routes[main.manifest_path("evil/silent", "1")] = stall_before_headers()
    return main.ref("evil/silent")


_SENT = Sent()


def _huge_error_body(status: int) -> Callable[[HostileRegistry, HostileRegistry], str]:
    def setup(main: HostileRegistry, other: HostileRegistry) -> str:
        _SENT.bytes = 0
        main.routes[main.manifest_path("evil/error-page", "1")] = endless(
            status, 1 << 30, _SENT, {"Content-Type": "text/html"})
        return main.ref("evil/error-page")
    return setup


def _error_body_unread(main: HostileRegistry, other: HostileRegistry) -> None:
    # The client hung up long before the declared GiB: it never reads an error body.
    assert _SENT.bytes < 256 * MIB


def _huge_header(main: HostileRegistry, other: HostileRegistry) -> str:
    main.routes[main.manifest_path("evil/header", "1")] = respond(
        b"{}", headers={"X-Padding": "h" * (100 * 1024)})
    return main.ref("evil/header")


def _many_headers(main: HostileRegistry, other: HostileRegistry) -> str:
    main.routes[main.manifest_path("evil/headers", "1")] = respond(
        b"{}", headers={f"X-H{i}": "v" for i in range(1000)})
    return main.ref("evil/headers")


def _garbage(body: bytes, media_type: str) -> Callable[[HostileRegistry, HostileRegistry], str]:
    def setup(main: HostileRegistry, other: HostileRegistry) -> str:
        main.serve_manifest("evil/garbage", "1", body, media_type)
        return main.ref("evil/garbage")
    return setup


def _wrong_manifest_type(main: HostileRegistry, other: HostileRegistry) -> str:
    image = small_image("manifest-type")
    doc = _manifest_json(image)
    doc["mediaType"] = "application/x-evil+json"
    main.serve_image("evil/manifest-type", "1", image, doc)
    return main.ref("evil/manifest-type")


def _wrong_layer_type(main: HostileRegistry, other: HostileRegistry) -> str:
    image = small_image("layer-type")
    doc = _manifest_json(image)
    doc["layers"][0]["mediaType"] = "application/x-evil"
    main.serve_image("evil/layer-type", "1", image, doc)
    return main.ref("evil/layer-type")


def _ten_thousand_layers(main: HostileRegistry, other: HostileRegistry) -> str:
    image = small_image("10k")
    doc = _manifest_json(image)
    layer = doc["layers"][0]
    doc["layers"] = [dict(layer, digest="sha256:" + f"{i:064x}") for i in range(10_000)]
    main.serve_image("evil/10k", "1", image, doc)
    return main.ref("evil/10k")


def _nothing_downloaded(main: HostileRegistry, other: HostileRegistry) -> None:
    assert not [p for p in main.paths_requested() if "/blobs/" in p]


S = grpc.StatusCode
REGISTRY_CASES = [
    RegistryCase("manifest-over-max-size", _oversized_manifest(False), S.RESOURCE_EXHAUSTED,
                 ("evil/big", "max_manifest_size")),
    RegistryCase("manifest-over-max-size-no-length", _oversized_manifest(True),
                 S.RESOURCE_EXHAUSTED, ("evil/big", "max_manifest_size")),
    RegistryCase("index-100k-entries", _index_100k, S.RESOURCE_EXHAUSTED,
                 ("evil/index", "max_manifest_size")),
    RegistryCase("index-5000-foreign-platforms", _index_many_platforms, S.NOT_FOUND,
                 ("evil/platforms", "no image for platform", "and 4990 more")),
    RegistryCase("config-declared-100mib", _config_declared_huge, S.RESOURCE_EXHAUSTED,
                 ("config sha256:", "max_manifest_size"), _no_config_fetched),
    RegistryCase("config-longer-than-declared", _config_longer_than_declared, S.DATA_LOSS,
                 ("blob sha256:", "more than")),
    RegistryCase("manifest-digest-header-lies", _manifest_header_digest_lies, S.DATA_LOSS,
                 ("evil/header-digest", "registry said sha256:" + "e" * 64)),
    RegistryCase("manifest-by-digest-lies", _manifest_by_digest_lies, S.DATA_LOSS,
                 ("evil/by-digest", "not sha256:" + "d" * 64)),
    RegistryCase("config-digest-lies", _config_digest_lies, S.DATA_LOSS,
                 ("blob sha256:", "corrupt")),
    RegistryCase("layer-digest-lies", _layer_digest_lies, S.DATA_LOSS,
                 ("blob sha256:", "corrupt")),
    RegistryCase("manifest-truncated", _manifest_truncated, S.DATA_LOSS,
                 ("evil/manifest-cut", "truncated")),
    RegistryCase("layer-truncated", _layer_truncated, S.DATA_LOSS, ("blob sha256:",),
                 _layer_retries_bounded),
    RegistryCase("config-truncated", _config_truncated, S.DATA_LOSS,
                 ("blob sha256:", "truncated")),
    RegistryCase("redirect-loop", _redirect_loop, S.UNAVAILABLE,
                 ("more than 10 redirects", "evil/loop"), _loop_bounded),
    RegistryCase("redirect-ping-pong", _redirect_ping_pong, S.UNAVAILABLE,
                 ("more than 10 redirects", "evil/pingpong"), _loop_bounded),
    RegistryCase("redirect-to-file-url", _redirect_not_http, S.UNAVAILABLE,
                 ("evil/file-redirect",)),
    RegistryCase("stall-after-headers", _stall_after_headers, S.DEADLINE_EXCEEDED,
                 ("evil/stall", "stalled")),
    RegistryCase("stall-before-headers", _stall_before_headers, S.DEADLINE_EXCEEDED,
                 ("evil/silent", "no answer")),
    RegistryCase("error-500-with-1gib-body", _huge_error_body(500), S.UNAVAILABLE,
                 ("answered 500", "evil/error-page"), _error_body_unread),
    RegistryCase("error-404-with-1gib-body", _huge_error_body(404), S.NOT_FOUND,
                 ("manifest unknown", "evil/error-page"), _error_body_unread),
    RegistryCase("header-100kib", _huge_header, S.UNAVAILABLE, ("evil/header",)),
    RegistryCase("1000-headers", _many_headers, S.UNAVAILABLE, ("evil/headers",)),
    RegistryCase("garbage-json", _garbage(b"\x00{not json at all", "application/json"),
                 S.INVALID_ARGUMENT, ("evil/garbage", "not valid JSON")),
    RegistryCase("json-not-an-object", _garbage(b"[1, 2, 3]", "application/json"),
                 S.INVALID_ARGUMENT, ("evil/garbage", "not a JSON object")),
    RegistryCase("manifest-wrong-media-type", _wrong_manifest_type, S.INVALID_ARGUMENT,
                 ("evil/manifest-type", "application/x-evil+json")),
    RegistryCase("layer-wrong-media-type", _wrong_layer_type, S.INVALID_ARGUMENT,
                 ("evil/layer-type", "layer 0", "unsupported layer media type",
                  "application/x-evil")),
    RegistryCase("manifest-with-10k-layers", _ten_thousand_layers, S.FAILED_PRECONDITION,
                 ("evil/10k", "10000 layers", "overlayfs"), _nothing_downloaded),
]


@pytest.mark.parametrize("case", REGISTRY_CASES, ids=[c.id for c in REGISTRY_CASES])
def test_hostile_registry(env: Env, case: RegistryCase) -> None:
    ref = case.setup(env.main, env.other)
    details = expect_failure(env, ref, case.code, *case.reasons)
    assert len(details) < 4096, "an error message must stay short whatever the registry sent"
    if case.after is not None:
        case.after(env.main, env.other)
    assert_clean(env)


def test_redirect_to_another_host_does_not_leak_credentials(env: Env) -> None:
    """A registry that redirects blob downloads to another host (a CDN, an object store)
    gets the credentials; the other host does not (as Go's client, so containerd and
    CRI-O, drop Authorization on a redirect to another origin)."""
    main, other = env.main, env.other
    image = small_image("cdn")
    main.serve_image("private/app", "1", image)
    for blob in (*image.layers, image.config_blob("docker")):
        path = main.blob_path("private/app", blob.digest)
        other.routes[f"/cdn/{blob.digest}"] = main.routes[path]
        main.routes[path] = redirect(f"http://{other.host}/cdn/{blob.digest}")
    main.basic_auth = ("alice", "s3cret")
    image_id = pull(env.d, main.ref("private/app"), username="alice", password="s3cret")
    assert image_id == image.config_blob("docker").digest
    authorized = [r for r in main.requests if "authorization" in r.headers]
    assert any("/blobs/" in r.path for r in authorized)
    assert len(other.requests) == 2
    assert all("authorization" not in r.headers for r in other.requests)
    env.d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))
    assert_clean(env)


def test_daemon_survives_the_corpus_and_still_pulls(env: Env) -> None:
    """After every hostile case, an ordinary image still pulls (and is removed again)."""
    image = Image(layers=[Layer().add_file("ok", b"fine").build("gzip")],
                  labels={"hostile": "control"})
    push_image(env.registry, "hostile/control", "1", image)
    image_id = pull(env.d, env.registry.ref("hostile/control", "1"))
    diff_id = image.layers[0].diff_id
    assert diff_id is not None
    layer = env.d.root / "images/layers" / diff_id.split(":")[1]
    assert (layer / "ok").read_bytes() == b"fine"
    env.d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))
    assert_clean(env)

