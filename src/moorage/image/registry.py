"""A client for OCI distribution (v2) registries: manifests and blobs, with auth.

Only what a pull needs: ``GET /v2/<name>/manifests/<ref>`` and ``GET /v2/<name>/blobs/<digest>``,
anonymous, Basic and Bearer-token auth (username/password, identity token through the
OAuth2 refresh-token grant, or a registry token used as is), HTTPS with per-registry CA
certificates from a containers-certs.d(5) directory, and plain HTTP for registries marked
insecure. Every manifest and blob is checked against its digest while it streams.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from moorage import __version__
from moorage.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    MoorageError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from moorage.image.credentials import Credentials
from moorage.image.manifest import reject_schema1
from moorage.image.registries import Endpoint
from moorage.image.unpack import NICE as BACKGROUND_NICE

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        # Listed so a schema 1 registry answers with it and we can say so clearly.
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ]
)
CHUNK = 1024 * 1024
#: Redirects followed for one request (Go's net/http and so containerd stop at 10 too). On a
#: redirect to another origin aiohttp drops the Authorization header, as Go does, so
#: registry credentials never reach the blob store a registry redirects to.
MAX_REDIRECTS = 10
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


class RegistryError(MoorageError):
    """A registry answer we cannot use (the subclasses of MoorageError carry the code)."""


def check_digest(digest: str, what: str) -> str:
    if not _DIGEST_RE.match(digest):
        raise InvalidArgument(f"{what}: unsupported or malformed digest {digest!r}")
    return digest


@dataclass(frozen=True)
class Manifest:
    media_type: str
    data: bytes
    digest: str


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class _Challenge:
    scheme: str
    params: dict[str, str] = field(default_factory=dict)


_PARAM_RE = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


def parse_challenge(header: str) -> _Challenge:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _PARAM_RE.finditer(rest)}
    return _Challenge(scheme.lower(), params)


class RegistryClient:
    """One per daemon; safe for concurrent pulls. Call :meth:`close` at shutdown."""

    def __init__(
        self,
        *,
        certs_dir: Path,
        stall_timeout: float,
        max_manifest_size: int,
        connect_timeout: float = 30.0,
    ) -> None:
        self._certs_dir = certs_dir
        self._stall = stall_timeout or None
        self._max_manifest = max_manifest_size
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._ssl: dict[tuple[str, bool], ssl.SSLContext] = {}
        self._tokens: dict[tuple[str, str, str, str], _Token] = {}
        # Which scheme answered for an endpoint, so an insecure registry is probed once.
        self._scheme: dict[str, str] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                headers={"User-Agent": f"moorage/{__version__}"},
                connector=aiohttp.TCPConnector(limit_per_host=8, use_dns_cache=True),
                # Let a blob body gather up to CHUNK bytes while the loop is busy, so it is
                # read (and handed to the blob's thread) in few, large pieces.
                read_bufsize=CHUNK,
            )
        return self._session

    def _ssl_context(self, host: str, verify: bool) -> ssl.SSLContext:
        key = (host, verify)
        ctx = self._ssl.get(key)
        if ctx is None:
            ctx = ssl.create_default_context()
            if verify:
                cert_dir = self._certs_dir / host
                if cert_dir.is_dir():
                    for cert in sorted(cert_dir.glob("*.crt")):
                        ctx.load_verify_locations(cafile=str(cert))
                    for cert in sorted(cert_dir.glob("*.cert")):
                        key_file = cert.with_suffix(".key")
                        if key_file.exists():
                            ctx.load_cert_chain(str(cert), str(key_file))
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl[key] = ctx
        return ctx

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=self._stall
        )

    # -- requests with auth --------------------------------------------------------------

    async def _request(
        self,
        endpoint: Endpoint,
        repository: str,
        path: str,
        creds: Credentials | None,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        """GET ``/v2/<repository>/<path>``, answering an auth challenge once.

        ``repository`` is the full path on that registry (a mirror's location prefix is
        already part of it); only the host part of the endpoint's location is used.
        """
        host = endpoint.location.split("/", 1)[0]
        name = repository
        schemes = [self._scheme[host]] if host in self._scheme else (
            ["https", "http"] if endpoint.insecure else ["https"]
        )
        last: Exception | None = None
        for scheme in schemes:
            url = f"{scheme}://{host}/v2/{name}/{path}"
            try:
                resp = await self._get_authorized(url, host, name, endpoint, creds, headers)
            except (aiohttp.ClientConnectorError, aiohttp.ClientSSLError,
                    aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                last = e
                continue
            self._scheme[host] = scheme
            return resp
        raise Unavailable(f"registry {host} is unreachable: {_reason(last)}")

    async def _get_authorized(
        self,
        url: str,
        host: str,
        name: str,
        endpoint: Endpoint,
        creds: Credentials | None,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        session = self._client()
        verify = not endpoint.insecure
        ssl_arg = self._ssl_context(host, verify) if url.startswith("https:") else None
        scope = f"repository:{name}:pull"
        auth = self._cached_auth(host, scope, creds)
        for attempt in range(2):
            hdrs = dict(headers)
            if auth:
                hdrs["Authorization"] = auth
            try:
                resp = await session.get(url, headers=hdrs, ssl=ssl_arg if ssl_arg else True,
                                         timeout=self._timeout(), max_redirects=MAX_REDIRECTS)
            except TimeoutError as e:
                raise DeadlineExceeded(f"registry {host}: no answer for {url}") from e
            except aiohttp.TooManyRedirects as e:
                raise Unavailable(
                    f"registry {host}: more than {MAX_REDIRECTS} redirects for {url} "
                    "(a redirect loop?)"
                ) from e
            except aiohttp.RedirectClientError as e:
                raise Unavailable(
                    f"registry {host}: unusable redirect for {url}: {type(e).__name__} {e}"
                ) from e
            except aiohttp.ClientResponseError as e:
                # A malformed answer: oversized or broken headers, a bad status line, ...
                raise Unavailable(
                    f"registry {host}: unusable answer for {url}: {e.message or e}"
                ) from e
            if resp.status != 401 or attempt == 1:
                break
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            resp.release()
            auth = await self._authenticate(challenge, host, scope, creds, ssl_arg)
        if resp.status == 401:
            resp.release()
            if creds is None:
                raise Unauthenticated(
                    f"registry {host}: authentication required for {name} and no credentials "
                    "were given"
                )
            raise Unauthenticated(f"registry {host}: credentials rejected for {name}")
        if resp.status == 403:
            resp.release()
            raise PermissionDenied(f"registry {host}: access to {name} denied")
        return resp

    def _cached_auth(self, host: str, scope: str, creds: Credentials | None) -> str | None:
        now = time.monotonic()
        for (h, _realm, sc, who), token in self._tokens.items():
            if h == host and sc == scope and who == _who(creds) and token.expires > now:
                return f"Bearer {token.value}"
        return None

    async def _authenticate(
        self,
        challenge: _Challenge,
        host: str,
        scope: str,
        creds: Credentials | None,
        ssl_arg: ssl.SSLContext | None,
    ) -> str:
        if challenge.scheme == "basic":
            if creds is None or not (creds.username or creds.password):
                raise Unauthenticated(
                    f"registry {host}: authentication required and no credentials were given"
                )
            raw = f"{creds.username}:{creds.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if challenge.scheme != "bearer":
            raise Unauthenticated(
                f"registry {host}: unsupported auth challenge {challenge.scheme!r}"
            )
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise Unauthenticated(f"registry {host}: bearer challenge without a usable realm")
        service = challenge.params.get("service", "")
        scope = challenge.params.get("scope", scope)
        token = await self._fetch_token(realm, service, scope, creds, host)
        self._tokens[(host, realm, scope, _who(creds))] = token
        return f"Bearer {token.value}"

    async def _fetch_token(
        self, realm: str, service: str, scope: str, creds: Credentials | None, host: str
    ) -> _Token:
        session = self._client()
        realm_host = realm.split("/", 3)[2]
        ssl_ctx: ssl.SSLContext | bool = (
            self._ssl_context(realm_host, True) if realm.startswith("https:") else True
        )
        try:
            if creds is not None and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "service": service, "scope": scope, "client_id": "moorage"}
                resp = await session.post(realm, data=form, ssl=ssl_ctx, timeout=self._timeout())
            else:
                params = {"scope": scope} if scope else {}
                if service:
                    params["service"] = service
                auth = None
                if creds is not None and (creds.username or creds.password):
                    auth = aiohttp.BasicAuth(creds.username, creds.password)
                resp = await session.get(realm, params=params, auth=auth, ssl=ssl_ctx,
                                         timeout=self._timeout())
            async with resp:
                if resp.status in (401, 403):
                    raise Unauthenticated(
                        f"registry {host}: token server {realm_host} rejected the credentials"
                    )
                if resp.status != 200:
                    raise Unauthenticated(
                        f"registry {host}: token server {realm_host} answered {resp.status}"
                    )
                body: Any = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise Unavailable(f"registry {host}: token server {realm_host} failed: {e}") from e
        value = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise Unauthenticated(f"registry {host}: token server {realm_host} sent no token")
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 60.0
        # Refresh a little early so a token never expires in flight.
        return _Token(value, time.monotonic() + max(lifetime - 10.0, 5.0))

    # -- manifests and blobs -------------------------------------------------------------

    async def get_manifest(
        self, endpoint: Endpoint, repository: str, reference: str, creds: Credentials | None
    ) -> Manifest:
        """Fetch a manifest by tag or digest, checked against the digest when one is known."""
        resp = await self._request(
            endpoint, repository, f"manifests/{reference}", creds, {"Accept": MANIFEST_ACCEPT}
        )
        async with resp:
            where = f"{endpoint.location}/{repository}:{reference}"
            if resp.status == 404:
                raise NotFound(f"manifest unknown: {where} does not exist in the registry")
            if resp.status != 200:
                raise Unavailable(f"registry answered {resp.status} for manifest {where}")
            length = resp.content_length
            if length is not None and length > self._max_manifest:
                raise ResourceExhausted(
                    f"manifest {where} is {length} bytes, over the limit of "
                    f"{self._max_manifest} (max_manifest_size)"
                )
            data = await _read_bounded(resp, f"manifest {where}", self._max_manifest,
                                       "max_manifest_size")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest", "")
        # Schema 1 manifests are signed anew by the registry on every GET, so their bytes
        # never match a digest: say what they are before checking.
        reject_schema1(media_type, f"image {where}")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise DataLoss(f"manifest {where}: content has digest {digest}, not {reference}")
        if header_digest.startswith("sha256:") and header_digest != digest:
            raise DataLoss(
                f"manifest {where}: content has digest {digest}, registry said {header_digest}"
            )
        return Manifest(media_type, bytes(data), digest)

    async def get_blob_bytes(
        self,
        endpoint: Endpoint,
        repository: str,
        digest: str,
        creds: Credentials | None,
        max_size: int,
    ) -> bytes:
        """A small blob (an image config) in memory, checked against its digest."""
        resp = await self._request(endpoint, repository, f"blobs/{digest}", creds, {})
        async with resp:
            self._check_blob_status(resp, endpoint, repository, digest)
            data = await _read_bounded(resp, f"blob {digest}", max_size, None)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DataLoss(f"blob {digest}: content has digest {actual}; the blob is corrupt")
        return bytes(data)

    @staticmethod
    def _check_blob_status(
        resp: aiohttp.ClientResponse, endpoint: Endpoint, repository: str, digest: str
    ) -> None:
        if resp.status == 404:
            raise NotFound(f"blob unknown: {endpoint.location}/{repository}@{digest}")
        if resp.status not in (200, 206):
            raise Unavailable(
                f"registry answered {resp.status} for blob {endpoint.location}/{repository}"
                f"@{digest}"
            )

    async def fetch_blob(
        self,
        endpoint: Endpoint,
        repository: str,
        digest: str,
        size: int,
        creds: Credentials | None,
        partial: Path,
        progress: Callable[[int], None] | None = None,
        tee_fd: int | None = None,
    ) -> None:
        """Download a blob into ``partial``, resuming what an earlier attempt left there.

        On return ``partial`` holds exactly the blob, its digest checked; on a digest or size
        mismatch the partial file is removed so the next attempt starts over.

        With ``tee_fd`` (the write end of a pipe, blocking) the download starts from scratch
        and every byte is also written to ``tee_fd`` in order, as it arrives: a reader there
        (the unpack helper) works while the blob downloads. The reader must wait for this
        call's verdict before it trusts what it read. A reader that goes away (EPIPE) ends
        the copy, not the download. ``tee_fd`` is closed here, in every case, after the
        last byte written to it (the reader sees its end).

        Writing, hashing and the copy run in a thread of their own, one chunk behind the
        socket: the event loop only moves buffers.
        """
        hasher = hashlib.sha256()
        sink: _BlobSink | None = None
        try:
            have = 0 if tee_fd is not None else await asyncio.to_thread(
                _hash_existing, partial, hasher, size)
            headers = {"Range": f"bytes={have}-"} if have else {}
            resp = await self._request(endpoint, repository, f"blobs/{digest}", creds, headers)
            async with resp:
                self._check_blob_status(resp, endpoint, repository, digest)
                if have and resp.status != 206:
                    # The registry ignored the Range: start from scratch.
                    hasher = hashlib.sha256()
                    have = 0
                sink = await _BlobSink.open(partial, hasher, append=bool(have), tee_fd=tee_fd)
                written = await self._receive(resp, sink, digest, size, have, endpoint,
                                              progress)
        finally:
            if sink is None and tee_fd is not None:
                os.close(tee_fd)
        actual = "sha256:" + hasher.hexdigest()
        if written != size or actual != digest:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            if written != size:
                raise DataLoss(
                    f"blob {digest}: got {written} bytes, the manifest says {size}; "
                    "the blob is corrupt or truncated"
                )
            raise DataLoss(f"blob {digest}: content has digest {actual}; the blob is corrupt")

    async def _receive(
        self,
        resp: aiohttp.ClientResponse,
        sink: _BlobSink,
        digest: str,
        size: int,
        have: int,
        endpoint: Endpoint,
        progress: Callable[[int], None] | None,
    ) -> int:
        """Move the body into ``sink`` (closed on return); the blob's length so far, which
        passes ``size`` by at most one chunk (not stored)."""
        written = have
        try:
            async for chunk in resp.content.iter_chunked(CHUNK):
                written += len(chunk)
                if written > size:
                    break
                await sink.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        except TimeoutError as e:
            raise DeadlineExceeded(
                f"blob {digest}: no progress from {endpoint.location} for "
                f"{self._stall:.0f}s (pull_progress_timeout)"
            ) from e
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
            raise DataLoss(f"blob {digest}: transfer cut short: {e}") from e
        finally:
            await sink.close()
        return written


def _lower_thread_priority() -> None:
    """Hashing and writing a download is background work: on a busy node the event loop
    (every RPC) comes first. Linux's nice value is per thread."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       min(19, os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICE))


class _BlobSink:
    """Writes a downloading blob to its file, hashes it and copies it to an optional pipe,
    in a thread of its own so the event loop never hashes or blocks on a file or a pipe.

    One chunk is in the thread while the loop reads the next from the socket; chunks are
    handled in order. A thread of its own rather than the loop's default executor: a copy
    into a slow reader's pipe blocks, and must not take a thread other work needs.
    """

    def __init__(self, file: BinaryIO, hasher: Any, tee_fd: int | None) -> None:
        self._file = file
        self._hasher = hasher
        self._tee_fd = tee_fd
        self._tee_owned = tee_fd  # closed after the last chunk, in the thread
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moorage-blob",
                                            initializer=_lower_thread_priority)
        self._pending: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls, path: Path, hasher: Any, *, append: bool, tee_fd: int | None
    ) -> _BlobSink:
        file = await asyncio.to_thread(open, path, "ab" if append else "wb")
        return cls(file, hasher, tee_fd)

    async def write(self, chunk: bytes) -> None:
        """Queue ``chunk``; waits for the one before (and raises its error, if any)."""
        if self._pending is not None:
            await self._pending
        self._pending = asyncio.get_running_loop().run_in_executor(
            self._executor, self._store, chunk)

    async def close(self) -> None:
        """Finish the queued chunk, then close the file (and the tee) and end the thread.

        Cancelled meanwhile, the thread still closes the file after its chunk.
        """
        loop = asyncio.get_running_loop()
        last = loop.run_in_executor(self._executor, self._close_files)
        self._executor.shutdown(wait=False)
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                await asyncio.shield(pending)
        finally:
            if pending is not None and not pending.done():
                # Cancelled: still retrieve the chunk's outcome, so none is left unseen.
                pending.add_done_callback(_ignore_result)
            await asyncio.shield(last)

    def _close_files(self) -> None:
        try:
            self._file.close()
        finally:
            if self._tee_owned is not None:
                os.close(self._tee_owned)
                self._tee_owned = None

    def _store(self, chunk: bytes) -> None:
        self._file.write(chunk)
        # hashlib releases the GIL for buffers this large.
        self._hasher.update(chunk)
        if self._tee_fd is None:
            return
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._tee_fd, view) :]
        except BrokenPipeError:
            self._tee_fd = None  # the reader is gone: its own answer will say why


def _ignore_result(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def _read_bounded(
    resp: aiohttp.ClientResponse, what: str, limit: int, config_key: str | None
) -> bytearray:
    """A whole (small) body in memory, refused as soon as it passes ``limit`` bytes.

    With ``config_key`` the limit is the operator's (RESOURCE_EXHAUSTED, naming the key);
    without, it is the size a descriptor declared, and more bytes mean corrupt content.
    """
    data = bytearray()
    try:
        async for chunk in resp.content.iter_chunked(65536):
            data += chunk
            if len(data) > limit:
                if config_key is not None:
                    raise ResourceExhausted(
                        f"{what} is over the limit of {limit} bytes ({config_key})"
                    )
                raise DataLoss(f"{what}: the registry sent more than the {limit} bytes declared")
    except TimeoutError as e:
        raise DeadlineExceeded(f"{what}: the registry stalled") from e
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
        raise DataLoss(f"{what}: truncated body: {e}") from e
    return data


def _reason(error: Exception | None) -> str:
    """A connection failure in words, without aiohttp's connection-key noise."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate verification failed: {error.certificate_error}"
    if isinstance(error, aiohttp.ClientConnectorError):
        return str(error.os_error.strerror or error.os_error)
    return str(error)


def _who(creds: Credentials | None) -> str:
    if creds is None:
        return ""
    return hashlib.sha256(repr(
        (creds.username, creds.password, creds.identity_token, creds.registry_token)
    ).encode()).hexdigest()


def _hash_existing(partial: Path, hasher: Any, size: int) -> int:
    """Feed a resumable partial download into ``hasher``; returns its length (0: none)."""
    try:
        st = os.stat(partial)
    except FileNotFoundError:
        return 0
    if st.st_size >= size:
        partial.unlink()
        return 0
    with open(partial, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return st.st_size
