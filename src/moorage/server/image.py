"""runtime.v1.ImageService: translation between CRI messages and the image store."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.errors import InvalidArgument
from moorage.image.credentials import from_auth_config
from moorage.image.pull import Puller
from moorage.image.store import Image, ImageStore, find_in
from moorage.server import wire
from moorage.server.msgcache import Answers
from moorage.server.rpc import Ctx, fill_unimplemented, read, read_stream, unary
from moorage.util.fs import FsUsage

#: Images per StreamImagesResponse: far below any message limit, few messages.
STREAM_BATCH = 100


def _image_name(spec: pb.ImageSpec, field: str) -> str:
    name = spec.image.strip()
    if not name:
        raise InvalidArgument(f"{field}: an image reference or id is required")
    return name


def image_user(user: str) -> tuple[int | None, str]:
    """The image's ``User`` as CRI wants it: a numeric uid, else a user name."""
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return int(name), ""
    return None, name


def to_proto(image: Image, pinned: bool) -> pb.Image:
    uid, username = image_user(image.config.user)
    msg = pb.Image(
        id=image.id,
        repo_tags=image.repo_tags,
        repo_digests=image.repo_digests,
        size=image.size,
        username=username,
        spec=pb.ImageSpec(image=image.id),
        pinned=pinned,
    )
    if uid is not None:
        msg.uid.CopyFrom(pb.Int64Value(value=uid))
    return msg


def _fs_usage(usage: FsUsage) -> pb.FilesystemUsage:
    return pb.FilesystemUsage(
        timestamp=usage.timestamp_ns,
        fs_id=pb.FilesystemIdentifier(mountpoint=usage.mountpoint),
        used_bytes=pb.UInt64Value(value=usage.used_bytes),
        inodes_used=pb.UInt64Value(value=usage.inodes_used),
    )


class ImageService(pb_grpc.ImageServiceServicer):
    def __init__(self, store: ImageStore, puller: Puller,
                 container_fs: Callable[[], Awaitable[FsUsage]]) -> None:
        self.store = store
        self.puller = puller
        self.container_fs = container_fs

    @functools.cached_property
    def _answers(self) -> Answers[Image]:
        return Answers(lambda image: to_proto(image, self.store.pinned(image)))

    def _selected(self, request: pb.ListImagesRequest | pb.StreamImagesRequest,
                  images: Mapping[str, Image]) -> list[Image]:
        wanted = request.filter.image.image.strip() if request.HasField("filter") else ""
        if wanted:
            image = find_in(images, self.store.registries_conf, wanted)
            return [image] if image is not None else []
        return list(images.values())

    @read
    async def ListImages(self, request: pb.ListImagesRequest, context: Ctx) -> bytes:
        images = self.store.published()
        # The answer depends on the pinned patterns too (replaced on SIGHUP).
        pinned = self.store.pinned
        if not request.HasField("filter") or not request.filter.image.image.strip():
            return self._answers.listing(images, 1, lambda i: list(i.values()), pinned)
        return self._answers.repeated(1, self._selected(request, images), pinned)

    @read_stream
    async def StreamImages(self, request: pb.StreamImagesRequest, context: Ctx
                           ) -> AsyncIterator[bytes]:
        pinned = self.store.pinned
        images = self._selected(request, self.store.published())
        for start in range(0, len(images), STREAM_BATCH):
            yield self._answers.repeated(1, images[start:start + STREAM_BATCH], pinned)

    @read
    async def ImageStatus(self, request: pb.ImageStatusRequest, context: Ctx) -> bytes:
        image = find_in(self.store.published(), self.store.registries_conf,
                        _image_name(request.image, "image.image"))
        if image is None:
            return b""
        answer = wire.embed(1, self._answers.get(image, self.store.pinned))
        if request.verbose:
            info = json.dumps({
                "id": image.id,
                "repoTags": image.repo_tags,
                "repoDigests": image.repo_digests,
                "layers": list(image.layers),
                "manifestDigests": image.blobs,
                "pulledAt": image.pulled_at,
                "imageSpec": image.config.raw,
            })
            answer += pb.ImageStatusResponse(info={"info": info}).SerializeToString()
        return answer

    @unary
    async def PullImage(self, request: pb.PullImageRequest, context: Ctx
                        ) -> pb.PullImageResponse:
        name = _image_name(request.image, "image.image")
        auth = request.auth
        creds = from_auth_config(auth.username, auth.password, auth.auth, auth.server_address,
                                 auth.identity_token, auth.registry_token)
        # The pod's namespace may select a per-namespace signature policy (kubelet sends
        # the sandbox config; crictl pull does not).
        namespace = request.sandbox_config.metadata.namespace
        image = await self.puller.pull(name, creds, namespace)
        return pb.PullImageResponse(image_ref=image.id)

    @unary
    async def RemoveImage(self, request: pb.RemoveImageRequest, context: Ctx
                          ) -> pb.RemoveImageResponse:
        await self.store.remove(_image_name(request.image, "image.image"))
        return pb.RemoveImageResponse()

    @unary
    async def ImageFsInfo(self, request: pb.ImageFsInfoRequest, context: Ctx
                          ) -> pb.ImageFsInfoResponse:
        return pb.ImageFsInfoResponse(
            image_filesystems=[_fs_usage(await asyncio.to_thread(self.store.usage))],
            container_filesystems=[_fs_usage(await self.container_fs())],
        )


fill_unimplemented(ImageService, pb.DESCRIPTOR.services_by_name["ImageService"])
