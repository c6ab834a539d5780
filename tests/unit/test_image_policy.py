"""Signature policy (containers-policy.json(5)) parsing, scopes, identities and sigstore
verification: the parts that need no registry."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from moorage import config
from moorage.errors import SignatureValidationFailed
from moorage.image import policy as pol
from moorage.image import reference as refs
from moorage.image import sigstore
from tests.fixtures.cosign import SIGNATURE_ANNOTATION, Key, SignatureLayer, payload

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
ACCEPT = {"type": "insecureAcceptAnything"}
REJECT = {"type": "reject"}


def parse(doc: Any) -> pol.Policy:
    return pol.parse(json.dumps(doc), "policy.json")


def scope_of(policy: pol.Policy, ref: str) -> str:
    return policy.requirements_for(pol.identity_of(refs.normalize(ref)))[0]


# --------------------------------------------------------------------------- parsing


def test_scopes_most_specific_first_then_transport_default_then_default() -> None:
    p = parse({"default": [REJECT], "transports": {"docker": {
        "": [ACCEPT],
        "quay.io": [ACCEPT],
        "quay.io/ns": [ACCEPT],
        "quay.io/ns/repo": [ACCEPT],
        "quay.io/ns/repo:v1": [ACCEPT],
        f"quay.io/ns/repo@{DIGEST}": [ACCEPT],
        "*.example.com": [ACCEPT],
        "*.com": [ACCEPT],
    }, "atomic": {"quay.io/ns/repo": [REJECT]}}})
    assert scope_of(p, "quay.io/ns/repo:v1") == 'transports.docker["quay.io/ns/repo:v1"]'
    assert scope_of(p, f"quay.io/ns/repo:v1@{DIGEST}") == (
        f'transports.docker["quay.io/ns/repo@{DIGEST}"]')  # the tag beside a digest drops
    assert scope_of(p, "quay.io/ns/repo:v2") == 'transports.docker["quay.io/ns/repo"]'
    assert scope_of(p, "quay.io/ns/other") == 'transports.docker["quay.io/ns"]'
    assert scope_of(p, "quay.io/x/y") == 'transports.docker["quay.io"]'
    assert scope_of(p, "a.b.example.com:5000/x") == 'transports.docker["*.example.com"]'
    assert scope_of(p, "registry.other.com/x") == 'transports.docker["*.com"]'
    assert scope_of(p, "busybox") == 'transports.docker[""]'
    assert scope_of(parse({"default": [REJECT]}), "busybox") == "default"
    assert pol.scope_namespaces(refs.normalize("a.b.c:5000/ns/repo:1")) == [
        "a.b.c:5000/ns/repo", "a.b.c:5000/ns", "a.b.c:5000", "*.b.c", "*.c"]


@pytest.mark.parametrize(("doc", "error"), [
    ({}, '"default" requirements are required'),
    ({"default": []}, "non-empty list of requirements"),
    ({"default": [ACCEPT], "extra": 1}, "unknown field 'extra'"),
    ({"default": [{"type": "insecureAcceptAnything", "x": 1}]}, "unknown field 'x'"),
    ({"default": [{"type": "maybe"}]}, "unknown requirement type 'maybe'"),
    ({"default": [{}]}, 'with a "type"'),
    ({"default": [ACCEPT], "transports": {"docker": {"x": []}}},
     'transports.docker["x"]: must be a non-empty list'),
    ({"default": [{"type": "sigstoreSigned"}]}, "exactly one of keyPath"),
    ({"default": [{"type": "sigstoreSigned", "keyPath": "/k", "keyData": "eA=="}]},
     "exactly one of keyPath"),
    ({"default": [{"type": "sigstoreSigned", "keyData": "not base64!"}]}, "base64"),
    ({"default": [{"type": "sigstoreSigned", "keyPath": "/k",
                   "signedIdentity": {"type": "nope"}}]}, "unknown signedIdentity"),
    ({"default": [{"type": "sigstoreSigned", "keyPath": "/k", "signedIdentity": {
        "type": "exactReference", "dockerReference": "quay.io/a/b"}}]}, "tag or a digest"),
    ({"default": [{"type": "sigstoreSigned", "keyPath": "/k", "signedIdentity": {
        "type": "remapIdentity", "prefix": "busybox", "signedPrefix": "quay.io"}}]},
     "fully expanded form"),
    ({"default": [{"type": "signedBy", "keyType": "X509", "keyPath": "/k"}]}, "keyType"),
])
def test_invalid_policies_are_refused_naming_the_flaw(doc: Any, error: str) -> None:
    with pytest.raises(pol.PolicyError) as e:
        parse(doc)
    assert error in e.value.message and "policy.json" in e.value.message


def test_duplicate_fields_and_bad_json_are_refused() -> None:
    with pytest.raises(pol.PolicyError, match="duplicate field 'default'"):
        pol.parse('{"default": [{"type": "reject"}], "default": []}', "p")
    with pytest.raises(pol.PolicyError, match="not valid JSON"):
        pol.parse("{", "p")


def test_unsupported_requirements_parse_and_say_why() -> None:
    p = parse({"default": [
        {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"},
        {"type": "sigstoreSigned", "fulcio": {"caPath": "/ca", "oidcIssuer": "x",
                                              "subjectEmail": "y"},
         "rekorPublicKeyPath": "/rekor.pub"},
        {"type": "sigstoreSigned", "keyPath": "/k", "rekorPublicKeyPath": "/rekor.pub"},
    ]})
    gpg, fulcio, rekor = p.default
    assert "GPG" in gpg.unsupported and "fulcio" in fulcio.unsupported
    assert "Rekor" in rekor.unsupported


def test_scopes_that_never_match_are_reported() -> None:
    p = parse({"default": [ACCEPT], "transports": {"docker": {
        "busybox": [REJECT], "docker.io/library/busybox": [REJECT], "quay.io": [REJECT],
        "localhost:5000": [REJECT], "*.example.com": [REJECT], "*.": [REJECT]}}})
    assert p.dead_scopes == ("busybox", "*.")


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize(("identity", "intended", "claimed", "ok"), [
    # matchRepoDigestOrExact (the default): a tag must match exactly, a digest the repo;
    # cosign's repository-only claim never passes.
    ({}, "q.io/a/b:v1", "q.io/a/b:v1", True),
    ({}, "q.io/a/b:v1", "q.io/a/b:v2", False),
    ({}, "q.io/a/b:v1", "q.io/a/b", False),
    ({}, f"q.io/a/b@{DIGEST}", "q.io/a/b:v9", True),
    ({}, f"q.io/a/b@{DIGEST}", "q.io/a/b", False),
    ({}, f"q.io/a/b@{DIGEST}", "q.io/a/c:v1", False),
    ({"type": "matchExact"}, "q.io/a/b:v1", "q.io/a/b:v1", True),
    ({"type": "matchExact"}, f"q.io/a/b@{DIGEST}", "q.io/a/b:v1", False),
    ({"type": "matchRepository"}, "q.io/a/b:v1", "q.io/a/b", True),
    ({"type": "matchRepository"}, "q.io/a/b:v1", "q.io/a/b:other", True),
    ({"type": "matchRepository"}, "q.io/a/b:v1", "q.io/a/c", False),
    ({"type": "matchRepository"}, "docker.io/library/busybox:1", "busybox", True),
    ({"type": "exactReference", "dockerReference": "v.io/p/r:1"}, "m.io/x:1", "v.io/p/r:1",
     True),
    ({"type": "exactReference", "dockerReference": "v.io/p/r:1"}, "m.io/x:1", "v.io/p/r:2",
     False),
    ({"type": "exactRepository", "dockerRepository": "v.io/p/r"}, "m.io/x:1", "v.io/p/r",
     True),
    ({"type": "remapIdentity", "prefix": "mirror.io/v", "signedPrefix": "vendor.io"},
     "mirror.io/v/product/img:1", "vendor.io/product/img:1", True),
    ({"type": "remapIdentity", "prefix": "mirror.io/v", "signedPrefix": "vendor.io"},
     "mirror.io/vx/img:1", "vendor.io/x/img:1", False),  # not at a '/' boundary
    ({"type": "remapIdentity", "prefix": "mirror.io/v", "signedPrefix": "vendor.io"},
     "other.io/img:1", "other.io/img:1", True),  # no remapping outside the prefix
    ({}, "q.io/a/b:v1", "NOT A REFERENCE", False),
])
def test_signed_identity(identity: dict[str, str], intended: str, claimed: str,
                         ok: bool) -> None:
    doc = {"default": [{"type": "sigstoreSigned", "keyPath": "/k",
                        **({"signedIdentity": identity} if identity else {})}]}
    (req,) = parse(doc).default
    assert req.identity.accepts(pol.identity_of(refs.parse(intended)), claimed) is ok


# --------------------------------------------------------------------------- sigstore


def _sig(layer: SignatureLayer, origin: str = "sig layer 0") -> sigstore.Signature:
    return sigstore.Signature(sigstore.SIGNATURE_MEDIA_TYPE, layer.payload,
                              {SIGNATURE_ANNOTATION: layer.signature_b64}, origin)


@pytest.mark.parametrize("kind", ["ecdsa", "rsa", "ed25519"])
def test_verify_each_key_type(kind: Any) -> None:
    key = Key.generate(kind)
    public = sigstore.load_public_key(key.public_pem())
    layer = SignatureLayer.make(key, "q.io/a/b", DIGEST)
    got = sigstore.verify(_sig(layer), [public])
    assert got == sigstore.Payload(DIGEST, "q.io/a/b")
    other = sigstore.load_public_key(Key.generate(kind).public_pem())
    with pytest.raises(sigstore.SignatureError, match="verification failed"):
        sigstore.verify(_sig(layer), [other])
    # Any key of the list will do.
    assert sigstore.verify(_sig(layer), [other, public]).manifest_digest == DIGEST
    tampered = sigstore.Signature(sigstore.SIGNATURE_MEDIA_TYPE, layer.payload + b" ",
                                  {SIGNATURE_ANNOTATION: layer.signature_b64}, "s")
    with pytest.raises(sigstore.SignatureError, match="verification failed"):
        sigstore.verify(tampered, [public])


def test_bad_keys_and_annotations() -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        sigstore.load_public_key(b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n")
    key = Key.generate()
    public = sigstore.load_public_key(key.public_pem())
    layer = SignatureLayer.make(key, "q.io/a/b", DIGEST)
    with pytest.raises(sigstore.SignatureError, match="missing dev.cosignproject"):
        sigstore.verify(sigstore.Signature(sigstore.SIGNATURE_MEDIA_TYPE, layer.payload, {},
                                           "s"), [public])
    with pytest.raises(sigstore.SignatureError, match="base64"):
        sigstore.verify(sigstore.Signature(sigstore.SIGNATURE_MEDIA_TYPE, layer.payload,
                                           {SIGNATURE_ANNOTATION: "%%%"}, "s"), [public])


def _critical(**over: Any) -> dict[str, Any]:
    critical: dict[str, Any] = {"identity": {"docker-reference": "q.io/a"},
                                "image": {"docker-manifest-digest": DIGEST},
                                "type": "cosign container image signature"}
    critical.update(over)
    return critical


@pytest.mark.parametrize(("doc", "error"), [
    ({"critical": _critical()}, "missing fields ['optional']"),
    ({"critical": _critical(extra=1), "optional": None}, "unknown fields ['extra']"),
    ({"critical": _critical(type="other"), "optional": None}, "unrecognized signature type"),
    ({"critical": _critical(image={}), "optional": None}, "docker-manifest-digest"),
    ({"critical": _critical(identity={"docker-reference": 1}), "optional": None},
     "not a string"),
    ({"critical": _critical(), "optional": {"timestamp": 1.5}}, "not an integer"),
    ({"critical": _critical(), "optional": []}, "not an object"),
])
def test_payloads_are_parsed_strictly(doc: Any, error: str) -> None:
    with pytest.raises(sigstore.SignatureError, match="invalid payload") as e:
        sigstore.parse_payload(json.dumps(doc).encode(), "s")
    assert error in str(e.value)


def test_payload_as_cosign_writes_it_and_with_annotations() -> None:
    assert sigstore.parse_payload(payload("q.io/a", DIGEST), "s") == sigstore.Payload(
        DIGEST, "q.io/a")
    with_optional = {"critical": _critical(),
                     "optional": {"creator": "me", "timestamp": 1700000000, "any": [1]}}
    assert sigstore.parse_payload(json.dumps(with_optional).encode(), "s").docker_reference
    with pytest.raises(sigstore.SignatureError, match="duplicate"):
        sigstore.parse_payload(b'{"critical":{},"critical":{},"optional":null}', "s")


def test_attachment_tag_and_layers() -> None:
    assert sigstore.attachment_tag(DIGEST) == "sha256-" + "a" * 64 + ".sig"
    manifest = {"schemaVersion": 2, "layers": [
        {"mediaType": sigstore.SIGNATURE_MEDIA_TYPE, "digest": DIGEST, "size": 250,
         "annotations": {SIGNATURE_ANNOTATION: "c2ln"}},
        {"mediaType": "application/vnd.in-toto+json", "digest": OTHER, "size": 9}]}
    first, second = sigstore.attachment_layers(json.dumps(manifest).encode(), "a")
    assert first == sigstore.Layer(sigstore.SIGNATURE_MEDIA_TYPE, DIGEST, 250,
                                   {SIGNATURE_ANNOTATION: "c2ln"})
    assert second.annotations == {}
    for bad, why in ((b"[", "not valid JSON"), (b'{"manifests": []}', "no layers list"),
                     (b'{"layers": [{"mediaType": 1}]}', "not a valid descriptor")):
        with pytest.raises(sigstore.SignatureError, match=why):
            sigstore.attachment_layers(bad, "a")
    many = {"layers": [manifest["layers"][0]] * (sigstore.MAX_ATTACHMENTS + 5)}
    assert len(sigstore.attachment_layers(json.dumps(many).encode(), "a")) == (
        sigstore.MAX_ATTACHMENTS)


def _enforce(policy: pol.Policy, ref: str, digests: tuple[str, ...],
             sigs: list[sigstore.Signature]) -> int:
    calls = 0

    async def fetch() -> list[sigstore.Signature]:
        nonlocal calls
        calls += 1
        return sigs

    image = pol.PulledImage(pol.identity_of(refs.normalize(ref)), digests)
    asyncio.run(pol.enforce(policy, image, fetch))
    return calls


def test_enforce_verdicts(tmp_path: Path) -> None:
    key = Key.generate()
    key_file = tmp_path / "cosign.pub"
    key_file.write_bytes(key.public_pem())
    signed = {"type": "sigstoreSigned", "keyPath": str(key_file),
              "signedIdentity": {"type": "matchRepository"}}
    p = parse({"default": [ACCEPT], "transports": {"docker": {
        "q.io/signed": [signed], "q.io/blocked": [ACCEPT, REJECT],
        "q.io/gpg": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k"}]}}})
    good = _sig(SignatureLayer.make(key, "q.io/signed/app", DIGEST))
    # Accepted: no signature fetched where none is needed, one fetch otherwise.
    assert _enforce(p, "q.io/other:1", (DIGEST,), []) == 0
    assert _enforce(p, "q.io/signed/app:1", (DIGEST,), [good]) == 1
    # A signature over the index the platform manifest came from is accepted too.
    assert _enforce(p, "q.io/signed/app:1", (OTHER, DIGEST), [good]) == 1

    def refused(ref: str, digests: tuple[str, ...], sigs: list[sigstore.Signature]) -> str:
        with pytest.raises(SignatureValidationFailed) as e:
            _enforce(p, ref, digests, sigs)
        assert e.value.code == "UNKNOWN"
        assert e.value.message.startswith("SignatureValidationFailed: image ")
        return e.value.message

    assert "rejects every image" in refused("q.io/blocked/x:1", (DIGEST,), [])
    assert "GPG" in refused("q.io/gpg/x:1", (DIGEST,), [])
    msg = refused("q.io/signed/app:1", (DIGEST,), [])
    assert "no signature exists" in msg and 'transports.docker["q.io/signed"][0]' in msg
    other_kind = sigstore.Signature("application/vnd.in-toto+json", b"", {}, "att")
    assert "1 attachments of other kinds" in refused("q.io/signed/app:1", (DIGEST,),
                                                     [other_kind])
    assert "does not match" in refused("q.io/signed/app:1", (OTHER,), [good])
    elsewhere = _sig(SignatureLayer.make(key, "q.io/signed/other", DIGEST))
    assert "is not accepted" in refused("q.io/signed/app:1", (DIGEST,), [elsewhere])
    stranger = _sig(SignatureLayer.make(Key.generate(), "q.io/signed/app", DIGEST))
    assert "none of the signatures" in refused("q.io/signed/app:1", (DIGEST,),
                                               [stranger, elsewhere])
    # The key is read at each check: a missing key file is the node's problem.
    key_file.unlink()
    with pytest.raises(pol.PolicyError, match="cannot read key"):
        _enforce(p, "q.io/signed/app:1", (DIGEST,), [good])


def test_inline_key_data(tmp_path: Path) -> None:
    key = Key.generate("ed25519")
    p = parse({"default": [{"type": "sigstoreSigned",
                            "keyDatas": [base64.b64encode(Key.generate().public_pem()).decode(),
                                         base64.b64encode(key.public_pem()).decode()],
                            "signedIdentity": {"type": "matchRepository"}}]})
    assert _enforce(p, "q.io/a:1", (DIGEST,),
                    [_sig(SignatureLayer.make(key, "q.io/a", DIGEST))]) == 1


# --------------------------------------------------------------------------- files


def test_policy_files_reload_on_change_and_per_namespace(tmp_path: Path) -> None:
    main = tmp_path / "policy.json"
    ns_dir = tmp_path / "policies"
    ns_dir.mkdir()
    files = pol.PolicyFiles(main, ns_dir)
    with pytest.raises(pol.PolicyError, match="does not exist"):
        files.load(main)
    main.write_text(json.dumps({"default": [ACCEPT]}))
    first = files.load(main)
    assert files.load(main) is first  # unchanged: not parsed again
    main.write_text(json.dumps({"default": [REJECT]}))
    assert files.load(main).default[0].type == "reject"
    main.write_text("{not json")
    with pytest.raises(pol.PolicyError, match="not valid JSON"):
        files.load(main)
    (ns_dir / "team-a.json").write_text(json.dumps({"default": [ACCEPT]}))
    assert files.path_for("team-a") == ns_dir / "team-a.json"
    assert files.path_for("team-b") == main
    assert files.path_for("") == main
    (tmp_path / "evil.json").write_text("{}")
    assert files.path_for("../evil") == main  # only DNS-label namespaces


def test_policy_paths_must_be_absolute(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="image.signature_policy"):
        config.load(Path("/dev/null"), tmp_path, {"image.signature_policy": "policy.json"})
