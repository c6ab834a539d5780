"""The signature policy, containers-policy.json(5), as CRI-O and podman read it.

Every pull is checked against it before anything but manifests is downloaded. Only the
``docker`` transport's scopes apply to pulls; other transports are parsed (the file must
be valid as a whole) and ignored. The requirements of the most specific scope that
matches the image apply, all of them: the identity (``host/ns/repo:tag`` or
``host/ns/repo@digest``), then the repository and its parent namespaces up to the host,
then the host's ``*.domain`` wildcards, then the transport's ``""``, then ``default``.

Requirements: ``insecureAcceptAnything``, ``reject`` and ``sigstoreSigned`` with public
keys (``keyPath``, ``keyPaths``, ``keyData``, ``keyDatas``) and every ``signedIdentity``
(``matchRepoDigestOrExact`` by default, ``matchExact``, ``matchRepository``,
``exactReference``, ``exactRepository``, ``remapIdentity``). ``signedBy`` (GPG) and
keyless ``sigstoreSigned`` (``fulcio``, ``pki``, Rekor keys) parse but can never be
satisfied here: an image whose scope needs them is refused, saying so.

The file is parsed as strictly as containers/image does: unknown or duplicated fields and
empty requirement lists make it invalid, which fails pulls (FAILED_PRECONDITION) until it
is fixed. :class:`PolicyFiles` reads it at every pull, so edits apply to the next pull
without a SIGHUP, as in CRI-O.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorage import log
from moorage.errors import FailedPrecondition, InvalidArgument, SignatureValidationFailed
from moorage.image import reference as refs
from moorage.image import sigstore
from moorage.image.reference import Reference
from moorage.util.codec import unique_keys

_log = log.get("moorage.image")

#: Largest policy file read.
MAX_POLICY_SIZE = 4 * 1024 * 1024
#: A Kubernetes namespace name (a DNS label): only those select a per-namespace policy.
_NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

_KEY_FIELDS = ("keyPath", "keyPaths", "keyData", "keyDatas")
_REKOR_FIELDS = ("rekorPublicKeyPath", "rekorPublicKeyPaths", "rekorPublicKeyData",
                 "rekorPublicKeyDatas")


class PolicyError(FailedPrecondition):
    """A policy file that cannot be used; the message names the file and the flaw."""


# ---------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class SignedIdentity:
    """``signedIdentity``: which identity a signature must claim for the image."""

    type: str = "matchRepoDigestOrExact"
    reference: Reference | None = None  # exactReference, exactRepository
    prefix: str = ""  # remapIdentity
    signed_prefix: str = ""

    def accepts(self, intended: Reference, signed: str) -> bool:
        """Whether a signature claiming ``signed`` is one for ``intended``."""
        try:
            claimed = refs.parse(signed)
        except InvalidArgument:
            return False
        match self.type:
            case "matchExact":
                return _exact_match(intended, claimed)
            case "matchRepository":
                return claimed.name == intended.name
            case "exactReference":
                return self.reference is not None and _exact_match(self.reference, claimed)
            case "exactRepository":
                return self.reference is not None and claimed.name == self.reference.name
            case "remapIdentity":
                remapped = self._remap(intended)
                return remapped is not None and _repo_digest_or_exact(remapped, claimed)
            case _:  # matchRepoDigestOrExact
                return _repo_digest_or_exact(intended, claimed)

    def _remap(self, intended: Reference) -> Reference | None:
        name = intended.name
        if not (name == self.prefix or name.startswith(self.prefix + "/")):
            return intended
        text = self.signed_prefix + str(intended)[len(self.prefix):]
        try:
            remapped = refs.parse(text)
        except InvalidArgument:
            return None
        return remapped if str(remapped) == text else None


def _name_only(ref: Reference) -> bool:
    return ref.tag is None and ref.digest is None


def _exact_match(intended: Reference, claimed: Reference) -> bool:
    return not _name_only(intended) and not _name_only(claimed) and str(claimed) == str(
        intended)


def _repo_digest_or_exact(intended: Reference, claimed: Reference) -> bool:
    if _name_only(claimed):
        return False
    if intended.tag is not None:
        return str(claimed) == str(intended)
    if intended.digest is not None:
        return claimed.name == intended.name
    return False


@dataclass(frozen=True)
class KeySource:
    """A public key of a requirement: a file (read at each check) or inline data."""

    path: str | None = None
    data: bytes | None = None

    def load(self, where: str) -> sigstore.PublicKey:
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    pem = f.read(MAX_POLICY_SIZE)
            except OSError as e:
                raise PolicyError(f"{where}: cannot read key {self.path}: "
                                  f"{e.strerror or e}") from None
            what = f"key {self.path}"
        else:
            pem, what = self.data or b"", "keyData"
        try:
            return sigstore.load_public_key(pem)
        except ValueError as e:
            raise PolicyError(f"{where}: {what}: {e}") from None


@dataclass(frozen=True)
class Requirement:
    """One policy requirement. ``type`` is the JSON type name."""

    type: str
    keys: tuple[KeySource, ...] = ()
    identity: SignedIdentity = SignedIdentity()
    #: Why this requirement can never be satisfied here ("" when it can).
    unsupported: str = ""


@dataclass(frozen=True)
class Policy:
    source: str  # the file it was read from
    default: tuple[Requirement, ...]
    docker: Mapping[str, tuple[Requirement, ...]]  # the docker transport's scopes
    #: Scopes that can never match (not in the fully expanded form), for the log.
    dead_scopes: tuple[str, ...] = ()

    def requirements_for(self, ref: Reference) -> tuple[str, tuple[Requirement, ...]]:
        """The scope that applies to ``ref`` (named as in the file) and its requirements."""
        for scope in (policy_identity(ref), *scope_namespaces(ref), ""):
            reqs = self.docker.get(scope)
            if reqs is not None:
                return f'transports.docker["{scope}"]', reqs
        return "default", self.default


def policy_identity(ref: Reference) -> str:
    """The most specific scope of ``ref``: ``host/repo@digest`` when it has a digest (a
    tag beside it is dropped, as CRI-O does), else ``host/repo:tag``."""
    if ref.digest is not None:
        return f"{ref.name}@{ref.digest}"
    return f"{ref.name}:{ref.tag or refs.DEFAULT_TAG}"


def scope_namespaces(ref: Reference) -> list[str]:
    """The repository, its parent namespaces up to the host, then the host's wildcard
    domains (port dropped): ``a.b.c:5000/ns/repo`` gives ``a.b.c:5000/ns/repo``,
    ``a.b.c:5000/ns``, ``a.b.c:5000``, ``*.b.c``, ``*.c`` (containers/image's order)."""
    out = []
    name = ref.name
    while True:
        out.append(name)
        slash = name.rfind("/")
        if slash < 0:
            break
        name = name[:slash]
    colon = name.find(":")
    if colon >= 0:
        name = name[:colon]
    while (dot := name.find(".")) >= 0:
        name = name[dot + 1:]
        out.append("*." + name)
    return out


# ---------------------------------------------------------------------------------------
# Parsing



class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, where: str, why: str) -> PolicyError:
        return PolicyError(f"signature policy {self.source}: {where}: {why}")

    def object(self, value: Any, where: str, allowed: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, "must be a JSON object")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise self.error(where, f"unknown field {unknown[0]!r}")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(where, "must be a non-empty string")
        return value

    def strings(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list) or not value:
            raise self.error(where, "must be a non-empty list of strings")
        return [self.string(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def base64(self, value: Any, where: str) -> bytes:
        try:
            return base64.b64decode(self.string(value, where), validate=True)
        except (binascii.Error, ValueError):
            raise self.error(where, "must be base64 data") from None

    def requirements(self, value: Any, where: str) -> tuple[Requirement, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(where, "must be a non-empty list of requirements")
        return tuple(self.requirement(v, f"{where}[{i}]") for i, v in enumerate(value))

    def requirement(self, value: Any, where: str) -> Requirement:
        kind = value.get("type") if isinstance(value, dict) else None
        match kind:
            case "insecureAcceptAnything" | "reject":
                self.object(value, where, ("type",))
                return Requirement(kind)
            case "signedBy":
                return self.signed_by(value, where)
            case "sigstoreSigned":
                return self.sigstore_signed(value, where)
            case None:
                raise self.error(where, 'must be an object with a "type"')
            case _:
                raise self.error(where, f"unknown requirement type {kind!r}")

    def signed_by(self, value: dict[str, Any], where: str) -> Requirement:
        self.object(value, where, ("type", "keyType", "keyPath", "keyPaths", "keyData",
                                   "signedIdentity"))
        if value.get("keyType") not in ("GPGKeys", "signedByGPGKeys"):
            raise self.error(f"{where}.keyType", 'must be "GPGKeys"')
        self.one_of(value, where, ("keyPath", "keyPaths", "keyData"))
        self.identity(value.get("signedIdentity"), f"{where}.signedIdentity")
        return Requirement("signedBy", unsupported="GPG simple signing (signedBy) is not "
                           "supported by moorage; use sigstoreSigned")

    def sigstore_signed(self, value: dict[str, Any], where: str) -> Requirement:
        self.object(value, where, ("type", *_KEY_FIELDS, "fulcio", "pki", *_REKOR_FIELDS,
                                   "signedIdentity"))
        source = self.one_of(value, where, (*_KEY_FIELDS, "fulcio", "pki"))
        rekor = [f for f in _REKOR_FIELDS if f in value]
        if len(rekor) > 1:
            raise self.error(where, f"at most one of {', '.join(_REKOR_FIELDS)} may be set")
        identity = self.identity(value.get("signedIdentity"), f"{where}.signedIdentity")
        keys: list[KeySource] = []
        unsupported = ""
        if source == "keyPath":
            keys.append(KeySource(path=self.string(value[source], f"{where}.keyPath")))
        elif source == "keyPaths":
            keys += [KeySource(path=p) for p in self.strings(value[source], f"{where}.keyPaths")]
        elif source == "keyData":
            keys.append(KeySource(data=self.base64(value[source], f"{where}.keyData")))
        elif source == "keyDatas":
            items = value[source]
            if not isinstance(items, list) or not items:
                raise self.error(f"{where}.keyDatas", "must be a non-empty list")
            keys += [KeySource(data=self.base64(v, f"{where}.keyDatas[{i}]"))
                     for i, v in enumerate(items)]
        else:
            if not isinstance(value[source], dict):
                raise self.error(f"{where}.{source}", "must be a JSON object")
            unsupported = (f"keyless verification ({source}) is not supported by moorage; "
                           "use a public key (keyPath or keyData)")
        if rekor and not unsupported:
            unsupported = (f"{rekor[0]}: checking Rekor log entries is not supported by "
                           "moorage")
        return Requirement("sigstoreSigned", tuple(keys), identity, unsupported)

    def one_of(self, value: dict[str, Any], where: str, fields: Sequence[str]) -> str:
        present = [f for f in fields if f in value]
        if len(present) != 1:
            raise self.error(where, f"exactly one of {', '.join(fields)} must be set")
        return present[0]

    def identity(self, value: Any, where: str) -> SignedIdentity:
        if value is None:
            return SignedIdentity()
        kind = value.get("type") if isinstance(value, dict) else None
        match kind:
            case "matchExact" | "matchRepoDigestOrExact" | "matchRepository":
                self.object(value, where, ("type",))
                return SignedIdentity(kind)
            case "exactReference":
                self.object(value, where, ("type", "dockerReference"))
                ref = self.reference(value.get("dockerReference"), f"{where}.dockerReference")
                if _name_only(ref):
                    raise self.error(f"{where}.dockerReference", "needs a tag or a digest")
                return SignedIdentity(kind, ref)
            case "exactRepository":
                self.object(value, where, ("type", "dockerRepository"))
                ref = self.reference(value.get("dockerRepository"),
                                     f"{where}.dockerRepository")
                return SignedIdentity(kind, ref)
            case "remapIdentity":
                self.object(value, where, ("type", "prefix", "signedPrefix"))
                return SignedIdentity(
                    kind, prefix=self.remap_prefix(value.get("prefix"), f"{where}.prefix"),
                    signed_prefix=self.remap_prefix(value.get("signedPrefix"),
                                                    f"{where}.signedPrefix"))
            case _:
                raise self.error(where, f"unknown signedIdentity type {kind!r}")

    def reference(self, value: Any, where: str) -> Reference:
        try:
            return refs.parse(self.string(value, where))
        except InvalidArgument as e:
            raise self.error(where, e.message) from None

    def remap_prefix(self, value: Any, where: str) -> str:
        text = self.string(value, where)
        if refs.is_domain(text):
            return text
        try:
            ref = refs.parse(text)
        except InvalidArgument:
            ref = None
        if ref is None or not _name_only(ref) or str(ref) != text:
            raise self.error(where, f"{text!r} is neither a host[:port] nor a repository "
                             "or namespace in the fully expanded form")
        return text


def parse(text: str | bytes, source: str) -> Policy:
    """A policy document; PolicyError naming the source and the flaw."""
    p = _Parser(source)
    try:
        doc = json.loads(text, object_pairs_hook=unique_keys)
    except ValueError as e:
        raise PolicyError(f"signature policy {source}: not valid JSON: {e}") from None
    p.object(doc, "the document", ("default", "transports"))
    if "default" not in doc:
        raise p.error("the document", 'the "default" requirements are required')
    default = p.requirements(doc["default"], "default")
    docker: dict[str, tuple[Requirement, ...]] = {}
    transports = doc.get("transports", {})
    if not isinstance(transports, dict):
        raise p.error("transports", "must be a JSON object")
    for transport, scopes in transports.items():
        if not isinstance(scopes, dict):
            raise p.error(f"transports.{transport}", "must be a JSON object")
        parsed = {scope: p.requirements(reqs, f'transports.{transport}["{scope}"]')
                  for scope, reqs in scopes.items()}
        if transport == "docker":
            docker = parsed
    return Policy(source, default, docker, tuple(s for s in docker if not _can_match(s)))


def _can_match(scope: str) -> bool:
    """Whether a docker scope is in a form some image's scope list can hold."""
    if scope == "" or refs.is_domain(scope):
        return True
    if scope.startswith("*."):
        return refs.is_domain_name(scope[2:])
    try:
        return str(refs.parse(scope)) == scope
    except InvalidArgument:
        return False


# ---------------------------------------------------------------------------------------
# Reading the files


class PolicyFiles:
    """The policy a pull is checked against: ``<directory>/<namespace>.json`` when it
    exists (CRI-O's per-namespace policies), else the main file. Each is read at every
    pull, as containers/image does, and parsed again when its content changed. Blocking:
    call from a thread."""

    def __init__(self, path: Path, directory: Path) -> None:
        self.path = path
        self.directory = directory
        self._cache: dict[Path, tuple[bytes, Policy]] = {}

    def path_for(self, namespace: str) -> Path:
        if namespace and _NAMESPACE_RE.fullmatch(namespace):
            candidate = self.directory / f"{namespace}.json"
            if candidate.is_file():
                return candidate
        return self.path

    def load(self, path: Path) -> Policy:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_POLICY_SIZE + 1)
        except FileNotFoundError:
            raise PolicyError(
                f"signature policy {path} does not exist; every pull is checked against "
                "it (image.signature_policy). Install one (Debian's containers-common "
                'ships one) or write {"default": [{"type": "insecureAcceptAnything"}]}'
            ) from None
        except OSError as e:
            raise PolicyError(f"signature policy {path}: cannot read: {e.strerror}") from None
        if len(data) > MAX_POLICY_SIZE:
            raise PolicyError(f"signature policy {path}: larger than {MAX_POLICY_SIZE} bytes")
        cached = self._cache.get(path)
        if cached is not None and cached[0] == data:
            return cached[1]
        policy = parse(data, str(path))
        for scope in policy.dead_scopes:
            _log.warning("image.policy_scope_never_matches", policy=str(path), scope=scope,
                         hint="docker scopes are fully expanded names: "
                              "docker.io/library/busybox, not busybox")
        self._cache[path] = (data, policy)
        return policy


# ---------------------------------------------------------------------------------------
# Enforcing


@dataclass(frozen=True)
class PulledImage:
    """What a pull is about to accept."""

    reference: Reference  # the name asked for, fully qualified: the policy's identity
    #: The digest of the manifest that will run, then that of the index it was chosen
    #: from (when there is one): a signature over either is accepted.
    digests: tuple[str, ...]


def identity_of(ref: Reference) -> Reference:
    """``ref`` as the policy sees it: with a digest, the tag is dropped (as CRI-O does)."""
    if ref.digest is not None and ref.tag is not None:
        return Reference(ref.domain, ref.path, None, ref.digest)
    return ref


async def enforce(
    policy: Policy,
    image: PulledImage,
    signatures: Callable[[], Awaitable[list[sigstore.Signature]]],
) -> None:
    """Raise SignatureValidationFailed unless every requirement of the scope that
    applies accepts ``image``. ``signatures`` fetches the image's sigstore attachments
    (called at most once, and only when a requirement needs them)."""
    scope, requirements = policy.requirements_for(image.reference)
    sigs: list[sigstore.Signature] | None = None
    for i, req in enumerate(requirements):
        where = f"{scope}[{i}] ({req.type})"

        def refuse(why: str, where: str = where) -> SignatureValidationFailed:
            return SignatureValidationFailed(
                f'image "{image.reference}" is rejected by signature policy '
                f"{policy.source}, {where}: {why}")

        if req.type == "insecureAcceptAnything":
            continue
        if req.type == "reject":
            raise refuse("this scope rejects every image")
        if req.unsupported:
            raise refuse(req.unsupported)
        if sigs is None:
            sigs = await signatures()
        why = await asyncio.to_thread(_sigstore_verdict, req, image, sigs,
                                      f"signature policy {policy.source}, {where}")
        if why is not None:
            raise refuse(why)


def _sigstore_verdict(req: Requirement, image: PulledImage,
                      sigs: list[sigstore.Signature], where: str) -> str | None:
    """None when one of ``sigs`` satisfies the sigstoreSigned ``req``, else why not (in
    containers/image's words). A key that cannot be loaded raises PolicyError."""
    keys = [k.load(where) for k in req.keys]
    rejections: list[str] = []
    others = 0
    for sig in sigs:
        if sig.media_type != sigstore.SIGNATURE_MEDIA_TYPE:
            others += 1
            continue
        try:
            payload = sigstore.verify(sig, keys)
        except sigstore.SignatureError as e:
            rejections.append(str(e))
            continue
        if payload.manifest_digest not in image.digests:
            rejections.append(f"{sig.origin}: signature for digest "
                              f"{payload.manifest_digest} does not match")
        elif not req.identity.accepts(image.reference, payload.docker_reference):
            rejections.append(f"{sig.origin}: signature for identity "
                              f"{payload.docker_reference} is not accepted "
                              f"({req.identity.type})")
        else:
            return None
    if not rejections:
        extra = f" ({others} attachments of other kinds)" if others else ""
        return f"a signature was required, but no signature exists{extra}"
    if len(rejections) == 1:
        return rejections[0]
    return "none of the signatures was accepted: " + "; ".join(rejections)
