"""Host path helpers on real files: trees deeper than the recursion limit and PATH_MAX,
symlinks planted below a trusted directory, and the checkpoint archive's final rename."""

from __future__ import annotations

import errno
import os
import sys
import tarfile
from pathlib import Path

import pytest

from moorage.stats.checkpoint import CheckpointRequest, _export
from moorage.util.fs import (
    open_in_root,
    prepare_beneath,
    remove_tree,
    tree_usage,
    walk_tree,
)

DEPTH = 2100  # deeper than sys.getrecursionlimit(), and paths longer than PATH_MAX


def deep_tree(root: Path, depth: int = DEPTH) -> None:
    """``root/d/d/.../d/f`` built relative to open directories (the path is too long)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.symlink("/etc", "escape", dir_fd=fd)
    finally:
        os.close(fd)


def test_deep_tree_is_walked_measured_and_removed(tmp_path: Path) -> None:
    assert sys.getrecursionlimit() < DEPTH
    root = tmp_path / "layer"
    deep_tree(root)
    seen: list[str] = []
    walk_tree(root, lambda fd, name, st: seen.append(name))
    assert seen.count("d") == DEPTH and "f" in seen and "escape" in seen
    used, inodes = tree_usage(root)
    assert inodes == DEPTH + 2 and used > 0
    remove_tree(root)
    assert not root.exists()
    assert os.path.isdir("/etc")  # the symlink went, not what it pointed to


def test_usage_counts_again_when_a_directory_moves_under_it(tmp_path: Path) -> None:
    """ImageFsInfo walks the containers' layers while RemoveContainer moves one into the
    trash: the walk notices (going back up leads elsewhere) and counts again."""
    tree = tmp_path / "containers"
    (tree / "a" / "deep").mkdir(parents=True)
    (tree / "a" / "deep" / "f").write_text("x")
    (tree / "b").mkdir()
    trash = tmp_path / "trash"
    trash.mkdir()
    moved = []

    def visit(dir_fd: int, name: str, st: os.stat_result) -> None:
        if name == "f" and not moved:  # inside a/deep: move ``a`` away, as a removal does
            os.rename(tree / "a", trash / "a")
            moved.append(name)

    with pytest.raises(OSError) as info:
        walk_tree(tree, visit)
    assert info.value.errno == errno.ESTALE
    os.rename(trash / "a", tree / "a")
    real = walk_tree
    calls = []

    def flaky(path: str | Path, visit: object, leave: object = None) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ESTALE, f"{path} changed while it was walked")
        real(path, visit, leave)  # type: ignore[arg-type]

    import moorage.util.fs as fs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fs, "walk_tree", flaky)
        assert tree_usage(tree)[1] == 4  # a, deep, f, b: counted again from the start
    assert len(calls) == 2


def test_remove_tree_never_follows_symlinks(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "link").symlink_to(victim)
    (tree / "file-link").symlink_to(victim / "keep")
    (tree / "hard").write_text("x")
    os.link(tree / "hard", tree / "sub" / "hard2")
    assert tree_usage(tree)[1] == 4  # sub, link, file-link, one inode for both hard links
    remove_tree(tree)
    assert not tree.exists()
    assert (victim / "keep").read_text() == "keep"
    remove_tree(tree)  # missing is fine
    remove_tree(victim / "keep")  # a file
    assert list(victim.iterdir()) == []


def test_prepare_beneath_creates_dirs_and_refuses_planted_symlinks(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    victim = tmp_path / "victim"
    victim.mkdir()
    path = prepare_beneath(logs, "ctr/0.log")
    assert path == logs / "ctr" / "0.log" and (logs / "ctr").is_dir() and not path.exists()
    assert (logs / "ctr").stat().st_mode & 0o777 == 0o755
    # A symlink in place of the container's directory, or of the log file itself.
    (logs / "evil").symlink_to(victim)
    with pytest.raises(OSError) as info:
        prepare_beneath(logs, "evil/0.log")
    assert info.value.errno == errno.ELOOP and "'evil'" in str(info.value)
    (logs / "ctr" / "1.log").symlink_to(victim / "target")
    with pytest.raises(OSError) as info:
        prepare_beneath(logs, "ctr/1.log")
    assert info.value.errno == errno.ELOOP
    (logs / "file").write_text("")
    with pytest.raises(OSError) as info:
        prepare_beneath(logs, "file/0.log")
    assert info.value.errno == errno.ENOTDIR
    assert list(victim.iterdir()) == []
    # The trusted root itself may be reached through a symlink (an administrator's choice).
    (tmp_path / "logs-link").symlink_to(logs)
    assert prepare_beneath(tmp_path / "logs-link", "ctr/2.log").parent.is_dir()
    for bad in ("/abs/0.log", "../0.log", "a/../../0.log", ""):
        with pytest.raises(ValueError):
            prepare_beneath(logs, bad)


def _resolved(root: Path, path: str) -> str | None:
    found = open_in_root(root, path)
    if found is None:
        return None
    fd, relative = found
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(root / relative, follow_symlinks=False))
    finally:
        os.close(fd)
    return relative


def test_open_in_root_resolves_links_as_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    (root / "abs").symlink_to("/a")  # the root's /a, not the host's
    (root / "a" / "rel").symlink_to("../a/b")
    (root / "climb").symlink_to("../../../../..")  # stops at the root
    (root / "host").symlink_to(str(tmp_path))  # an absolute host path: inside the root
    (root / "loop").symlink_to("loop")
    (root / "file-as-dir").symlink_to("a/b/f")
    assert _resolved(root, "") == ""
    assert _resolved(root, "/a/./b/") == "a/b"
    assert _resolved(root, "abs/b/f") == "a/b/f"
    assert _resolved(root, "a/rel/f") == "a/b/f"
    assert _resolved(root, "climb/a") == "a"
    assert _resolved(root, "a/../../../a/b") == "a/b"
    assert _resolved(root, "file-as-dir") == "a/b/f"
    assert _resolved(root, "file-as-dir/x") is None
    assert _resolved(root, "host/root") is None  # tmp_path's "root" is not in the root
    assert _resolved(root, "missing/f") is None
    with pytest.raises(OSError) as e:
        open_in_root(root, "loop")
    assert e.value.errno == errno.ELOOP


def test_checkpoint_archive_replaces_a_symlink_at_the_location(tmp_path: Path) -> None:
    """The archive is written beside the location and renamed over it: a symlink planted at
    the location is replaced, the file it points to is never written."""
    victim = tmp_path / "victim-file"
    victim.write_text("precious\n")
    location = tmp_path / "checkpoints" / "ckpt.tar"
    location.parent.mkdir()
    location.symlink_to(victim)
    work = tmp_path / "work"
    images = work / "checkpoint"
    images.mkdir(parents=True)
    (images / "inventory.img").write_bytes(b"criu image")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "changed").write_text("x")
    req = CheckpointRequest(
        container_id="c" * 64, name="ctr", sandbox_id="s" * 64, image="img", image_ref="ref",
        created_at=1, labels={}, annotations={}, bundle=bundle, upper=upper,
        location=str(location),
    )
    _export(req, work, images, location)
    assert victim.read_text() == "precious\n"
    assert not location.is_symlink() and location.stat().st_mode & 0o777 == 0o600
    with tarfile.open(location) as tar:
        assert {"checkpoint/inventory.img", "spec.dump", "config.dump",
                "rootfs-diff.tar"} <= set(tar.getnames())
    assert sorted(p.name for p in location.parent.iterdir()) == ["ckpt.tar"]
