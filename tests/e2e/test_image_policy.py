"""The signature policy end to end: a real registry holding signed and unsigned images
(signed here as cosign signs), the daemon from its CLI with policies that accept and
refuse each, driven over its socket as kubelet and crictl do."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_images import blob_gets, insecure_conf, pull, rpc_error, status
from tests.fixtures.cosign import Key, SignatureLayer, push_signatures, sign
from tests.fixtures.daemon import Daemon
from tests.fixtures.oci import Image, multiplatform_entries, push_image, push_index
from tests.fixtures.registry import Registry

ACCEPT = {"type": "insecureAcceptAnything"}
REJECT = {"type": "reject"}


@pytest.fixture
def daemon(tmp_path: Path, registry: Registry) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "d", registries_conf_text=insecure_conf(registry)).start()
    yield d
    d.stop()


def set_policy(d: Daemon, policy: dict[str, Any], path: Path | None = None) -> None:
    """Write the daemon's policy; it applies to the next pull (no SIGHUP)."""
    (path or d.policy_path).write_text(json.dumps(policy))


def refused(d: Daemon, ref: str, namespace: str = "") -> str:
    """Pull ``ref`` expecting the policy to refuse it, as CRI-O and kubelet put it: code
    UNKNOWN, message opening with the CRI's SignatureValidationFailed; returns it."""
    req = pb.PullImageRequest(image=pb.ImageSpec(image=ref))
    if namespace:
        req.sandbox_config.metadata.namespace = namespace
    e = rpc_error(d.images.PullImage, req)
    message = e.details() or ""
    assert e.code() == grpc.StatusCode.UNKNOWN, message
    assert message.startswith(f'SignatureValidationFailed: image "{ref}" is rejected by '
                              f"signature policy "), message
    return message


def assert_nothing_stored(d: Daemon) -> None:
    """No image, and no file at all under the image store: no blob, layer, layer record,
    image record, download or unpack in progress."""
    assert not d.images.ListImages(pb.ListImagesRequest()).images
    images = d.root / "images"
    assert [p for p in images.rglob("*") if not p.is_dir()] == []
    assert list((images / "layers").iterdir()) == []


def sigstore_policy(key: bytes | Path, identity: str = "matchRepository") -> dict[str, Any]:
    """A sigstoreSigned requirement with ``key`` (a file, or inline PEM)."""
    req: dict[str, Any] = {"type": "sigstoreSigned"}
    if isinstance(key, Path):
        req["keyPath"] = str(key)
    else:
        req["keyData"] = base64.b64encode(key).decode()
    if identity:
        req["signedIdentity"] = {"type": identity}
    return req


def test_accept_reject_and_the_most_specific_scope(daemon: Daemon, registry: Registry,
                                                   tmp_path: Path) -> None:
    open_ref = registry.ref("policy/open", "v1")
    blocked_ref = registry.ref("policy/blocked", "v1")
    push_image(registry, "policy/open", "v1", Image.busybox(labels={"p": "open"}))
    push_image(registry, "policy/blocked", "v1", Image.busybox(labels={"p": "blocked"}))
    push_image(registry, "policy/gpg", "v1", Image.busybox(labels={"p": "gpg"}))
    push_image(registry, "policy/open", "v2", Image.busybox(labels={"p": "open2"}))

    set_policy(daemon, {"default": [REJECT]})
    message = refused(daemon, open_ref)
    assert f"{daemon.policy_path}, default[0] (reject): this scope rejects every image" in (
        message)
    assert_nothing_stored(daemon)

    # A repository scope beside a default that accepts; a GPG requirement cannot be met.
    set_policy(daemon, {"default": [ACCEPT], "transports": {"docker": {
        f"{registry.host}/policy/blocked": [ACCEPT, REJECT],
        f"{registry.host}/policy/gpg": [{"type": "signedBy", "keyType": "GPGKeys",
                                         "keyPath": str(tmp_path / "k.gpg")}],
    }, "atomic": {f"{registry.host}/policy/open": [REJECT]}}})  # other transports: no say
    message = refused(daemon, blocked_ref)
    assert f'transports.docker["{registry.host}/policy/blocked"][1] (reject)' in message
    assert "GPG simple signing (signedBy) is not supported" in refused(
        daemon, registry.ref("policy/gpg", "v1"))
    assert_nothing_stored(daemon)
    image_id = pull(daemon, open_ref)
    assert status(daemon, image_id).image.repo_tags == [open_ref]

    # The host rejects, its namespace accepts: the most specific scope wins.
    set_policy(daemon, {"default": [ACCEPT], "transports": {"docker": {
        registry.host: [REJECT], f"{registry.host}/policy/blocked:v1": [ACCEPT]}}})
    pull(daemon, blocked_ref)
    assert f'transports.docker["{registry.host}"][0]' in refused(
        daemon, registry.ref("policy/open", "v2"))


def test_sigstore_signed_image_accepted_unsigned_refused(
        daemon: Daemon, registry: Registry, tmp_path: Path) -> None:
    key = Key.generate()
    key_file = tmp_path / "cosign.pub"
    key_file.write_bytes(key.public_pem())
    signed_digest = push_image(registry, "signed/app", "v1", Image.busybox(labels={"s": "1"}))
    unsigned = Image.busybox(labels={"s": "0"})
    push_image(registry, "signed/unsigned", "v1", unsigned)
    sign(registry, "signed/app", signed_digest, key)  # claims the repository, as cosign
    set_policy(daemon, {"default": [REJECT], "transports": {"docker": {
        f"{registry.host}/signed": [sigstore_policy(key_file)]}}})

    message = refused(daemon, registry.ref("signed/unsigned", "v1"))
    assert "a signature was required, but no signature exists" in message
    assert f'transports.docker["{registry.host}/signed"][0] (sigstoreSigned)' in message
    assert_nothing_stored(daemon)
    # Refused before anything but the manifest was asked for.
    assert blob_gets(registry, unsigned.config_blob().digest) == 0

    image_id = pull(daemon, registry.ref("signed/app", "v1"))
    assert status(daemon, image_id).image.repo_tags == [registry.ref("signed/app", "v1")]
    assert pull(daemon, registry.ref("signed/app", signed_digest)) == image_id
    # The same key given inline.
    set_policy(daemon, {"default": [REJECT], "transports": {"docker": {
        f"{registry.host}/signed": [sigstore_policy(key.public_pem())]}}})
    assert pull(daemon, registry.ref("signed/app", "v1")) == image_id


def test_wrong_key_digest_or_identity_is_refused(daemon: Daemon, registry: Registry) -> None:
    key, stranger = Key.generate(), Key.generate()
    host = registry.host
    set_policy(daemon, {"default": [REJECT], "transports": {"docker": {
        f"{host}/forged": [sigstore_policy(key.public_pem())],
        f"{host}/exact": [sigstore_policy(key.public_pem(), identity="")],
    }}})
    wrong_key = push_image(registry, "forged/wrong-key", "v1", Image.busybox(labels={"f": "1"}))
    sign(registry, "forged/wrong-key", wrong_key, stranger)
    assert "cryptographic signature verification failed" in refused(
        daemon, registry.ref("forged/wrong-key", "v1"))

    # A genuine signature of another image, attached to this one.
    other = push_image(registry, "forged/other-digest", "v0", Image.busybox(labels={"f": "2"}))
    this = push_image(registry, "forged/other-digest", "v1", Image.busybox(labels={"f": "3"}))
    push_signatures(registry, "forged/other-digest", this,
                    [SignatureLayer.make(key, f"{host}/forged/other-digest", other)])
    assert f"signature for digest {other} does not match" in refused(
        daemon, registry.ref("forged/other-digest", "v1"))

    # A genuine signature of this digest, made for another repository.
    moved = push_image(registry, "forged/other-identity", "v1", Image.busybox(labels={"f": "4"}))
    sign(registry, "forged/other-identity", moved, key, identity=f"{host}/forged/elsewhere")
    assert f"signature for identity {host}/forged/elsewhere is not accepted" in refused(
        daemon, registry.ref("forged/other-identity", "v1"))
    assert_nothing_stored(daemon)

    # The default signedIdentity (matchRepoDigestOrExact) wants the tag pulled: cosign's
    # repository-only claim is refused, a claim of repo:tag is accepted.
    exact = push_image(registry, "exact/app", "v1", Image.busybox(labels={"f": "5"}))
    sign(registry, "exact/app", exact, key)
    assert "is not accepted (matchRepoDigestOrExact)" in refused(
        daemon, registry.ref("exact/app", "v1"))
    sign(registry, "exact/app", exact, key, identity=f"{host}/exact/app:v1")
    pull(daemon, registry.ref("exact/app", "v1"))


def test_multi_platform_index_signatures(daemon: Daemon, registry: Registry) -> None:
    """cosign signs the index digest (``cosign sign repo:tag``); with --recursive each
    platform manifest too. Either signature admits this machine's platform manifest; one
    over another platform's manifest does not."""
    key = Key.generate()
    set_policy(daemon, {"default": [REJECT], "transports": {"docker": {
        f"{registry.host}/multi": [sigstore_policy(key.public_pem())]}}})
    entries = multiplatform_entries(Image.busybox(labels={"m": "index"}))
    native, foreign = (image.manifest_digest("oci") for image, _ in entries[:2])

    index = push_index(registry, "multi/index-signed", "v1", entries)
    sign(registry, "multi/index-signed", index, key)
    pull(daemon, registry.ref("multi/index-signed", "v1"))

    push_index(registry, "multi/platform-signed", "v1", entries)
    sign(registry, "multi/platform-signed", native, key)
    pull(daemon, registry.ref("multi/platform-signed", "v1"))

    push_index(registry, "multi/other-platform", "v1", entries)
    sign(registry, "multi/other-platform", foreign, key)
    assert "no signature exists" in refused(daemon, registry.ref("multi/other-platform", "v1"))


def test_signatures_come_from_the_mirror_the_identity_from_the_name(
        tmp_path: Path, registry: Registry) -> None:
    """containers/image reads signatures where the manifest came from (a mirror) but
    matches the scope and the signed identity against the name asked for."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # the name's own registry: never reached
    conf = (f'[[registry]]\nprefix = "{dead}/lib"\nlocation = "{dead}/lib"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{registry.host}/sigmirror/lib"\n'
            "insecure = true\n")
    key = Key.generate()
    d = Daemon(tmp_path / "d", registries_conf_text=conf).start()
    try:
        set_policy(d, {"default": [REJECT], "transports": {"docker": {
            f"{dead}/lib": [sigstore_policy(key.public_pem())]}}})
        by_mirror = push_image(registry, "sigmirror/lib/app", "1", Image.busybox(labels={"m": 1}))
        sign(registry, "sigmirror/lib/app", by_mirror, key)  # claims the mirror's name
        assert f"identity {registry.host}/sigmirror/lib/app is not accepted" in refused(
            d, f"{dead}/lib/app:1")
        sign(registry, "sigmirror/lib/app", by_mirror, key, identity=f"{dead}/lib/app")
        image_id = pull(d, f"{dead}/lib/app:1")
        assert status(d, image_id).image.repo_tags == [f"{dead}/lib/app:1"]
    finally:
        d.stop()


def test_missing_or_invalid_policy_fails_pulls_and_edits_apply(
        daemon: Daemon, registry: Registry) -> None:
    ref = registry.ref("policy/file", "v1")
    push_image(registry, "policy/file", "v1", Image.busybox(labels={"p": "file"}))
    daemon.policy_path.unlink()
    e = rpc_error(pull, daemon, ref)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"signature policy {daemon.policy_path} does not exist" in (e.details() or "")
    assert "image.signature_policy" in (e.details() or "")
    daemon.policy_path.write_text('{"default": [{"type": "insecureAcceptAnything"}], "x": 1}')
    e = rpc_error(pull, daemon, ref)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unknown field 'x'" in (e.details() or "")
    assert_nothing_stored(daemon)
    set_policy(daemon, {"default": [ACCEPT]})  # fixed: no SIGHUP needed
    pull(daemon, ref)


def test_per_namespace_policy(daemon: Daemon, registry: Registry) -> None:
    ref = registry.ref("policy/ns", "v1")
    push_image(registry, "policy/ns", "v1", Image.busybox(labels={"p": "ns"}))
    daemon.policy_dir.mkdir()
    set_policy(daemon, {"default": [REJECT]}, daemon.policy_dir / "locked.json")
    assert f"policy {daemon.policy_dir / 'locked.json'}, default[0]" in refused(
        daemon, ref, namespace="locked")
    assert_nothing_stored(daemon)
    req = pb.PullImageRequest(image=pb.ImageSpec(image=ref))
    req.sandbox_config.metadata.namespace = "open"
    image_id = daemon.images.PullImage(req, timeout=120).image_ref
    assert pull(daemon, ref) == image_id  # no pod namespace (crictl pull): the main policy


def test_short_name_refused_at_one_search_registry_is_pulled_from_the_next(
        tmp_path: Path, registry: Registry) -> None:
    """As CRI-O tries its pull candidates in turn: the same registry under two names,
    the first refused by its scope."""
    other_name = f"localhost:{registry.port}"
    conf = (f'unqualified-search-registries = ["{other_name}", "{registry.host}"]\n'
            f'[[registry]]\nlocation = "{other_name}"\ninsecure = true\n'
            f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    push_image(registry, "policy/short", "v1", Image.busybox(labels={"p": "short"}))
    d = Daemon(tmp_path / "d", registries_conf_text=conf).start()
    try:
        set_policy(d, {"default": [ACCEPT], "transports": {"docker": {other_name: [REJECT]}}})
        image_id = pull(d, "policy/short:v1")
        assert status(d, image_id).image.repo_tags == [registry.ref("policy/short", "v1")]
        assert "image.policy_refused" in d.log_path.read_text()
        # Refused at every candidate: the refusal is what the caller hears.
        set_policy(d, {"default": [REJECT]})
        e = rpc_error(pull, d, "policy/short:v2")
        assert e.code() == grpc.StatusCode.NOT_FOUND  # no such tag anywhere: not a refusal
        assert refused(d, f"{other_name}/policy/short:v1")
        req = pb.PullImageRequest(image=pb.ImageSpec(image="policy/short:v1"))
        e = rpc_error(d.images.PullImage, req)
        assert e.code() == grpc.StatusCode.UNKNOWN
        assert (e.details() or "").startswith(
            f'SignatureValidationFailed: image "{other_name}/policy/short:v1"')
    finally:
        d.stop()
