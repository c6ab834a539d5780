"""PullImage: resolve a reference through registries.conf, fetch, verify, unpack, record.

- Two pulls of the same image (and credentials) share one task; two images sharing a
  layer share its download and unpack.
- Layers already unpacked (matched by the diff_id the image config names) are not fetched.
- Distinct layers download in parallel, bounded by ``max_concurrent_downloads`` over
  all pulls. A fresh download streams into its unpack helper as it arrives (the layer
  counts only once the blob's digest checked and the helper succeeded); a download that
  resumes an earlier attempt is unpacked afterwards, helpers bounded by the CPU count.
- A pull runs as its own task: a caller that goes away (kubelet cancels the RPC) does not
  cut it short, and the image appears only when every layer is in place.
- The signature policy (:mod:`moorage.image.policy`) is checked once the manifests are
  known and before the config or any layer is fetched: a refused image leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from moorage import log, metrics
from moorage.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    MoorageError,
    NotFound,
    ResourceExhausted,
    SignatureValidationFailed,
    Unavailable,
)
from moorage.image import manifest as mf
from moorage.image import policy as pol
from moorage.image import registries, sigstore
from moorage.image.credentials import Credentials
from moorage.image.reference import Reference
from moorage.image.registry import RegistryClient, check_digest
from moorage.image.store import Image, ImageStore, LayerInfo, layer_usage
from moorage.image.unpacker import (
    Compression,
    LayerNoSpace,
    Unpacker,
    UnpackResult,
    compression_for_media_type,
    unpack_layer,
)
from moorage.util.crash import crashpoint
from moorage.util.fs import NO_SPACE, remove_tree

_log = log.get("moorage.image")
T = TypeVar("T")
_RETRIES = 3
#: Most layers an image may have: overlayfs stacks at most 500 lower directories
#: (OVL_MAX_STACK in the kernel), so an image with more could never run. Checked before
#: anything is downloaded.
MAX_LAYERS = 500
#: Slack over ``max_layer_size`` for a compressed blob (gzip or zstd of incompressible data
#: is a little larger than its input).
_COMPRESSED_SLACK = 64 * 1024


class _SingleFlight(Generic[T]):
    """Runs one task per key; every caller awaits the same result."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[T]] = {}

    async def run(self, key: str, make: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            async def wrapped() -> T:
                try:
                    return await make()
                finally:
                    self._tasks.pop(key, None)

            task = asyncio.get_running_loop().create_task(wrapped())
            self._tasks[key] = task
        return await asyncio.shield(task)

    def __len__(self) -> int:
        return len(self._tasks)


@dataclass(frozen=True)
class _Resolved:
    source: registries.PullSource
    wanted: Reference  # the name the user asked for (fully qualified)
    top_digest: str
    digest: str  # of the manifest that runs (top_digest unless it came from an index)
    manifest: mf.ImageManifest
    blobs: dict[str, bytes]  # manifest and index documents by digest


class Puller:
    def __init__(
        self,
        store: ImageStore,
        client: RegistryClient,
        *,
        max_concurrent_downloads: int,
        max_manifest_size: int,
        max_layer_size: int,
        policies: pol.PolicyFiles,
        max_layer_entries: int = 0,
    ) -> None:
        self.store = store
        self.client = client
        #: The signature policy files (replaced on SIGHUP).
        self.policies = policies
        self._downloads = asyncio.Semaphore(max_concurrent_downloads)
        self._unpacks = asyncio.Semaphore(max(1, os.cpu_count() or 1))
        self._max_manifest = max_manifest_size
        self._max_layer = max_layer_size or None
        self._max_entries = max_layer_entries or None
        self._pulls: _SingleFlight[Image] = _SingleFlight()
        self._layers: _SingleFlight[None] = _SingleFlight()
        self.platform = mf.host_platform()

    @property
    def in_flight(self) -> int:
        return len(self._pulls)

    async def pull(self, ref_text: str, creds: Credentials | None, namespace: str = "") -> Image:
        """Pull ``ref_text``; ``namespace`` (the pod's, when kubelet says) may select a
        per-namespace signature policy."""
        candidates = registries.candidates(self.store.registries_conf, ref_text)
        who = "" if creds is None else hashlib.sha256(repr(creds.__dict__).encode()).hexdigest()
        policies = self.policies
        policy_path = await asyncio.to_thread(policies.path_for, namespace)
        key = f"{candidates[0]}|{who}|{policy_path}"
        return await self._pulls.run(
            key, lambda: self._pull(ref_text, candidates, creds, policies, policy_path))

    async def _pull(
        self, ref_text: str, candidates: list[Reference], creds: Credentials | None,
        policies: pol.PolicyFiles, policy_path: Path,
    ) -> Image:
        try:
            policy = await asyncio.to_thread(policies.load, policy_path)
            image, downloaded, fetched, present = await self._pull_once(
                ref_text, candidates, creds, policy)
        except MoorageError as e:
            metrics.record_image_pull_failure(e.code)
            raise
        metrics.record_image_pull(downloaded_bytes=downloaded, layers_downloaded=fetched,
                                  layers_present=present)
        return image

    async def _pull_once(
        self, ref_text: str, candidates: list[Reference], creds: Credentials | None,
        policy: pol.Policy,
    ) -> tuple[Image, int, int, int]:
        """The pull; also returns the bytes downloaded (compressed config and layers) and
        how many layers were downloaded or already present."""
        resolved = await self._resolve(ref_text, candidates, creds, policy)
        source, desc = resolved.source, resolved.manifest.config
        log_ = _log.bind(image=str(resolved.wanted), source=source.endpoint.location)
        check_digest(desc.digest, f"image {resolved.wanted} config")
        if desc.size > self._max_manifest:
            raise ResourceExhausted(
                f"image {resolved.wanted}: config {desc.digest} is {desc.size} bytes, over the "
                f"limit of {self._max_manifest} (max_manifest_size)"
            )
        layers = resolved.manifest.layers
        self._check_layer_bounds(str(resolved.wanted), layers)
        config_blob = await self.client.get_blob_bytes(
            source.endpoint, source.reference.path, desc.digest, creds, desc.size
        )
        config = mf.parse_config(config_blob, f"image {resolved.wanted} config")
        if len(config.diff_ids) != len(layers):
            raise InvalidArgument(
                f"image {resolved.wanted}: manifest has {len(layers)} layers but the config "
                f"names {len(config.diff_ids)} diff_ids"
            )
        for i, layer in enumerate(layers):
            check_digest(layer.digest, f"image {resolved.wanted} layer {i}")
            check_digest(config.diff_ids[i], f"image {resolved.wanted} diff_id {i}")
            try:
                compression_for_media_type(layer.media_type)  # refuse unknown types up front
            except InvalidArgument as e:
                raise InvalidArgument(
                    f"image {resolved.wanted} layer {i} ({layer.digest}): {e.message}"
                ) from None
        for diff_id in config.diff_ids:
            self.store.holds[diff_id] = self.store.holds.get(diff_id, 0) + 1
        missing = [(layer, diff_id)
                   for layer, diff_id in zip(layers, config.diff_ids, strict=True)
                   if not self.store.has_layer(diff_id)]
        try:
            await asyncio.gather(*(self._layer(source, layer, diff_id, creds)
                                   for layer, diff_id in missing))
            wanted = resolved.wanted
            repo_tag = f"{wanted.name}:{wanted.tag}" if wanted.tag else None
            size = desc.size + sum(layer.size for layer in layers)
            image = await self.store.commit(
                desc.digest, config_blob, config, resolved.blobs, size, repo_tag,
                f"{wanted.name}@{resolved.top_digest}",
            )
        finally:
            for diff_id in config.diff_ids:
                left = self.store.holds[diff_id] - 1
                if left:
                    self.store.holds[diff_id] = left
                else:
                    del self.store.holds[diff_id]
        log_.info("image.pulled", id=image.id, layers=len(layers))
        downloaded = desc.size + sum(layer.size for layer, _ in missing)
        return image, downloaded, len(missing), len(layers) - len(missing)

    def _check_layer_bounds(self, what: str, layers: tuple[mf.Descriptor, ...]) -> None:
        """Refuse, before any download, an image that could never run or that a layer's
        declared size already puts over ``max_layer_size``."""
        if len(layers) > MAX_LAYERS:
            raise FailedPrecondition(
                f"image {what}: manifest has {len(layers)} layers; overlayfs stacks at most "
                f"{MAX_LAYERS}"
            )
        if self._max_layer is None:
            return
        for i, layer in enumerate(layers):
            if layer.size > self._max_layer + self._max_layer // 100 + _COMPRESSED_SLACK:
                raise ResourceExhausted(
                    f"image {what}: layer {i} ({layer.digest}) is {layer.size} bytes "
                    f"compressed, over the limit of {self._max_layer} (max_layer_size)"
                )

    async def _resolve(
        self, ref_text: str, candidates: list[Reference], creds: Credentials | None,
        policy: pol.Policy,
    ) -> _Resolved:
        """The first candidate and source that has the image, once the signature policy
        accepts it. A refused image is not looked for at the candidate's other sources
        (its mirrors), but the next candidate (search registry) is tried, as in CRI-O."""
        errors: list[MoorageError] = []
        for wanted in candidates:
            for source in registries.pull_sources(self.store.registries_conf, wanted):
                try:
                    resolved = await self._resolve_at(source, wanted, creds)
                except (NotFound, Unavailable) as e:
                    _log.info("image.source_failed", image=str(wanted),
                              source=source.endpoint.location, error=e.message)
                    errors.append(e)
                    continue
                try:
                    await self._check_policy(policy, resolved, creds)
                except SignatureValidationFailed as e:
                    _log.warning("image.policy_refused", image=str(wanted),
                                 source=source.endpoint.location, error=e.message)
                    errors.append(e)
                    break
                return resolved
        refused = [e for e in errors if isinstance(e, SignatureValidationFailed)]
        if refused:
            raise refused[0]
        if len(errors) == 1:
            raise errors[0]
        first = next((e for e in errors if not isinstance(e, NotFound)), errors[-1])
        detail = "; ".join(e.message for e in errors)
        raise type(first)(f"pulling {ref_text!r} failed at every source: {detail}")

    async def _resolve_at(
        self, source: registries.PullSource, wanted: Reference, creds: Credentials | None
    ) -> _Resolved:
        ref = source.reference
        tag_or_digest = ref.digest or ref.tag or "latest"
        path = ref.path
        top = await self.client.get_manifest(source.endpoint, path, tag_or_digest, creds)
        what = f"image {wanted}"
        media_type = mf.media_type_of(top.data, top.media_type, what)
        mf.reject_schema1(media_type, what)
        blobs = {top.digest: top.data}
        current = top
        if media_type in mf.INDEX_TYPES:
            entry = mf.select_platform(mf.parse_index(top.data, what), self.platform, what)
            check_digest(entry.digest, f"{what} index entry")
            current = await self.client.get_manifest(source.endpoint, path, entry.digest, creds)
            media_type = mf.media_type_of(current.data, current.media_type, what)
            mf.reject_schema1(media_type, what)
            if media_type in mf.INDEX_TYPES:
                raise FailedPrecondition(f"{what}: nested image indexes are not supported")
            blobs[current.digest] = current.data
        if media_type not in mf.MANIFEST_TYPES:
            raise InvalidArgument(f"{what}: unsupported manifest type {media_type!r}")
        return _Resolved(source, wanted, top.digest, current.digest,
                         mf.parse_manifest(current.data, what), blobs)

    async def _check_policy(
        self, policy: pol.Policy, resolved: _Resolved, creds: Credentials | None
    ) -> None:
        """SignatureValidationFailed unless ``policy`` accepts the resolved image. The
        scope and the identity are the name asked for; signatures are read from the
        source that served the manifests (a mirror, maybe), as containers/image does."""
        digests = (resolved.digest,) if resolved.digest == resolved.top_digest else (
            resolved.digest, resolved.top_digest)
        image = pol.PulledImage(pol.identity_of(resolved.wanted), digests)

        async def signatures() -> list[sigstore.Signature]:
            out: list[sigstore.Signature] = []
            for digest in digests:
                out += await self._attachments(resolved.source, digest, creds)
            return out

        await pol.enforce(policy, image, signatures)

    async def _attachments(
        self, source: registries.PullSource, digest: str, creds: Credentials | None
    ) -> list[sigstore.Signature]:
        """The sigstore attachments of ``digest`` (cosign's ``sha256-<hex>.sig`` tag in
        the same repository); none when that tag does not exist. Non-signature layers
        are listed without their content."""
        tag = sigstore.attachment_tag(digest)
        path = source.reference.path
        where = f"{source.reference.name}:{tag}"
        try:
            found = await self.client.get_manifest(source.endpoint, path, tag, creds)
        except NotFound:
            return []
        try:
            layers = sigstore.attachment_layers(found.data, where)
        except sigstore.SignatureError as e:
            raise SignatureValidationFailed(f"signature attachment {e}") from None
        out = []
        total = 0
        for i, layer in enumerate(layers):
            origin = f"{where} layer {i}"
            payload = b""
            if layer.media_type == sigstore.SIGNATURE_MEDIA_TYPE:
                check_digest(layer.digest, origin)
                total += layer.size
                if total > sigstore.MAX_PAYLOAD_SIZE:
                    raise SignatureValidationFailed(
                        f"{origin}: the signature payloads of {where} add up to more than "
                        f"{sigstore.MAX_PAYLOAD_SIZE} bytes")
                payload = await self.client.get_blob_bytes(
                    source.endpoint, path, layer.digest, creds, layer.size)
            out.append(sigstore.Signature(layer.media_type, payload, layer.annotations,
                                          origin))
        return out

    async def _layer(
        self,
        source: registries.PullSource,
        layer: mf.Descriptor,
        diff_id: str,
        creds: Credentials | None,
    ) -> None:
        async def fetch_and_unpack() -> None:
            if self.store.has_layer(diff_id):
                return
            partial = self.store.ingest / f"{layer.digest.split(':', 1)[1]}.partial"
            compression = compression_for_media_type(layer.media_type)
            streamed: tuple[Path, UnpackResult] | None = None
            tmp: Path | None = None
            downloaded = False  # from then on the blob in ``partial`` is of no more use
            try:
                for attempt in range(1, _RETRIES + 1):
                    try:
                        async with self._downloads:
                            # A fresh download is unpacked while it arrives; one that
                            # resumes an earlier attempt's bytes is unpacked afterwards.
                            if await asyncio.to_thread(_is_empty, partial):
                                streamed = await self._fetch_streamed(
                                    source, layer, creds, partial, diff_id, compression)
                            else:
                                await self.client.fetch_blob(
                                    source.endpoint, source.reference.path, layer.digest,
                                    layer.size, creds, partial,
                                )
                        downloaded = True
                        break
                    except (Unavailable, DataLoss) as e:
                        if attempt == _RETRIES or "corrupt" in e.message:
                            if isinstance(e, DataLoss):
                                # The registry sent a wrong or cut body every time: keep
                                # nothing. (A stalled or unreachable registry keeps the
                                # partial download, which the next pull resumes.)
                                await asyncio.to_thread(partial.unlink, missing_ok=True)
                            raise
                        _log.info("image.layer_retry", digest=layer.digest, error=e.message)
                if streamed is not None:
                    tmp, result = streamed
                else:
                    tmp = self.store.new_layer_tmp(diff_id)
                    async with self._unpacks:
                        result = await unpack_layer(
                            partial, tmp, compression, max_size=self._max_layer,
                            max_entries=self._max_entries, name=layer.digest,
                        )
                if result.diff_id != diff_id:
                    raise DataLoss(
                        f"layer {layer.digest} unpacks to diff_id {result.diff_id}, but "
                        f"the image config says {diff_id}"
                    )
                used, inodes = await asyncio.to_thread(layer_usage, tmp)
                crashpoint("image.pull.layer_unpacked")
                await self.store.add_layer(tmp, LayerInfo(diff_id, result.size, used, inodes))
                crashpoint("image.pull.layer_added")
            except BaseException as e:
                if tmp is not None:
                    await asyncio.to_thread(remove_tree, tmp)
                full = e.strerror if isinstance(e, OSError) and e.errno in NO_SPACE else None
                if full is not None or isinstance(e, LayerNoSpace):
                    # A full disk: keep no partial download to resume (it holds the space
                    # the next attempt needs).
                    partial.unlink(missing_ok=True)
                if full is not None:
                    raise ResourceExhausted(
                        f"layer {layer.digest}: the image store's disk is full: {full}"
                    ) from None
                raise
            finally:
                if downloaded:
                    partial.unlink(missing_ok=True)

        await self._layers.run(diff_id, fetch_and_unpack)

    async def _fetch_streamed(
        self,
        source: registries.PullSource,
        layer: mf.Descriptor,
        creds: Credentials | None,
        partial: Path,
        diff_id: str,
        compression: Compression,
    ) -> tuple[Path, UnpackResult]:
        """Download a layer into ``partial`` from scratch while a helper unpacks it into a
        new temporary layer directory; returns that directory and the helper's answer.

        Both must hold before the layer counts: the download's digest check (a mismatch
        raises DataLoss, whatever the helper said) and the helper's success. On any error
        the helper is killed and reaped and the directory removed; ``partial`` keeps what
        arrived if the download failed (for a retry to resume), and is removed once the
        download succeeded.
        """
        tmp = self.store.new_layer_tmp(diff_id)
        read_fd, write_fd = os.pipe()  # both close-on-exec; the helper gets read_fd as stdin
        helper: Unpacker | None = None
        try:
            try:
                _widen_pipe(write_fd)
                helper = await Unpacker.start(
                    read_fd, tmp, compression, max_size=self._max_layer,
                    max_entries=self._max_entries, name=layer.digest,
                )
            finally:
                os.close(read_fd)
        except BaseException:
            os.close(write_fd)
            await asyncio.to_thread(remove_tree, tmp)
            raise
        try:
            # fetch_blob closes write_fd after the last byte: the helper then sees the end.
            await self.client.fetch_blob(
                source.endpoint, source.reference.path, layer.digest, layer.size, creds,
                partial, tee_fd=write_fd,
            )
            try:
                return tmp, await helper.result()
            finally:
                # The blob was unpacked (or refused). A syscall: no thread, whose
                # cancellation would skip it.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
        except BaseException:
            await helper.kill()
            await asyncio.to_thread(remove_tree, tmp)
            raise


def _is_empty(path: Path) -> bool:
    """No bytes of an earlier download to resume at ``path``."""
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return True


#: Pipe buffer asked for between a download and its unpack helper (Linux allows up to
#: /proc/sys/fs/pipe-max-size, 1 MiB by default, to an unprivileged process).
_PIPE_SIZE = 1 << 20


def _widen_pipe(fd: int) -> None:
    """Fewer wake-ups of the helper and the download's thread: a bigger pipe buffer."""
    with contextlib.suppress(OSError):  # a smaller pipe-max-size: keep the default
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
