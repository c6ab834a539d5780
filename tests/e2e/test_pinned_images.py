"""Pinned images (``image.pinned_images``) end to end: reported pinned over the socket, so
kubelet's image GC and ``crictl rmi --prune`` keep them; re-read on SIGHUP."""

from __future__ import annotations

from pathlib import Path

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_images import insecure_conf, pull, remove, status
from tests.fixtures.daemon import Daemon
from tests.fixtures.oci import Image, push_image
from tests.fixtures.registry import Registry


def pinned_flags(d: Daemon) -> dict[str, bool]:
    """Every image's first name and its pinned flag, from ListImages."""
    return {(i.repo_tags or i.repo_digests)[0]: i.pinned
            for i in d.images.ListImages(pb.ListImagesRequest()).images}


def crictl_rmi_prune(d: Daemon) -> list[str]:
    """What ``crictl rmi --prune`` does (cri-tools' cmd/crictl/image.go): list the images,
    leave out the pinned ones and those a container uses, remove the rest by id. Returns
    the ids removed."""
    ids = {i.id for i in d.images.ListImages(pb.ListImagesRequest()).images if not i.pinned}
    for c in d.runtime.ListContainers(pb.ListContainersRequest()).containers:
        ids.discard(status(d, c.image.image).image.id)
    for image_id in sorted(ids):
        assert status(d, image_id).HasField("image")
        remove(d, image_id)
    return sorted(ids)


def test_pinned_images_survive_prune_and_follow_sighup(tmp_path: Path,
                                                       registry: Registry) -> None:
    host = registry.host
    names = {
        "exact": registry.ref("pin/exact", "v1"),
        "glob": registry.ref("pin/glob-app", "v2"),
        "keyword": registry.ref("pin/tools-keyword-x", "1"),
        "loose": registry.ref("pin/loose", "v1"),
        "exact-other-tag": registry.ref("pin/exact", "v2"),
    }
    for label, ref in names.items():
        repo, _, tag = ref.removeprefix(f"{host}/").rpartition(":")
        push_image(registry, repo, tag, Image.busybox(labels={"pin": label}))
    pins = f'["{names["exact"]}", "{host}/pin/glob*", "*KEYWORD*"]'
    d = Daemon(tmp_path / "d", registries_conf_text=insecure_conf(registry),
               config_text=f"[image]\npinned_images = {pins}\n").start()
    try:
        ids = {label: pull(d, ref) for label, ref in names.items()}
        assert pinned_flags(d) == {names["exact"]: True, names["glob"]: True,
                                   names["keyword"]: True, names["loose"]: False,
                                   names["exact-other-tag"]: False}
        assert status(d, ids["glob"]).image.pinned
        assert not status(d, ids["loose"]).image.pinned
        # Digest names count: pulled by digest only, the glob still pins it.
        by_digest = pull(d, f"{host}/pin/glob-app@" + status(
            d, ids["glob"]).image.repo_digests[0].rpartition("@")[2])
        assert by_digest == ids["glob"]

        removed = crictl_rmi_prune(d)
        assert removed == sorted([ids["loose"], ids["exact-other-tag"]])
        assert set(pinned_flags(d)) == {names["exact"], names["glob"], names["keyword"]}

        # SIGHUP applies a new list: the keyword pin goes, the loose image (pulled again)
        # becomes pinned.
        pull(d, names["loose"])
        drop = d.base / "moorage.d" / "50-pins.toml"
        drop.write_text(f'[image]\npinned_images = ["{names["exact"]}", "{names["loose"]}", '
                        f'"{host}/pin/glob*"]\n')
        assert "image.pinned_images" in d.reload()
        assert pinned_flags(d) == {names["exact"]: True, names["glob"]: True,
                                   names["keyword"]: False, names["loose"]: True}
        assert crictl_rmi_prune(d) == [ids["keyword"]]

        # Pinning is kubelet's and crictl's cue; asked by name, RemoveImage removes a
        # pinned image, as in CRI-O and containerd.
        remove(d, names["exact"])
        assert not status(d, names["exact"]).HasField("image")
        # A restart keeps the pins (they come from the config, not the image records).
        d.restart()
        assert pinned_flags(d) == {names["glob"]: True, names["loose"]: True}
    finally:
        d.stop()
