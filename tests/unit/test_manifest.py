import json

import pytest

from moorage.errors import FailedPrecondition, InvalidArgument, NotFound
from moorage.image import manifest as mf

D = "sha256:" + "a" * 64


def _entry(os_: str, arch: str, variant: str = "", digest: str = D) -> dict[str, object]:
    plat = {"os": os_, "architecture": arch}
    if variant:
        plat["variant"] = variant
    return {"mediaType": mf.OCI_MANIFEST, "digest": digest, "size": 10, "platform": plat}


def test_select_platform_exact_and_variants() -> None:
    entries = mf.parse_index(json.dumps({"manifests": [
        _entry("unknown", "unknown", digest="sha256:" + "0" * 64),
        _entry("linux", "arm64", digest="sha256:" + "1" * 64),
        _entry("linux", "amd64", digest="sha256:" + "2" * 64),
        _entry("linux", "arm", "v7", digest="sha256:" + "3" * 64),
    ]}).encode(), "t")
    assert mf.select_platform(entries, mf.Platform("linux", "amd64"), "t").digest.endswith("2")
    # arm64 entries commonly omit the v8 variant.
    assert mf.select_platform(entries, mf.Platform("linux", "arm64", "v8"), "t").digest.endswith(
        "1")
    assert mf.select_platform(entries, mf.Platform("linux", "arm", "v7"), "t").digest.endswith("3")
    with pytest.raises(NotFound, match="no image for platform linux/s390x"):
        mf.select_platform(entries, mf.Platform("linux", "s390x"), "t")


def test_media_type_detection_and_schema1() -> None:
    assert mf.media_type_of(b'{"manifests": []}', "", "t") == mf.OCI_INDEX
    assert mf.media_type_of(b'{"schemaVersion": 2, "mediaType": "x"}', "", "t") == "x"
    kind = mf.media_type_of(b'{"schemaVersion": 1, "fsLayers": []}', "", "t")
    with pytest.raises(FailedPrecondition, match="schema 1"):
        mf.reject_schema1(kind, "image x")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        mf.media_type_of(b"{", "", "t")


def test_parse_manifest_and_config() -> None:
    man = mf.parse_manifest(json.dumps({
        "schemaVersion": 2,
        "config": {"mediaType": mf.CONFIG_TYPES[0], "digest": D, "size": 3},
        "layers": [{"mediaType": "x", "digest": D, "size": 4}],
    }).encode(), "t")
    assert man.config.size == 3 and man.layers[0].size == 4
    with pytest.raises(InvalidArgument, match="layers"):
        mf.parse_manifest(b'{"schemaVersion": 2, "config": {"digest": "d", "size": 1}}', "t")
    cfg = mf.parse_config(json.dumps({
        "os": "linux", "architecture": "amd64", "config": {"User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": [D]},
    }).encode(), "t")
    assert cfg.diff_ids == (D,) and cfg.user == "1000:1000"
    with pytest.raises(InvalidArgument, match="diff_ids"):
        mf.parse_config(b"{}", "t")


def test_host_platform_is_linux() -> None:
    assert mf.host_platform().os == "linux"
