"""Pinned-image patterns (``image.pinned_images``), matched as CRI-O matches them."""

from __future__ import annotations

from pathlib import Path

import pytest

from moorage import config
from moorage.image.manifest import ImageConfig, Platform
from moorage.image.pinned import PinnedImages
from moorage.image.store import Image

DIGEST = "sha256:" + "a" * 64


def _image(*names: str) -> Image:
    return Image("sha256:" + "c" * 64, [n for n in names if "@" not in n],
                 [n for n in names if "@" in n], 1, (),
                 ImageConfig({}, (), Platform("linux", "amd64")))


def test_pinned_patterns_as_cri_o_matches_them() -> None:
    pinned = PinnedImages(["registry.k8s.io/pause:3.10", "quay.io/team/*", "*etcd*"])
    assert pinned(_image("registry.k8s.io/pause:3.10"))
    assert pinned(_image("REGISTRY.K8S.IO/pause:3.10"))  # case-insensitive
    assert not pinned(_image("registry.k8s.io/pause:3.9"))
    assert not pinned(_image("registry.k8s.io/pause"))  # exact means the whole name
    assert pinned(_image("quay.io/team/app:1"))
    assert pinned(_image(f"quay.io/team/app@{DIGEST}"))  # digest names count too
    assert not pinned(_image("quay.io/other/app:1"))
    # CRI-O does not anchor a glob: the text before * may appear anywhere in the name.
    assert pinned(_image("mirror.io/quay.io/team/app:1"))
    assert pinned(_image("registry.k8s.io/etcd:3.5"))
    assert pinned(_image("docker.io/library/busybox:1", "registry.k8s.io/ETCD:1"))
    assert not pinned(_image("docker.io/library/busybox:1"))
    assert not PinnedImages([])(_image("registry.k8s.io/pause:3.10"))


@pytest.mark.parametrize("pattern", ["*", "**", "*pause", "a*b", "a*b*", "", "a b"])
def test_pinned_pattern_config_refuses_what_cannot_match(pattern: str,
                                                         tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="image.pinned_images"):
        config.load(Path("/dev/null"), tmp_path,
                    {"image.pinned_images": ["quay.io/ok", pattern]})
