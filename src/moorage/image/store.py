"""The image store: content-addressed blobs, unpacked layers and image records.

Layout under ``<root>/images``::

    blobs/sha256/<hex>       manifests, indexes and image configs, as pulled (digest-checked)
    ingest/<hex>.partial     layer downloads in progress, resumed by the next attempt
    layers/<diff-hex>/       an unpacked layer, ready to be an overlayfs lower dir
    layers/.tmp-*            an unpack in progress; removed at start
    layer-meta/<diff-hex>.json   size and usage of an unpacked layer
    records/<config-hex>.json    one record per image

An image appears only when its record is written, after every layer is in place, so an
interrupted pull never leaves a half image visible. Layers are shared by diff_id between
images and removed by :meth:`ImageStore.collect` once no image uses them.

Reads (ListImages, ImageStatus) are served from memory; mutations are serialised by one
lock and their file work runs in a thread. Every change is published (``state.published``)
for the CRI read path's thread.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moorage import log
from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.image import reference as refs
from moorage.image import registries
from moorage.image.manifest import ImageConfig, parse_config
from moorage.state import records
from moorage.state.published import Published
from moorage.util import codec
from moorage.util.crash import crashpoint
from moorage.util.fs import FsUsage, atomic_write, remove_tree, tree_usage

_log = log.get("moorage.image")
_HEX = re.compile(r"^[a-f0-9]{1,64}$")
IMAGE_KIND = "image"
LAYER_KIND = "layer"
INGEST_MAX_AGE = 24 * 3600.0


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass
class Image:
    id: str  # sha256:<config digest hex>
    repo_tags: list[str]
    repo_digests: list[str]
    size: int
    layers: tuple[str, ...]  # diff_ids, lowest first
    config: ImageConfig
    blobs: list[str] = field(default_factory=list)  # manifest/index digests kept for it
    pulled_at: float = 0.0

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "repo_tags": self.repo_tags,
            "repo_digests": self.repo_digests,
            "size": self.size,
            "layers": list(self.layers),
            "blobs": self.blobs,
            "pulled_at": self.pulled_at,
        }


@dataclass(frozen=True)
class LayerInfo:
    diff_id: str
    size: int  # uncompressed tar bytes
    used_bytes: int
    inodes: int


class ImageStore:
    def __init__(self, root: Path, registries_conf: registries.RegistriesConfig) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.ingest = root / "ingest"
        self.layers_dir = root / "layers"
        self.layer_meta = root / "layer-meta"
        self.records = root / "records"
        self.registries_conf = registries_conf
        self.lock = asyncio.Lock()
        self._images: dict[str, Image] = {}
        self._published = Published[Image]()
        self._layers: dict[str, LayerInfo] = {}
        #: diff_ids that a pull in progress relies on: never collected meanwhile.
        self.holds: dict[str, int] = {}
        #: diff_ids that containers use (set by the daemon): never collected either.
        self.layers_in_use: Callable[[], set[str]] = set
        #: Whether an image is pinned (``image.pinned_images``, set by the daemon).
        self.pinned: Callable[[Image], bool] = _never
        #: Image ids that containers' image volumes mount, each with a container id (set
        #: by the daemon): RemoveImage refuses to remove them.
        self.images_in_use: Callable[[], dict[str, str]] = dict

    # -- start-up ------------------------------------------------------------------------

    def load(self) -> None:
        """Read every record (blocking; at start, before serving); then call collect()."""
        for d in (self.blobs, self.ingest, self.layers_dir, self.layer_meta, self.records):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for tmp in self.layers_dir.glob(".tmp-*"):
            _log.info("image.cleanup", path=str(tmp), reason="unfinished unpack")
            remove_tree(tmp)
        for path, meta in records.load_all(self.layer_meta, LAYER_KIND):
            if isinstance(meta, records.RecordError) or not (
                self.layers_dir / path.stem
            ).is_dir():
                _log.warning("image.layer_dropped", path=str(path), reason=str(meta)[:200])
                remove_tree(self.layers_dir / path.stem)
                path.unlink(missing_ok=True)
                continue
            info = LayerInfo(meta["diff_id"], meta["size"], meta["used_bytes"], meta["inodes"])
            self._layers[info.diff_id] = info
        for path, rec in records.load_all(self.records, IMAGE_KIND):
            image = None if isinstance(rec, records.RecordError) else self._from_record(rec)
            if image is None:
                _log.warning("image.record_dropped", path=str(path), reason=str(rec)[:200])
                path.unlink(missing_ok=True)
                continue
            self._images[image.id] = image
        self._publish()
        # Unused layers are collected by the daemon's call to collect(), once the
        # containers (which may use layers of removed images) are loaded too.

    def _from_record(self, rec: dict[str, Any]) -> Image | None:
        try:
            image_id = rec["id"]
            config = parse_config((self.blobs / _hex(image_id)).read_bytes(), image_id)
            layers = tuple(rec["layers"])
        except (KeyError, OSError, ValueError, InvalidArgument):
            return None
        if any(d not in self._layers for d in layers):
            return None
        return Image(
            id=image_id,
            repo_tags=list(rec.get("repo_tags", [])),
            repo_digests=list(rec.get("repo_digests", [])),
            size=int(rec.get("size", 0)),
            layers=layers,
            config=config,
            blobs=list(rec.get("blobs", [])),
            pulled_at=float(rec.get("pulled_at", 0.0)),
        )

    # -- reads (from memory) -------------------------------------------------------------

    def images(self) -> list[Image]:
        return list(self._images.values())

    def has_layer(self, diff_id: str) -> bool:
        return diff_id in self._layers

    def layer_path(self, diff_id: str) -> Path:
        return self.layers_dir / _hex(diff_id)

    def find(self, name: str) -> Image | None:
        """An image by id, id prefix, tag, digest reference or short name; None if absent."""
        return find_in(self._images, self.registries_conf, name)

    def published(self) -> Mapping[str, Image]:
        """Every image as last recorded, by id, for readers on other threads (the CRI read
        path): copies that never change, in a mapping that is replaced, never modified
        (``state.published``). Look names up with :func:`find_in`."""
        return self._published.items

    def _publish(self) -> None:
        self._published.reset(codec.snapshot(i) for i in self._images.values())

    # -- writes --------------------------------------------------------------------------

    async def add_layer(self, tmp: Path, info: LayerInfo) -> None:
        """Move an unpacked layer from its temp dir into place and record it."""

        def work() -> None:
            dest = self.layer_path(info.diff_id)
            if dest.exists():  # unpacked meanwhile by another pull; keep that one
                remove_tree(tmp)
            else:
                os.rename(tmp, dest)
            records.write(self.layer_meta / f"{_hex(info.diff_id)}.json", LAYER_KIND, {
                "diff_id": info.diff_id, "size": info.size,
                "used_bytes": info.used_bytes, "inodes": info.inodes,
            })

        async with self.lock:
            await asyncio.to_thread(work)
            self._layers[info.diff_id] = info

    def new_layer_tmp(self, diff_id: str) -> Path:
        return self.layers_dir / f".tmp-{_hex(diff_id)[:16]}-{secrets.token_hex(4)}"

    async def commit(
        self,
        image_id: str,
        config_blob: bytes,
        config: ImageConfig,
        manifest_blobs: dict[str, bytes],
        size: int,
        repo_tag: str | None,
        repo_digest: str,
    ) -> Image:
        """Record a pulled image (or add a tag/digest to a known one); moves the tag."""
        async with self.lock:
            image = self._images.get(image_id)
            if image is None:
                image = Image(image_id, [], [], size, config.diff_ids, config)
            changed: list[Image] = [image]
            if repo_tag and repo_tag not in image.repo_tags:
                for other in self._images.values():
                    if other is not image and repo_tag in other.repo_tags:
                        other.repo_tags.remove(repo_tag)
                        changed.append(other)
                image.repo_tags.append(repo_tag)
            if repo_digest not in image.repo_digests:
                image.repo_digests.append(repo_digest)
            for digest in manifest_blobs:
                if digest not in image.blobs:
                    image.blobs.append(digest)
            image.pulled_at = time.time()

            def work() -> None:
                for digest, data in {image_id: config_blob, **manifest_blobs}.items():
                    path = self.blobs / _hex(digest)
                    if not path.exists():
                        atomic_write(path, data, 0o644)
                crashpoint("image.pull.blobs_written")
                for img in changed:
                    self._write_record(img)

            await asyncio.to_thread(work)
            self._images[image_id] = image
            self._publish()
            return image

    def _write_record(self, image: Image) -> None:
        records.write(self.records / f"{_hex(image.id)}.json", IMAGE_KIND, image.record())

    async def remove(self, name: str) -> Image | None:
        """RemoveImage: by id the image and all its names; by tag only that tag, and the
        image once no tag or digest reference is left. Idempotent: unknown is None.
        FailedPrecondition, changing nothing, when that would remove an image that an
        image volume of a container mounts (CRI-O's rule)."""
        async with self.lock:
            image = self.find(name)
            if image is None:
                return None
            bare = name.removeprefix("sha256:")
            by_id = _HEX.match(bare) is not None and _hex(image.id).startswith(bare) and not (
                any(str(r) in image.repo_tags for r in _references(self.registries_conf, name))
            )
            tags, digests = list(image.repo_tags), list(image.repo_digests)
            if not by_id:
                for ref in _references(self.registries_conf, name):
                    text = str(ref)
                    if text in tags:
                        tags.remove(text)
                    if text in digests:
                        digests.remove(text)
                    # A tag takes the digest reference it was pulled under along when no
                    # other tag of that repository is left, so `crictl rmi name:tag`
                    # removes an image pulled by tag.
                    if ref.tag is not None and ref.digest is None and not any(
                        t.startswith(ref.name + ":") for t in tags
                    ):
                        digests = [d for d in digests if not d.startswith(ref.name + "@")]
            gone = by_id or not (tags or digests)
            user = self.images_in_use().get(image.id) if gone else None
            if user is not None:
                raise FailedPrecondition(
                    f"image {image.id} is in use by an image volume of container {user}; "
                    "remove the container first"
                )
            image.repo_tags, image.repo_digests = tags, digests
            if not gone:
                self._publish()
                await asyncio.to_thread(self._write_record, image)
                return image
            del self._images[image.id]
            self._publish()
            await asyncio.to_thread(
                lambda: (self.records / f"{_hex(image.id)}.json").unlink(missing_ok=True)
            )
            crashpoint("image.remove.record_removed")
            await asyncio.to_thread(self._collect_sync, set(self.holds))
            return image

    async def collect(self) -> None:
        async with self.lock:
            await asyncio.to_thread(self._collect_sync, set(self.holds))

    def _collect_sync(self, held: set[str]) -> None:
        """Remove layers and blobs that no image references (called under the lock)."""
        used_layers = {d for i in self._images.values() for d in i.layers} | held
        used_layers |= self.layers_in_use()
        used_blobs = {_hex(i.id) for i in self._images.values()}
        used_blobs |= {_hex(b) for i in self._images.values() for b in i.blobs}
        for diff_id in list(self._layers):
            if diff_id not in used_layers:
                _log.info("image.layer_removed", diff_id=diff_id)
                del self._layers[diff_id]
                (self.layer_meta / f"{_hex(diff_id)}.json").unlink(missing_ok=True)
                remove_tree(self.layer_path(diff_id))
                crashpoint("image.remove.layer_removed")
        for path in self.layers_dir.iterdir():
            if not path.name.startswith(".") and "sha256:" + path.name not in self._layers:
                remove_tree(path)
        for path in self.blobs.iterdir():
            if path.name not in used_blobs and not path.name.startswith("."):
                path.unlink(missing_ok=True)
        now = time.time()
        for path in self.ingest.iterdir():
            try:
                if now - path.stat().st_mtime > INGEST_MAX_AGE:
                    path.unlink()
            except FileNotFoundError:
                pass

    # -- usage ---------------------------------------------------------------------------

    def usage(self) -> FsUsage:
        """Bytes and inodes the image store uses: recorded layer usage plus small files."""
        used = sum(layer.used_bytes for layer in self._layers.values())
        inodes = sum(layer.inodes for layer in self._layers.values())
        for d in (self.blobs, self.records, self.layer_meta, self.ingest):
            b, n = _dir_usage(d)
            used += b
            inodes += n
        return FsUsage(str(self.root), used, inodes, time.time_ns())


def find_in(images: Mapping[str, Image], conf: registries.RegistriesConfig, name: str
            ) -> Image | None:
    """The image of ``images`` (the store's, or its published copies) that ``name``
    names: an id, an id prefix, a tag, a digest reference or a short name (resolved with
    ``conf``); None if absent."""
    name = name.strip()
    if not name:
        raise InvalidArgument("image.image: an image reference or id is required")
    bare = name.removeprefix("sha256:")
    if len(bare) == 64 and _HEX.match(bare):
        image = images.get("sha256:" + bare)
        if image is not None:
            return image
    for ref in _references(conf, name):
        text = str(ref)
        for image in images.values():
            if text in image.repo_tags or text in image.repo_digests:
                return image
    if _HEX.match(bare) and (name.startswith("sha256:") or len(bare) >= 3):
        matches = [i for i in images.values() if _hex(i.id).startswith(bare)]
        if len(matches) == 1:
            return matches[0]
    return None


def _references(conf: registries.RegistriesConfig, name: str) -> list[refs.Reference]:
    try:
        return registries.candidates(conf, name)
    except InvalidArgument:
        return []


def _never(image: Image) -> bool:
    return False


def _dir_usage(directory: Path) -> tuple[int, int]:
    used = inodes = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                used += st.st_blocks * 512
                inodes += 1
    except FileNotFoundError:
        return 0, 0
    return used, inodes + 1


def layer_usage(path: Path) -> tuple[int, int]:
    return tree_usage(path)
