"""Image manifests, indexes and configs: parsing, validation and platform selection."""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass
from typing import Any

from moorage.errors import FailedPrecondition, InvalidArgument, NotFound

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)

#: Platforms an error about a missing platform names at most.
_PLATFORMS_NAMED = 10

_GOARCH = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
    "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    arch = _GOARCH.get(machine, machine)
    variant = {"arm64": "v8", "arm": "v6" if machine == "armv6l" else "v7"}.get(arch, "")
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None


@dataclass(frozen=True)
class ImageManifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise InvalidArgument(f"{what}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what}: not a JSON object")
    return doc


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{what}: descriptor is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"{what}: descriptor lacks a valid digest or size")
    plat = raw.get("platform")
    platform = None
    if isinstance(plat, dict):
        platform = Platform(
            str(plat.get("os", "")), str(plat.get("architecture", "")),
            str(plat.get("variant", "")),
        )
    return Descriptor(str(media_type or ""), digest, size, platform)


def media_type_of(data: bytes, header_type: str, what: str) -> str:
    """The manifest's type: its own ``mediaType`` field, else the Content-Type header."""
    doc = _load(data, what)
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    if "manifests" in doc:
        return OCI_INDEX
    if header_type in (*INDEX_TYPES, *MANIFEST_TYPES, *DOCKER_SCHEMA1):
        return header_type
    if "layers" in doc and "config" in doc:
        return OCI_MANIFEST
    raise InvalidArgument(f"{what}: unknown manifest type {header_type!r}")


def reject_schema1(media_type: str, what: str) -> None:
    if media_type in DOCKER_SCHEMA1:
        raise FailedPrecondition(
            f"{what}: Docker schema 1 manifests are not supported (deprecated since 2017); "
            "push the image again with a current client"
        )


def parse_index(data: bytes, what: str) -> list[Descriptor]:
    doc = _load(data, what)
    raw = doc.get("manifests")
    if not isinstance(raw, list):
        raise InvalidArgument(f"{what}: index has no manifests list")
    return [_descriptor(m, what) for m in raw]


def _variant_ok(want: Platform, have: Platform) -> bool:
    if want.variant == have.variant:
        return True
    # arm64 images often omit the (only) v8 variant.
    return want.architecture == "arm64" and have.variant in ("", "v8")


def select_platform(entries: list[Descriptor], want: Platform, what: str) -> Descriptor:
    """The index entry to run here: exact os/arch/variant, else os/arch with no variant."""
    # Nested indexes and attestation entries (unknown/unknown) never match a platform.
    candidates = [e for e in entries if e.media_type not in INDEX_TYPES]
    exact = [
        e for e in candidates
        if e.platform and e.platform.os == want.os
        and e.platform.architecture == want.architecture and _variant_ok(want, e.platform)
    ]
    if exact:
        return exact[0]
    loose = [
        e for e in candidates
        if e.platform and e.platform.os == want.os and e.platform.architecture == want.architecture
    ]
    if loose:
        return loose[0]
    platforms = sorted({str(e.platform) for e in entries if e.platform})
    # A hostile index may list thousands of platforms: name a few, count the rest.
    offered = ", ".join(platforms[:_PLATFORMS_NAMED]) or "none"
    if len(platforms) > _PLATFORMS_NAMED:
        offered += f" and {len(platforms) - _PLATFORMS_NAMED} more"
    raise NotFound(f"{what}: no image for platform {want} (the index offers: {offered})")


def parse_manifest(data: bytes, what: str) -> ImageManifest:
    doc = _load(data, what)
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schemaVersion must be 2")
    config = _descriptor(doc.get("config"), f"{what} config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument(f"{what}: manifest has no layers list")
    layers = tuple(_descriptor(layer, f"{what} layer {i}") for i, layer in enumerate(raw_layers))
    return ImageManifest(config, layers)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config that the runtime uses, plus the raw document."""

    raw: dict[str, Any]
    diff_ids: tuple[str, ...]
    platform: Platform

    @property
    def container_config(self) -> dict[str, Any]:
        cfg = self.raw.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def user(self) -> str:
        return str(self.container_config.get("User") or "")


def parse_config(data: bytes, what: str) -> ImageConfig:
    doc = _load(data, what)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidArgument(f"{what}: image config has no rootfs.diff_ids")
    diff_ids = tuple(str(d) for d in rootfs["diff_ids"])
    plat = Platform(str(doc.get("os", "")), str(doc.get("architecture", "")),
                    str(doc.get("variant", "")))
    return ImageConfig(doc, diff_ids, plat)
