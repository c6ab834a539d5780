"""Container storage without mounting: short link names, the mount-data limit, ids, and
image volume directories made inside a root whose symlinks point outside.  No root needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moorage.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from moorage.storage import ContainerStorage
from moorage.storage.overlay import _make_dir_in_root, _mount_points, link_name


def test_link_names_are_short_stable_and_distinct(tmp_path: Path) -> None:
    a = link_name(tmp_path / "layers" / ("a" * 64))
    assert len(a) == 26 and a.isalnum() and a.isupper()
    assert a == link_name(tmp_path / "layers" / ("a" * 64))
    assert a != link_name(tmp_path / "layers" / ("b" * 64))


def test_mount_data_limit(tmp_path: Path) -> None:
    storage = ContainerStorage(tmp_path / "overlay")
    cid = "c" * 64
    names = [f"l/{link_name(tmp_path / str(i))}" for i in range(120)]
    data = storage._mount_data(names, f"containers/{cid}", index_off=True)
    assert len(data) < 4096
    assert data.startswith("lowerdir=l/")
    assert f",upperdir=containers/{cid}/upper,workdir=containers/{cid}/work,index=off" in data
    with pytest.raises(InvalidArgument, match="too many layers"):
        storage._mount_data(names * 2, f"containers/{cid}")
    # An image volume's overlay: lower dirs only (read-only).
    assert storage._mount_data(names[:2], None) == f"lowerdir={names[0]}:{names[1]}"


def test_too_many_layers_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    layers = []
    for i in range(200):
        layer = tmp_path / "layers" / f"{i:064x}"
        layer.mkdir(parents=True)
        layers.append(layer)
    storage = ContainerStorage(tmp_path / "overlay")
    with pytest.raises(InvalidArgument, match="too many layers"):
        storage.create("big", layers)
    assert storage.list_ids() == []


def test_missing_layer_and_bad_ids(tmp_path: Path) -> None:
    storage = ContainerStorage(tmp_path / "overlay")
    with pytest.raises(FailedPrecondition, match="missing"):
        storage.create("c1", [tmp_path / "nope"])
    for bad in ("", ".", "..", "a/b", ".hidden", "x:y", "a,b"):
        with pytest.raises(InvalidArgument, match="container id"):
            storage.create(bad, [])
    with pytest.raises(InvalidArgument, match="volume"):
        storage.create("c1", [], volumes=[""])
    assert storage.list_ids() == []


def test_queries_on_unknown_containers(tmp_path: Path) -> None:
    storage = ContainerStorage(tmp_path / "overlay")
    assert storage.list_ids() == []
    assert not storage.is_mounted("c1")
    storage.unmount("c1")
    storage.remove("c1")
    with pytest.raises(NotFound):
        storage.usage("c1")
    with pytest.raises(NotFound):
        storage.mount("c1")
    assert storage.prune_links() == 0


def test_existing_storage_is_not_overwritten(tmp_path: Path) -> None:
    storage = ContainerStorage(tmp_path / "overlay")
    (storage.containers / "c1").mkdir(parents=True)
    with pytest.raises(AlreadyExists):
        storage.create("c1", [])
    assert storage.list_ids() == ["c1"]


def test_mount_points_include_root() -> None:
    assert "/" in _mount_points()


# -- image volume directories ------------------------------------------------------------------


def test_make_dirs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    old = os.umask(0o077)
    try:
        _make_dir_in_root(root, "/var/lib/data/")
    finally:
        os.umask(old)
    assert (root / "var/lib/data").is_dir()
    assert (root / "var/lib/data").stat().st_mode & 0o777 == 0o755
    _make_dir_in_root(root, "var/lib/data")  # again: nothing to do


def test_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "run").mkdir(parents=True)
    outside.mkdir()
    (root / "abs").symlink_to(outside)  # absolute: means <root>/<outside>
    (root / "rel").symlink_to("../../outside")  # climbs no higher than the root
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # /var/run -> /run, as images have it
    _make_dir_in_root(root, "/abs/x")
    _make_dir_in_root(root, "/rel/y")
    _make_dir_in_root(root, "/var/run/z")
    _make_dir_in_root(root, "/../../escape")
    assert list(outside.iterdir()) == []
    assert (root / str(outside).lstrip("/") / "x").is_dir()
    assert (root / "outside" / "y").is_dir()
    assert (root / "run" / "z").is_dir()
    assert (root / "var" / "run").is_symlink()
    assert (root / "escape").is_dir()
    assert not (tmp_path.parent / "escape").exists()


def test_symlink_loops_and_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop").symlink_to("loop")
    (root / "file").write_text("x")
    with pytest.raises(InvalidArgument, match="too many symlinks"):
        _make_dir_in_root(root, "/loop/x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        _make_dir_in_root(root, "/file/x")
