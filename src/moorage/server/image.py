"""runtime.v1.ImageService: translation between CRI messages and the image store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.errors import InvalidArgument
from moorage.image.credentials import from_auth_config
from moorage.image.pull import Puller
from moorage.image.store import Image, ImageStore
from moorage.server.rpc import Ctx, fill_unimplemented, stream, unary
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

    def _list(self, request: pb.ListImagesRequest | pb.StreamImagesRequest) -> list[pb.Image]:
        wanted = request.filter.image.image.strip() if request.HasField("filter") else ""
        if wanted:
            image = self.store.find(wanted)
            return [self._proto(image)] if image is not None else []
        return [self._proto(i) for i in self.store.images()]

    def _proto(self, image: Image) -> pb.Image:
        return to_proto(image, self.store.pinned(image))

    @unary
    async def ListImages(self, request: pb.ListImagesRequest, context: Ctx
                         ) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=self._list(request))

    @stream
    async def StreamImages(self, request: pb.StreamImagesRequest, context: Ctx
                           ) -> AsyncIterator[pb.StreamImagesResponse]:
        images = self._list(request)
        for start in range(0, len(images), STREAM_BATCH):
            yield pb.StreamImagesResponse(images=images[start:start + STREAM_BATCH])

    @unary
    async def ImageStatus(self, request: pb.ImageStatusRequest, context: Ctx
                          ) -> pb.ImageStatusResponse:
        image = self.store.find(_image_name(request.image, "image.image"))
        if image is None:
            return pb.ImageStatusResponse()
        info: dict[str, str] = {}
        if request.verbose:
            info["info"] = json.dumps({
                "id": image.id,
                "repoTags": image.repo_tags,
                "repoDigests": image.repo_digests,
                "layers": list(image.layers),
                "manifestDigests": image.blobs,
                "pulledAt": image.pulled_at,
                "imageSpec": image.config.raw,
            })
        return pb.ImageStatusResponse(image=self._proto(image), info=info)

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
