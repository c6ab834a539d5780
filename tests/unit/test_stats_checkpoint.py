"""CheckpointContainer's runtime call and archive, with a stand-in runtime that writes what
``runc checkpoint`` writes (CRIU cannot be relied on in unit tests)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from moorage.errors import DeadlineExceeded, FailedPrecondition, Unimplemented
from moorage.oci.runtime import OciRuntime
from moorage.stats import checkpoint
from moorage.stats.checkpoint import CheckpointRequest

FAKE_RUNC = """#!/bin/sh
# Records its arguments, then acts as `runc checkpoint` would (or fails, or hangs).
echo "$@" > "$(dirname "$0")/args"
while [ $# -gt 0 ]; do
  case "$1" in
    --image-path) images="$2"; shift ;;
    --work-path) work="$2"; shift ;;
  esac
  shift
done
case "$MODE" in
  fail) echo "(00.01) Error (criu/vdso.c:613): vdso: no symtable" > "$work/dump.log"
        printf '%s%s\n' 'time="2026-01-01T00:00:00Z" level=error ' \
          'msg="criu failed: type DUMP errno 0\\nlog file: /x/dump.log"' >&2
        exit 1 ;;
  hang) exec sleep 60 ;;
esac
echo inventory > "$images/inventory.img"
echo pages > "$images/pages-1.img"
echo "dump done" > "$work/dump.log"
"""


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OciRuntime:
    script = tmp_path / "bin" / "fake-runc"
    script.parent.mkdir()
    script.write_text(FAKE_RUNC)
    script.chmod(0o755)
    monkeypatch.setattr(checkpoint, "criu_path", lambda: "/usr/sbin/criu")
    return OciRuntime("fake", str(script), tmp_path / "state")


def request(tmp_path: Path, **kw: object) -> CheckpointRequest:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text('{"ociVersion": "1.0.2-dev"}')
    upper = tmp_path / "upper"
    (upper / "tmp").mkdir(parents=True, exist_ok=True)
    (upper / "tmp" / "mark").write_text("state\n")
    fields: dict[str, object] = dict(
        container_id="c" * 64, name="app", sandbox_id="p" * 64, image="busybox:1",
        image_ref="sha256:abc", created_at=5, labels={"l": "1"}, annotations={"a": "2"},
        bundle=bundle, upper=upper, location=str(tmp_path / "out" / "ckpt.tar"),
    )
    fields.update(kw)
    return CheckpointRequest(**fields)  # type: ignore[arg-type]


async def test_archive(tmp_path: Path, runtime: OciRuntime) -> None:
    req = request(tmp_path)
    target = await checkpoint.checkpoint(runtime, req)
    assert target == Path(req.location)
    args = (tmp_path / "bin" / "args").read_text().split()
    assert args[:3] == ["--root", str(tmp_path / "state"), "checkpoint"]
    assert "--leave-running" in args and args[-1] == "c" * 64
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
        assert {"checkpoint", "checkpoint/inventory.img", "checkpoint/pages-1.img",
                "spec.dump", "config.dump", "rootfs-diff.tar", "dump.log"} <= names
        spec = tar.extractfile("spec.dump")
        assert spec is not None and json.load(spec) == {"ociVersion": "1.0.2-dev"}
        config = tar.extractfile("config.dump")
        assert config is not None
        info = json.load(config)
        assert (info["id"], info["name"], info["rootfsImageName"]) == (
            "c" * 64, "app", "busybox:1")
        diff = tar.extractfile("rootfs-diff.tar")
        assert diff is not None
        with tarfile.open(fileobj=diff) as inner:
            mark = inner.extractfile("tmp/mark")
            assert mark is not None and mark.read() == b"state\n"
    # Only the archive is left: the CRIU images and work files are gone.
    assert [p.name for p in target.parent.iterdir()] == ["ckpt.tar"]


async def test_runtime_failure_carries_criu_log(tmp_path: Path, runtime: OciRuntime,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "fail")
    req = request(tmp_path)
    with pytest.raises(FailedPrecondition) as e:
        await checkpoint.checkpoint(runtime, req)
    assert "criu failed: type DUMP errno 0" in e.value.message
    assert "vdso: no symtable" in e.value.message
    assert "log file" not in e.value.message
    assert list(Path(req.location).parent.iterdir()) == []


async def test_timeout(tmp_path: Path, runtime: OciRuntime,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "hang")
    req = request(tmp_path, timeout=0.2)
    with pytest.raises(DeadlineExceeded):
        await checkpoint.checkpoint(runtime, req)
    assert list(Path(req.location).parent.iterdir()) == []


async def test_without_criu(tmp_path: Path, runtime: OciRuntime,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "criu_path", lambda: None)
    with pytest.raises(Unimplemented) as e:
        await checkpoint.checkpoint(runtime, request(tmp_path))
    assert "criu" in e.value.message
    assert not (tmp_path / "bin" / "args").exists()
