"""Tests of the registry/image fixtures themselves (tests/fixtures/*.py).

Reads go through plain ``urllib`` so they prove what the real registry serves,
independent of the fixtures' own client.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import ssl
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import zstandard
from cryptography import x509

from tests.conftest import RegistryFactory
from tests.fixtures import oci
from tests.fixtures.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1_SIGNED,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Compression,
    Image,
    Layer,
    RegistryClient,
    RegistryHTTPError,
    busybox_layer,
    busybox_layer_builder,
    corrupt_manifest,
    native_platform,
    push_image,
    push_index,
    push_schema1,
    sha256_digest,
)
from tests.fixtures.registry import Registry
from tests.fixtures.tokenserver import TokenSigner, decode_jwt, libtrust_key_id

pytestmark = pytest.mark.registry

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


@dataclass
class Got:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    context: ssl.SSLContext | None = None,
    method: str = "GET",
    data: bytes | None = None,
) -> Got:
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"
    req = urllib.request.Request(url, headers=dict(headers or {}), method=method, data=data)
    opener = _OPENER
    if context is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    try:
        with opener.open(req, timeout=10) as resp:
            return Got(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as e:
        return Got(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def tar_names(tar_data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar_data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def check_manifest(
    reg_url: str,
    repo: str,
    ref: str,
    digest: str,
    media_type: str,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    got = get(
        f"{reg_url}/v2/{repo}/manifests/{ref}",
        {"Accept": media_type, **(headers or {})},
        context=context,
    )
    assert got.status == 200, got.body
    assert got.headers["content-type"] == media_type
    assert got.headers["docker-content-digest"] == digest
    assert sha256_digest(got.body) == digest
    manifest: dict[str, Any] = got.json()
    assert manifest["mediaType"] == media_type
    return manifest


# ------------------------------------------------------------------ anonymous registry


def test_registry_fixture_basics(registry: Registry) -> None:
    assert registry.host.startswith("127.0.0.1:")
    assert registry.url == f"http://{registry.host}"
    assert registry.ca_cert_path is None
    got = get(f"{registry.url}/v2/")
    assert got.status == 200
    assert got.headers["docker-distribution-api-version"] == "registry/2.0"


def test_push_docker_schema2_and_read_back(registry: Registry, busybox_image: Image) -> None:
    digest = push_image(registry, "fixtures/busybox", "docker", busybox_image, fmt="docker")
    assert digest == busybox_image.manifest_digest("docker")
    manifest = check_manifest(registry.url, "fixtures/busybox", "docker", digest, DOCKER_MANIFEST)
    # By digest too.
    check_manifest(registry.url, "fixtures/busybox", digest, digest, DOCKER_MANIFEST)
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert [lay["mediaType"] for lay in manifest["layers"]] == [DOCKER_LAYER_GZIP]

    config_got = get(f"{registry.url}/v2/fixtures/busybox/blobs/{manifest['config']['digest']}")
    assert config_got.status == 200
    assert sha256_digest(config_got.body) == manifest["config"]["digest"]
    config = config_got.json()
    assert (config["architecture"], config["os"]) == (native_platform()["architecture"], "linux")
    assert config["config"]["Cmd"] == ["/bin/sh"]

    layer_desc = manifest["layers"][0]
    layer_got = get(f"{registry.url}/v2/fixtures/busybox/blobs/{layer_desc['digest']}")
    assert layer_got.status == 200
    assert sha256_digest(layer_got.body) == layer_desc["digest"]
    assert len(layer_got.body) == layer_desc["size"]
    tar_data = gzip.decompress(layer_got.body)
    assert sha256_digest(tar_data) == config["rootfs"]["diff_ids"][0]
    names = tar_names(tar_data)
    assert names["bin/busybox"].isfile() and names["bin/busybox"].mode == 0o755
    assert names["bin/sh"].issym() and names["bin/sh"].linkname == "busybox"

    tags = get(f"{registry.url}/v2/fixtures/busybox/tags/list").json()
    assert "docker" in tags["tags"]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_push_oci_layers(registry: Registry, compression: Compression) -> None:
    image = Image.busybox(
        compression,
        user="1000",
        working_dir="/tmp",
        labels={"org.example": "x"},
        stop_signal="SIGINT",
    )
    repo = f"fixtures/oci-{compression}"
    digest = push_image(registry, repo, "v1", image, fmt="oci")
    manifest = check_manifest(registry.url, repo, "v1", digest, OCI_MANIFEST)
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    expected_type = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER}
    assert manifest["layers"][0]["mediaType"] == expected_type[compression]

    body = get(f"{registry.url}/v2/{repo}/blobs/{manifest['layers'][0]['digest']}").body
    if compression == "gzip":
        tar_data = gzip.decompress(body)
    elif compression == "zstd":
        assert body[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
        tar_data = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    else:
        tar_data = body
    config = get(f"{registry.url}/v2/{repo}/blobs/{manifest['config']['digest']}").json()
    assert sha256_digest(tar_data) == config["rootfs"]["diff_ids"][0]
    assert config["config"]["User"] == "1000"
    assert config["config"]["StopSignal"] == "SIGINT"


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_push_index(registry: Registry, fmt: oci.Fmt) -> None:
    repo = f"fixtures/multi-{fmt}"
    digest = push_index(registry, repo, "latest", fmt=fmt)
    media_type = OCI_INDEX if fmt == "oci" else DOCKER_MANIFEST_LIST
    index = check_manifest(registry.url, repo, "latest", digest, media_type)
    platforms = [m["platform"] for m in index["manifests"]]
    assert native_platform() in platforms
    assert any(
        p["architecture"] != native_platform()["architecture"] and p["os"] == "linux"
        for p in platforms
    )
    if fmt == "oci":
        att = index["manifests"][-1]
        assert att["platform"] == {"architecture": "unknown", "os": "unknown"}
        assert att["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
        assert att["annotations"]["vnd.docker.reference.digest"] == index["manifests"][0]["digest"]
    else:
        assert len(index["manifests"]) == 2
    child_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    for entry in index["manifests"]:
        expected = OCI_MANIFEST if "annotations" in entry else child_type
        assert entry["mediaType"] == expected
        child = check_manifest(registry.url, repo, entry["digest"], entry["digest"], expected)
        assert entry["size"] == len(json.dumps(child, separators=(",", ":")).encode())
        if "annotations" not in entry:
            config = get(f"{registry.url}/v2/{repo}/blobs/{child['config']['digest']}").json()
            assert config["architecture"] == entry["platform"]["architecture"]


def test_busybox_layer_is_deterministic_and_complete() -> None:
    a = busybox_layer_builder().build("gzip")
    b = busybox_layer_builder().build("gzip")
    assert (a.digest, a.diff_id) == (b.digest, b.diff_id)
    assert busybox_layer("gzip").digest == a.digest
    names = tar_names(gzip.decompress(a.data))
    for applet in ("sh", "ls", "cat", "echo", "sleep", "true", "id"):
        assert names[f"bin/{applet}"].issym()
    assert names["tmp"].isdir() and names["tmp"].mode == 0o1777
    for d in ("dev", "proc", "sys"):
        assert names[d].isdir()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(a.data))) as tar:
        member = tar.extractfile("etc/passwd")
        assert member is not None
        passwd = member.read().decode()
    assert "app:x:1000:1000:" in passwd and passwd.startswith("root:x:0:0:")
    hard = busybox_layer_builder(links="hardlink").build("none")
    hnames = tar_names(hard.data)
    assert hnames["bin/ls"].islnk() and hnames["bin/ls"].linkname == "bin/busybox"


def test_layer_builder_special_and_hostile_entries() -> None:
    layer = (
        Layer()
        .add_dir("/etc", mode=0o700)
        .add_file(
            "etc/app.conf",
            b"hello",
            mode=0o640,
            uid=1000,
            gid=1000,
            mtime=42,
            xattrs={"user.note": "x", "security.capability": b"\x01\x00\xff"},
        )
        .add_symlink("link", "/etc/app.conf")
        .add_hardlink("hard", "etc/app.conf")
        .add_char_device("dev/null", 1, 3)
        .add_block_device("dev/loop0", 7, 0)
        .add_fifo("fifo")
        .add_whiteout("usr/share/doc")
        .add_opaque("var/cache")
    )
    evil = tarfile.TarInfo("../evil")
    absolute = tarfile.TarInfo("/abs")
    sym = tarfile.TarInfo("x")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/tmp/.."
    through = tarfile.TarInfo("x/pwned")
    hard = tarfile.TarInfo("passwd")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    layer.add_tarinfo(evil, b"e").add_tarinfo(absolute, b"a").add_tarinfo(sym)
    layer.add_tarinfo(through, b"p").add_tarinfo(hard)

    blob = layer.build("gzip")
    assert blob.media_type == OCI_LAYER_GZIP
    assert blob.digest == sha256_digest(blob.data) and blob.size == len(blob.data)
    tar_data = gzip.decompress(blob.data)
    assert blob.diff_id == sha256_digest(tar_data)
    assert layer.build("gzip", fmt="docker").media_type == DOCKER_LAYER_GZIP

    m = tar_names(tar_data)
    assert list(m) == layer.names
    f = m["etc/app.conf"]
    assert (f.mode, f.uid, f.gid, f.mtime, f.size) == (0o640, 1000, 1000, 42, 5)
    assert f.pax_headers["SCHILY.xattr.user.note"] == "x"
    raw_cap = f.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
    assert raw_cap == b"\x01\x00\xff"
    assert m["etc"].isdir() and m["etc"].mode == 0o700
    assert m["link"].issym() and m["link"].linkname == "/etc/app.conf"
    assert m["hard"].islnk() and m["hard"].linkname == "etc/app.conf"
    assert m["dev/null"].ischr() and (m["dev/null"].devmajor, m["dev/null"].devminor) == (1, 3)
    assert m["dev/loop0"].isblk()
    assert m["fifo"].isfifo()
    assert "usr/share/.wh.doc" in m and "var/cache/.wh..wh..opq" in m
    assert "../evil" in m and "/abs" in m
    assert m["x"].linkname == "/tmp/.." and "x/pwned" in m
    assert m["passwd"].islnk() and m["passwd"].linkname == "/etc/passwd"


# ------------------------------------------------------------------ basic auth


def test_basic_auth_registry(auth_registry: Registry, busybox_image: Image) -> None:
    url = auth_registry.url
    anon = get(f"{url}/v2/")
    assert anon.status == 401
    assert anon.headers["www-authenticate"].lower().startswith("basic ")
    assert get(f"{url}/v2/", basic("alice", "wrong")).status == 401
    assert get(f"{url}/v2/", basic("mallory", "secret")).status == 401
    assert get(f"{url}/v2/", basic("alice", "secret")).status == 200

    digest = push_image(auth_registry, "fixtures/private", "v1", busybox_image)
    check_manifest(url, "fixtures/private", "v1", digest, DOCKER_MANIFEST, basic("alice", "secret"))
    assert get(f"{url}/v2/fixtures/private/manifests/v1", {"Accept": DOCKER_MANIFEST}).status == 401

    with pytest.raises(RegistryHTTPError) as err:
        push_image(auth_registry, "fixtures/private", "v2", busybox_image, auth=("alice", "nope"))
    assert err.value.response.status == 401


# ------------------------------------------------------------------ token auth


def test_token_flow(token_registry: Registry, busybox_image: Image) -> None:
    server = token_registry.token_server
    assert server is not None
    url = token_registry.url
    challenge = get(f"{url}/v2/")
    assert challenge.status == 401
    scheme, params = oci.parse_challenge(challenge.headers["www-authenticate"])
    assert scheme == "bearer"
    assert params["realm"] == server.realm and params["realm"].startswith("http://127.0.0.1:")
    assert params["service"] == server.service

    digest = push_image(token_registry, "fixtures/tok", "v1", busybox_image)

    scope = "repository:fixtures/tok:pull"
    query = urllib.parse.urlencode({"service": params["service"], "scope": scope})
    assert get(f"{params['realm']}?{query}", basic("alice", "wrong")).status == 401
    resp = get(f"{params['realm']}?{query}", basic("alice", "secret"))
    assert resp.status == 200
    body = resp.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300 and body["issued_at"].endswith("Z")
    header, claims = decode_jwt(body["token"])
    assert header["alg"] == "ES256" and len(header["x5c"]) == 1
    assert claims["aud"] == server.service and claims["iss"] == server.issuer
    assert claims["sub"] == "alice"
    assert claims["access"] == [{"type": "repository", "name": "fixtures/tok", "actions": ["pull"]}]

    bearer = {"Authorization": f"Bearer {body['token']}"}
    check_manifest(url, "fixtures/tok", "v1", digest, DOCKER_MANIFEST, bearer)
    # The token is scoped: another repository is refused.
    other = get(f"{url}/v2/fixtures/other/manifests/v1", {**bearer, "Accept": DOCKER_MANIFEST})
    assert other.status == 401
    assert 'error="insufficient_scope"' in other.headers["www-authenticate"]
    # A token signed by a key the registry does not trust is refused.
    rogue = TokenSigner(issuer=server.issuer)  # right claims, untrusted key
    forged = rogue.token(audience=server.service, subject="alice", access=claims["access"])
    assert get(f"{url}/v2/", {"Authorization": f"Bearer {forged}"}).status == 401
    assert get(f"{url}/v2/", {"Authorization": "Bearer not.a.jwt"}).status == 401
    # Expired beyond the registry's 60 s leeway.
    expired = server.issue_token("alice", ["repository:fixtures/tok:pull"], ttl=-120)
    assert get(f"{url}/v2/", {"Authorization": f"Bearer {expired}"}).status == 401


def test_token_anonymous_pull_of_public_repositories(
    token_registry: Registry, busybox_image: Image
) -> None:
    url = token_registry.url
    digest = push_image(token_registry, "public/busybox", "v1", busybox_image, fmt="oci")
    push_image(token_registry, "fixtures/secret", "v1", busybox_image, fmt="oci")
    anonymous = RegistryClient(token_registry, auth=None)
    got = anonymous.get_manifest("public/busybox", "v1")
    assert got.status == 200 and sha256_digest(got.body) == digest
    assert anonymous.get_manifest("fixtures/secret", "v1").status == 401
    with pytest.raises(RegistryHTTPError) as err:
        push_image(token_registry, "public/busybox", "v2", busybox_image, auth=None)
    assert err.value.response.status == 401
    assert get(f"{url}/v2/public/busybox/manifests/v1").status == 401  # no token at all


def test_token_oauth_post_and_identity_tokens(
    token_registry: Registry, busybox_image: Image
) -> None:
    server = token_registry.token_server
    assert server is not None
    form = {
        "grant_type": "password",
        "username": "alice",
        "password": "secret",
        "service": server.service,
        "scope": "repository:fixtures/oauth:pull,push",
        "client_id": "tests",
        "access_type": "offline",
    }
    post_headers = {"Content-Type": "application/x-www-form-urlencoded"}
    resp = get(
        server.realm, post_headers, method="POST", data=urllib.parse.urlencode(form).encode()
    )
    assert resp.status == 200, resp.body
    body = resp.json()
    assert body["access_token"] and body["refresh_token"]
    assert body["scope"] == "repository:fixtures/oauth:pull,push"
    bad = get(
        server.realm,
        post_headers,
        method="POST",
        data=urllib.parse.urlencode({**form, "password": "x"}).encode(),
    )
    assert bad.status == 401

    refresh = body["refresh_token"]
    form2 = {
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "service": server.service,
        "scope": "repository:fixtures/oauth:pull",
    }
    resp2 = get(
        server.realm, post_headers, method="POST", data=urllib.parse.urlencode(form2).encode()
    )
    assert resp2.status == 200
    assert decode_jwt(resp2.json()["access_token"])[1]["sub"] == "alice"
    unknown = get(
        server.realm,
        post_headers,
        method="POST",
        data=urllib.parse.urlencode({**form2, "refresh_token": "nope"}).encode(),
    )
    assert unknown.status == 401

    # An identity-token client (no password) pushes through the POST flow.
    identity = server.issue_refresh_token("alice")
    before = len(server.requests)
    client = RegistryClient(token_registry, auth=None, identity_token=identity)
    digest = push_image(token_registry, "fixtures/oauth", "v1", busybox_image, client=client)
    grants = [r for r in server.requests[before:] if r.method == "POST"]
    assert grants and all(r.grant_type == "refresh_token" and r.account == "alice" for r in grants)
    assert client.get_manifest("fixtures/oauth", "v1").status == 200
    assert digest == busybox_image.manifest_digest("docker")

    # GET with offline_token=true also hands out a refresh token.
    q = urllib.parse.urlencode(
        {"service": server.service, "offline_token": "true", "client_id": "tests"}
    )
    assert get(f"{server.realm}?{q}", basic("alice", "secret")).json()["refresh_token"]


@pytest.mark.parametrize(("key_mode", "algorithm"), [("kid", "ES256"), ("x5c", "RS256")])
def test_token_signing_modes(
    fresh_registry: RegistryFactory, busybox_image: Image, key_mode: str, algorithm: str
) -> None:
    reg = fresh_registry(auth="token", token_key_mode=key_mode, token_algorithm=algorithm)
    assert reg.token_server is not None
    push_image(reg, "fixtures/modes", "v1", busybox_image)
    token = reg.token_server.issue_token("alice", ["repository:fixtures/modes:pull"])
    header, _claims = decode_jwt(token)
    assert header["alg"] == algorithm
    if key_mode == "kid":
        assert header["kid"] == libtrust_key_id(reg.token_server.signer.root.key.public_key())
        assert "x5c" not in header
    got = get(
        f"{reg.url}/v2/fixtures/modes/manifests/v1",
        {"Authorization": f"Bearer {token}", "Accept": DOCKER_MANIFEST},
    )
    assert got.status == 200


# ------------------------------------------------------------------ TLS


def test_tls_registry(tls_registry: Registry, busybox_image: Image) -> None:
    assert tls_registry.url.startswith("https://127.0.0.1:")
    assert tls_registry.ca_cert_path is not None and tls_registry.ca_cert_path.is_file()
    ca = x509.load_pem_x509_certificate(tls_registry.ca_cert_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    ctx = ssl.create_default_context(cafile=str(tls_registry.ca_cert_path))
    assert get(f"{tls_registry.url}/v2/", context=ctx).status == 200
    with pytest.raises(urllib.error.URLError) as err:
        get(f"{tls_registry.url}/v2/", context=ssl.create_default_context())
    assert isinstance(err.value.reason, ssl.SSLCertVerificationError)

    digest = push_image(tls_registry, "fixtures/tls", "v1", busybox_image, fmt="oci")
    check_manifest(tls_registry.url, "fixtures/tls", "v1", digest, OCI_MANIFEST, context=ctx)


def test_tls_with_token_auth(fresh_registry: RegistryFactory, busybox_image: Image) -> None:
    reg = fresh_registry(auth="token", tls=True)
    assert reg.token_server is not None and reg.token_server.realm.startswith("https://127.0.0.1:")
    digest = push_image(reg, "fixtures/tls-token", "v1", busybox_image)
    got = RegistryClient(reg).get_manifest("fixtures/tls-token", "v1")
    assert got.status == 200 and sha256_digest(got.body) == digest


# ------------------------------------------------------------------ schema 1


def test_schema1(schema1_registry: Registry, registry: Registry, busybox_image: Image) -> None:
    digest = push_schema1(schema1_registry, "fixtures/old", "v1", busybox_image)
    got = get(
        f"{schema1_registry.url}/v2/fixtures/old/manifests/v1", {"Accept": DOCKER_SCHEMA1_SIGNED}
    )
    assert got.status == 200
    assert got.headers["content-type"] == DOCKER_SCHEMA1_SIGNED
    # The registry re-signs on GET; the digest is that of the unsigned payload.
    assert got.headers["docker-content-digest"] == digest == oci.schema1_payload_digest(got.body)
    assert sha256_digest(got.body) != digest
    manifest = got.json()
    assert manifest["schemaVersion"] == 1 and manifest["signatures"]
    assert manifest["fsLayers"] == [{"blobSum": busybox_image.layers[0].digest}]
    # A registry without compatibility.schema1.enabled refuses the push.
    with pytest.raises(RegistryHTTPError):
        push_schema1(registry, "fixtures/old", "v1", busybox_image)


# ------------------------------------------------------------------ tampering and lifecycle


def test_corruption_helpers(fresh_registry: RegistryFactory, busybox_image: Image) -> None:
    reg = fresh_registry()
    digest = push_image(reg, "fixtures/bad", "v1", busybox_image)
    layer = busybox_image.layers[0]

    reg.corrupt_blob(layer.digest)  # same size, one byte flipped
    got = get(f"{reg.url}/v2/fixtures/bad/blobs/{layer.digest}")
    assert got.status == 200 and len(got.body) == layer.size
    assert sha256_digest(got.body) != layer.digest

    new = corrupt_manifest(reg, digest)
    got = get(f"{reg.url}/v2/fixtures/bad/manifests/v1", {"Accept": DOCKER_MANIFEST})
    assert got.status == 200 and got.body == new
    assert got.headers["docker-content-digest"] == digest != sha256_digest(got.body)

    reg.remove_blob_data(layer.digest)
    assert get(f"{reg.url}/v2/fixtures/bad/blobs/{layer.digest}").status == 404

    # mutate_manifest: a manifest that lies about its layer's size is accepted.
    def lie(m: dict[str, Any]) -> None:
        m["layers"][0]["size"] += 1

    other = Image.busybox("zstd")
    d2 = push_image(reg, "fixtures/bad", "lies", other, fmt="oci", mutate_manifest=lie)
    m2 = check_manifest(reg.url, "fixtures/bad", "lies", d2, OCI_MANIFEST)
    assert m2["layers"][0]["size"] == other.layers[0].size + 1


def test_fresh_registry_is_cleaned_up(fresh_registry: RegistryFactory) -> None:
    reg = fresh_registry(auth="basic", users={"bob": "pw"})
    pid = reg.pid
    assert pid is not None and os.path.exists(f"/proc/{pid}")
    assert get(f"{reg.url}/v2/", basic("bob", "pw")).status == 200
    reg.stop()
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie_or_gone(pid)
    with pytest.raises(urllib.error.URLError):
        get(f"{reg.url}/v2/")


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_config_digest_matches_manifest(busybox_image: Image) -> None:
    fmts: tuple[oci.Fmt, ...] = ("docker", "oci")
    for fmt in fmts:
        manifest = busybox_image.manifest_dict(fmt)
        config = busybox_image.config_blob(fmt)
        assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(config.data).hexdigest()
        assert manifest["config"]["size"] == len(config.data)
