"""Sigstore (cosign) image signatures: the attachment format and the cryptography.

cosign stores the signatures of a manifest ``sha256:<hex>`` in the same repository, as the
tag ``sha256-<hex>.sig``: an OCI image manifest whose layers are "simple signing"
payloads (``application/vnd.dev.cosign.simplesigning.v1+json``), each with its base64
signature in the annotation ``dev.cosignproject.cosign/signature``. A payload is::

    {"critical": {"identity": {"docker-reference": "registry/repo"},
                  "image": {"docker-manifest-digest": "sha256:..."},
                  "type": "cosign container image signature"},
     "optional": null}

It is parsed as strictly as containers/image does (no unknown, missing or duplicated
fields in ``critical``). The signature is over the payload bytes: ECDSA (any NIST curve,
ASN.1 DER) or RSA PKCS#1 v1.5 with SHA-256, or Ed25519, as sigstore's verifiers.
Keyless signatures (Fulcio certificates, Rekor bundles) are not verified here.

No I/O: fetching the attachments is the puller's; this module only judges bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moorage.util.codec import unique_keys

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# cryptography (its Rust library, ~8 MiB of the daemon's memory) is imported by the
# functions that verify, only on nodes whose policy asks for signatures.

SIGNATURE_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
#: Most bytes of signature payloads fetched from one attachment manifest
#: (containers/image's limit for one signature body; a cosign payload is ~250 bytes).
MAX_PAYLOAD_SIZE = 4 * 1024 * 1024
#: Most layers of one attachment manifest looked at; a registry cannot make a pull
#: download signatures without end.
MAX_ATTACHMENTS = 64


class SignatureError(ValueError):
    """A signature that is not acceptable; the message says why."""


def attachment_tag(digest: str) -> str:
    """The tag cosign stores the signatures of ``digest`` under: ``sha256-<hex>.sig``."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}-{hex_part}.sig"


@dataclass(frozen=True)
class Layer:
    """A layer of an attachment manifest, as listed there (untrusted)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str]


def attachment_layers(data: bytes, what: str) -> list[Layer]:
    """The layers of an attachment manifest (an OCI image manifest); SignatureError if
    it is not one."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise SignatureError(f"{what}: not valid JSON: {e}") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise SignatureError(f"{what}: not an OCI image manifest (no layers list)")
    out = []
    for i, raw in enumerate(layers[:MAX_ATTACHMENTS]):
        if not isinstance(raw, dict):
            raise SignatureError(f"{what}: layer {i} is not an object")
        media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
        annotations = raw.get("annotations") or {}
        if (not isinstance(media_type, str) or not isinstance(digest, str)
                or not isinstance(size, int) or size < 0 or not isinstance(annotations, dict)
                or not all(isinstance(v, str) for v in annotations.values())):
            raise SignatureError(f"{what}: layer {i} is not a valid descriptor")
        out.append(Layer(media_type, digest, size, annotations))
    return out


@dataclass(frozen=True)
class Signature:
    """One attachment of a manifest: a simple-signing payload or another kind (counted,
    not fetched: ``payload`` is empty)."""

    media_type: str
    payload: bytes
    annotations: Mapping[str, str]
    origin: str  # where it was found, for messages: "<repo>:<tag> layer <i>"


@dataclass(frozen=True)
class Payload:
    """What a verified signature claims."""

    manifest_digest: str
    docker_reference: str


def load_public_key(pem: bytes) -> PublicKey:
    """A PEM public key (``-----BEGIN PUBLIC KEY-----``, as ``cosign generate-key-pair``
    writes); ValueError saying why it is unusable."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ValueError(f"not a PEM public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey
                      | ed25519.Ed25519PublicKey):
        raise ValueError(f"unsupported key type {type(key).__name__} "
                         "(ECDSA, RSA and Ed25519 keys are)")
    return key


def _verifies(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, payload)
    except InvalidSignature:
        return False
    return True


def verify(sig: Signature, keys: Sequence[PublicKey]) -> Payload:
    """The payload of ``sig`` once its signature checks out with one of ``keys``;
    SignatureError otherwise. The caller still has to match what the payload claims."""
    encoded = sig.annotations.get(SIGNATURE_ANNOTATION)
    if encoded is None:
        raise SignatureError(f"{sig.origin}: missing {SIGNATURE_ANNOTATION} annotation")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SignatureError(f"{sig.origin}: base64 decoding: {e}") from None
    if not any(_verifies(key, raw, sig.payload) for key in keys):
        raise SignatureError(f"{sig.origin}: cryptographic signature verification failed")
    return parse_payload(sig.payload, sig.origin)



def _exact(obj: Any, fields: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SignatureError(f"{where} is not a JSON object")
    if set(obj) != set(fields):
        missing = sorted(set(fields) - set(obj))
        extra = sorted(set(obj) - set(fields))
        raise SignatureError(f"{where}: missing fields {missing}, unknown fields {extra}")
    return obj


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise SignatureError(f"{where}.{key} is not a string")
    return value


def parse_payload(data: bytes, origin: str) -> Payload:
    """A simple-signing payload, parsed strictly; SignatureError naming the flaw."""
    try:
        doc = json.loads(data, object_pairs_hook=unique_keys)
        top = _exact(doc, ("critical", "optional"), "payload")
        optional = top["optional"]
        if optional is not None:  # cosign writes null when there are no annotations
            if not isinstance(optional, dict):
                raise SignatureError("payload optional is not an object")
            if "creator" in optional and not isinstance(optional["creator"], str):
                raise SignatureError("payload optional.creator is not a string")
            stamp = optional.get("timestamp")
            if "timestamp" in optional and (
                    not isinstance(stamp, int | float) or isinstance(stamp, bool)
                    or int(stamp) != stamp):
                raise SignatureError("payload optional.timestamp is not an integer")
        critical = _exact(top["critical"], ("type", "image", "identity"), "critical")
        kind = _string(critical, "type", "critical")
        if kind != PAYLOAD_TYPE:
            raise SignatureError(f"unrecognized signature type {kind!r}")
        image = _exact(critical["image"], ("docker-manifest-digest",), "critical.image")
        identity = _exact(critical["identity"], ("docker-reference",), "critical.identity")
        return Payload(_string(image, "docker-manifest-digest", "critical.image"),
                       _string(identity, "docker-reference", "critical.identity"))
    except SignatureError as e:
        raise SignatureError(f"{origin}: invalid payload: {e}") from None
    except ValueError as e:  # not JSON at all
        raise SignatureError(f"{origin}: invalid payload: {e}") from None
