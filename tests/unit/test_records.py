import json
from pathlib import Path

import pytest

from moorage.state import records


def test_write_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.json"
    records.write(path, "image", {"id": "sha256:1", "tags": ["a"]})
    assert records.read(path, "image") == {"id": "sha256:1", "tags": ["a"]}
    assert json.loads(path.read_text())["schema"] == records.SCHEMA_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp file left


def test_newer_schema_and_wrong_kind_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"schema": records.SCHEMA_VERSION + 1, "kind": "image"}))
    with pytest.raises(records.RecordError, match="newer"):
        records.read(path, "image")
    records.write(path, "layer", {})
    with pytest.raises(records.RecordError, match="not a image record"):
        records.read(path, "image")


def test_load_all_reports_broken_records(tmp_path: Path) -> None:
    records.write(tmp_path / "good.json", "image", {"id": 1})
    (tmp_path / "bad.json").write_text("{truncated")
    got = dict(records.load_all(tmp_path, "image"))
    assert got[tmp_path / "good.json"] == {"id": 1}
    assert isinstance(got[tmp_path / "bad.json"], records.RecordError)


def test_writer_encodes_when_run(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    data = {"n": 1}
    run = records.writer(path, "image", lambda: dict(data))
    assert not path.exists()  # nothing happens until it runs (in a worker thread)
    data["n"] = 2
    run()
    assert records.read(path, "image") == {"n": 2}


def test_later_writer_wins_whatever_the_order(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    older = records.writer(path, "image", lambda: {"n": 1})
    newer = records.writer(path, "image", lambda: {"n": 2})
    newer()
    older()  # its thread finished last: the record taken later stays
    assert records.read(path, "image") == {"n": 2}
    # other paths are independent, and a writer made afterwards writes again
    other = tmp_path / "y.json"
    records.writer(other, "image", lambda: {"n": 3})()
    records.writer(path, "image", lambda: {"n": 4})()
    assert records.read(other, "image") == {"n": 3}
    assert records.read(path, "image") == {"n": 4}
    assert not records._in_flight  # nothing is kept once every writer has run


def test_load_all_removes_writes_a_crash_cut_short(tmp_path: Path) -> None:
    records.write(tmp_path / "a.json", "thing", {"x": 1})
    (tmp_path / ".a.json.k2j4h1x0.tmp").write_text('{"schema": 1, "ki')  # kill -9 here
    (tmp_path / "notes.tmp").write_text("not ours")  # not an atomic_write temp file
    assert [(p.name, r) for p, r in records.load_all(tmp_path, "thing")] == [
        ("a.json", {"x": 1})]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "notes.tmp"]
