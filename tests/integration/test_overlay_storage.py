"""Container root filesystems on real overlayfs (root).

Layers are written by hand in overlay format (a whiteout is a 0:0 character device, an
opaque directory has ``trusted.overlay.opaque=y``), as the unpacker leaves them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from moorage.storage import ContainerStorage
from moorage.storage.overlay import _mount_points, link_name

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        "overlay" not in Path("/proc/filesystems").read_text(), reason="needs overlayfs"
    ),
]


def _mounted_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    return sorted(p for p in _mount_points() if p == prefix or p.startswith(prefix + "/"))


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[ContainerStorage]:
    s = ContainerStorage(tmp_path / "overlay")
    yield s
    # Whatever a failing test left mounted comes off.
    for point in reversed(_mounted_under(tmp_path)):
        subprocess.run(["umount", "-l", point], check=False)
    assert _mounted_under(tmp_path) == []


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    """Two layers: a base, and a top with a whiteout and an opaque directory."""
    base = tmp_path / "layers" / ("a" * 64)
    top = tmp_path / "layers" / ("b" * 64)
    for d in ("etc", "opaque/sub", "data", "bin"):
        (base / d).mkdir(parents=True)
    (base / "etc" / "hostname").write_text("base\n")
    (base / "etc" / "gone").write_text("deleted by the top layer\n")
    (base / "opaque" / "old").write_text("hidden by the opaque dir\n")
    (base / "opaque" / "sub" / "deep").write_text("hidden too\n")
    (base / "data" / "keep").write_text("kept\n")
    (base / "var").mkdir()
    (base / "var" / "run").symlink_to("/run")
    (base / "run").mkdir()
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "hostname").write_text("top\n")
    os.mknod(top / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
    (top / "opaque").mkdir()
    os.setxattr(top / "opaque", "trusted.overlay.opaque", b"y")
    (top / "opaque" / "new").write_text("from the top layer\n")
    top.chmod(0o755)
    return [base, top]


def test_union_whiteouts_opaque_and_writes(
    storage: ContainerStorage, layers: list[Path], tmp_path: Path
) -> None:
    fs = storage.create("c1", layers, volumes=["/vol/data", "/var/run/sock", "/data"])
    assert storage.is_mounted("c1")
    assert _mounted_under(tmp_path) == [str(fs.merged)]
    m = fs.merged
    assert (m / "etc" / "hostname").read_text() == "top\n"
    assert not (m / "etc" / "gone").exists()
    assert sorted(os.listdir(m / "opaque")) == ["new"]
    assert (m / "data" / "keep").read_text() == "kept\n"
    # Image volumes: made through the mounted view, so they land in upper and a path
    # through the image's /var/run -> /run symlink resolves inside the root filesystem.
    assert (m / "vol" / "data").is_dir() and (fs.upper / "vol" / "data").is_dir()
    assert (m / "run" / "sock").is_dir() and (fs.upper / "run" / "sock").is_dir()
    assert (m / "var" / "run").is_symlink()
    assert not Path("/run/sock").exists()
    assert not (fs.upper / "data").exists()  # already in the image: nothing made
    # Writes land in upper; the layers stay untouched.
    (m / "etc" / "hostname").write_text("written\n")
    (m / "newfile").write_bytes(b"x" * 100_000)
    (m / "data" / "keep").unlink()
    assert (fs.upper / "etc" / "hostname").read_text() == "written\n"
    assert (fs.upper / "newfile").stat().st_size == 100_000
    assert os.major((fs.upper / "data" / "keep").stat().st_rdev) == 0  # a new whiteout
    assert (layers[0] / "etc" / "hostname").read_text() == "base\n"
    assert (layers[1] / "etc" / "hostname").read_text() == "top\n"
    assert (layers[0] / "data" / "keep").exists()
    # Usage counts the writable layer only (allocated bytes, inodes).
    used, inodes = storage.usage("c1")
    assert used >= 100_000
    assert inodes >= 6  # vol, vol/data, run, run/sock, etc, etc/hostname, newfile, data, ...
    # Short links, relative mount options.
    assert sorted(os.listdir(storage.links)) == sorted(link_name(p) for p in layers)
    assert storage.list_ids() == ["c1"]

    storage.remove("c1")
    assert _mounted_under(tmp_path) == []
    assert not (storage.containers / "c1").exists()
    assert storage.list_ids() == []
    storage.remove("c1")  # idempotent
    assert storage.prune_links() == 2
    assert os.listdir(storage.links) == []


def test_root_dir_takes_the_top_layers_mode(storage: ContainerStorage, layers: list[Path]) -> None:
    layers[1].chmod(0o750)
    os.chown(layers[1], 123, 456)
    fs = storage.create("c1", layers)
    st = fs.merged.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 123, 456)
    storage.remove("c1")


def test_unmount_and_mount_again(storage: ContainerStorage, layers: list[Path]) -> None:
    fs = storage.create("c1", layers)
    (fs.merged / "mine").write_text("survives\n")
    storage.unmount("c1")
    assert not storage.is_mounted("c1")
    assert not (fs.merged / "mine").exists()
    storage.unmount("c1")  # idempotent
    # A reboot loses the links too: mount() makes them again from lower.json.
    for name in os.listdir(storage.links):
        os.unlink(storage.links / name)
    assert storage.mount("c1") == fs
    assert storage.mount("c1") == fs  # idempotent
    assert (fs.merged / "mine").read_text() == "survives\n"
    assert (fs.merged / "etc" / "hostname").read_text() == "top\n"
    assert not (fs.merged / "etc" / "gone").exists()
    storage.remove("c1")


def test_mount_with_a_layer_gone(storage: ContainerStorage, layers: list[Path]) -> None:
    storage.create("c1", layers)
    storage.unmount("c1")
    os.rename(layers[0], layers[0].with_name("moved"))
    with pytest.raises(FailedPrecondition, match="missing"):
        storage.mount("c1")
    storage.remove("c1")


def test_sixty_layers(storage: ContainerStorage, tmp_path: Path) -> None:
    layers = []
    for i in range(60):
        layer = tmp_path / "layers" / f"{i:064x}"
        layer.mkdir(parents=True)
        (layer / f"f{i}").write_text(str(i))
        (layer / "shared").write_text(str(i))
        layers.append(layer)
    fs = storage.create("c" * 64, layers)
    assert sorted(os.listdir(fs.merged)) == sorted(["shared", *(f"f{i}" for i in range(60))])
    assert (fs.merged / "shared").read_text() == "59"  # the top layer wins
    storage.remove("c" * 64)
    assert _mounted_under(tmp_path) == []


def test_no_layers(storage: ContainerStorage) -> None:
    fs = storage.create("scratch", [], volumes=["/data"])
    assert os.listdir(fs.merged) == ["data"]
    (fs.merged / "f").write_text("x")
    assert (fs.upper / "f").exists()
    assert os.listdir(storage.empty) == []
    storage.remove("scratch")


def test_two_containers_share_layers(storage: ContainerStorage, layers: list[Path]) -> None:
    a = storage.create("a", layers)
    b = storage.create("b", layers)
    (a.merged / "only-a").write_text("a")
    assert not (b.merged / "only-a").exists()
    with pytest.raises(AlreadyExists):
        storage.create("a", layers)
    assert storage.is_mounted("a")  # the refused create touched nothing
    storage.remove("a")
    assert storage.prune_links() == 0  # b still uses them
    assert (b.merged / "etc" / "hostname").read_text() == "top\n"
    storage.remove("b")


def test_failed_volume_rolls_back(
    storage: ContainerStorage, layers: list[Path], tmp_path: Path
) -> None:
    # /etc/hostname is a file: a volume below it cannot be made; nothing is left behind.
    with pytest.raises(Exception, match="not a directory"):
        storage.create("c1", layers, volumes=["/etc/hostname/x"])
    assert _mounted_under(tmp_path) == []
    assert storage.list_ids() == []


def test_image_volume_mounts(storage: ContainerStorage, layers: list[Path],
                             tmp_path: Path) -> None:
    """An image mounted read-only (no upper) for a CRI image volume: the union of its
    layers, a sub path resolved inside it, a layer-less image, all detached by unmount."""
    storage.create("c1", layers)
    whole = storage.mount_image("c1", 0, layers)
    assert whole == storage.image_mount("c1", 0)
    assert (whole / "etc" / "hostname").read_text() == "top\n"
    assert not (whole / "etc" / "gone").exists()
    assert sorted(os.listdir(whole / "opaque")) == ["new"]
    with pytest.raises(OSError, match="Read-only file system"):
        (whole / "new").write_text("x")
    options = next(line.split()[5] for line in Path("/proc/self/mountinfo").read_text()
                   .splitlines() if line.split()[4] == str(whole.resolve()))
    assert {"ro", "nosuid", "nodev"} <= set(options.split(","))
    # var/run -> /run: the image's own /run, not the host's.
    assert storage.mount_image("c1", 1, layers, sub_path="var/run") == storage.image_mount(
        "c1", 1) / "run"
    one = storage.mount_image("c1", 2, layers[:1], sub_path="etc/hostname")
    assert one.read_text() == "base\n"
    empty = storage.mount_image("c1", 3, [])
    assert os.listdir(empty) == []
    with pytest.raises(InvalidArgument, match=r"config\.mounts\[4\]\.image_sub_path: 'etc/x'"):
        storage.mount_image("c1", 4, layers, sub_path="etc/x")
    assert len(_mounted_under(tmp_path / "overlay" / "containers" / "c1" / "image-mounts")) == 5
    storage.unmount("c1")
    assert _mounted_under(tmp_path) == []
    storage.remove("c1")
    assert storage.list_ids() == []
