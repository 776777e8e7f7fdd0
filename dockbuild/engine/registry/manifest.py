"""Image manifests, indexes and configs: media types, descriptors, platform selection and
verification, shared by every image source (registry pulls, OCI layouts, pushes).

No network code: the OCI layout reader, used by every build, imports only this.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dockbuild import platforms
from dockbuild.engine.registry.reference import Reference
from dockbuild.errors import DigestMismatchError, RegistryError

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
CONFIG_TYPES = (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG)
MANIFEST_ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))

# containerd's limits: manifests and configs are small; anything bigger is an attack.
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 16 << 20
# Registries nest indexes rarely and shallowly; deeper means a loop or an attack.
MAX_INDEX_DEPTH = 4
_ALGORITHMS = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
_DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")


# ---------------------------------------------------------------------------------------
# What every image source shares.


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about one blob."""

    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, value: Any, where: str) -> Descriptor:
        """Validate a descriptor object from a manifest; `where` names it in errors."""
        if not isinstance(value, dict):
            raise RegistryError(f"{where}: a descriptor is not a JSON object")
        digest, size = value.get("digest"), value.get("size")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise RegistryError(f"{where}: invalid digest {digest!r} in a descriptor")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"{where}: invalid size {size!r} for {digest}")
        annotations = value.get("annotations") or {}
        return cls(
            media_type=str(value.get("mediaType", "")),
            digest=digest,
            size=size,
            annotations=tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
        )

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


@dataclass(frozen=True)
class ResolvedImage:
    """One platform's image, its manifest and config verified against their digests.

    `ref` is the reference that was asked for (None when the image came from an OCI
    layout directory, which has no registry name). `platform` is what the config says
    (`os/architecture[/variant]`); it can differ from the requested one when a
    registry holds a single-platform image, and the caller decides whether to warn.
    """

    ref: Reference | None
    manifest_digest: str
    manifest: bytes
    manifest_media_type: str
    config_digest: str
    config: bytes
    layers: tuple[Descriptor, ...]
    platform: str


def _is_attestation(entry: Mapping[str, Any]) -> bool:
    annotations = entry.get("annotations") or {}
    plat = entry.get("platform") or {}
    return annotations.get("vnd.docker.reference.type") == "attestation-manifest" or (
        plat.get("os") == "unknown" and plat.get("architecture") == "unknown"
    )


def select_manifest(index: Mapping[str, Any], platform: str, where: str) -> Descriptor:
    """Choose the entry of an index (or manifest list) for `platform`.

    Attestation entries (`unknown/unknown`) and entries without a platform never match.
    As containerd's Only matcher (BuildKit's pull): the best entry of the platforms that
    run where `platform` is asked (arm64 also runs arm/v8..v5, arm/v7 also v6 and v5,
    amd64 also 386), the index's order among equals; entries with OS features never.
    """
    wanted = platforms.normalize(platform)
    ranks = {name: rank for rank, name in enumerate(reversed(platforms.compatible(platform)))}
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"{where}: the index has no manifests list")
    available: list[str] = []
    best: tuple[int, dict[str, Any]] | None = None
    for entry in entries:
        if not isinstance(entry, dict) or _is_attestation(entry) or not entry.get("platform"):
            continue
        fields = entry["platform"]
        name = platforms.normalize_parts(
            str(fields.get("os", "")), str(fields.get("architecture", "")), str(fields.get("variant", ""))
        )
        available.append(name)
        if fields.get("os.features"):
            continue
        rank = ranks.get(name, -1)
        if rank >= 0 and (best is None or rank > best[0]):
            best = (rank, entry)
    if best is not None:
        return Descriptor.from_json(best[1], where)
    raise RegistryError(
        f"{where}: no image for platform {wanted} "
        f"(available: {', '.join(available) or 'none'})"
    )


def verify_digest(data: bytes, digest: str, where: str) -> None:
    """Raise DigestMismatchError unless `data` hashes to `digest`."""
    algorithm, _, expected = digest.partition(":")
    hasher = _ALGORITHMS.get(algorithm)
    if hasher is None:
        raise RegistryError(f"{where}: unsupported digest algorithm in {digest!r}")
    actual = hasher(data).hexdigest()
    if actual != expected:
        raise DigestMismatchError(
            f"{where}: content digest mismatch: expected {digest}, got {algorithm}:{actual}"
        )


def sniff_media_type(data: bytes, declared: str | None, where: str) -> tuple[str, dict[str, Any]]:
    """The media type of a manifest or index and its parsed JSON.

    The declared type (Content-Type, a descriptor) wins; without one, the document's own
    `mediaType`, else its shape (`manifests` means an index). Schema 1 is refused here.
    """
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{where}: the manifest is not valid JSON") from e
    if not isinstance(document, dict):
        raise RegistryError(f"{where}: the manifest is not a JSON object")
    declared = (declared or "").split(";")[0].strip()
    media_type = declared if declared in (*INDEX_TYPES, *MANIFEST_TYPES, *MEDIA_SCHEMA1) else ""
    media_type = media_type or str(document.get("mediaType") or "")
    if not media_type:
        if document.get("schemaVersion") == 1:
            media_type = MEDIA_SCHEMA1[0]
        else:
            media_type = MEDIA_OCI_INDEX if "manifests" in document else MEDIA_OCI_MANIFEST
    if media_type in MEDIA_SCHEMA1 or document.get("schemaVersion") == 1:
        raise RegistryError(
            f"{where}: the image uses Docker's schema 1 manifest format, which dockbuild "
            "does not support",
            hint="re-push the image with a current docker or skopeo to convert it",
        )
    if media_type not in (*INDEX_TYPES, *MANIFEST_TYPES):
        raise RegistryError(f"{where}: unsupported manifest media type {media_type!r}")
    return media_type, document


def parse_image_manifest(
    document: Mapping[str, Any], where: str
) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """The config and layer descriptors of an image manifest."""
    config = Descriptor.from_json(document.get("config"), where)
    if config.media_type not in CONFIG_TYPES:
        raise RegistryError(
            f"{where}: not a container image (its config has media type "
            f"{config.media_type or 'none'!r})"
        )
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise RegistryError(f"{where}: the manifest has no layers list")
    return config, tuple(Descriptor.from_json(layer, where) for layer in layers)


def config_platform(config: bytes, where: str, fallback: str) -> str:
    """`os/architecture[/variant]` from an image config (raw spelling kept)."""
    try:
        document = json.loads(config)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{where}: the image config is not valid JSON") from e
    if not isinstance(document, dict) or not document.get("architecture"):
        return fallback
    return platforms.format_platform(
        str(document.get("os", "linux")), str(document["architecture"]), str(document.get("variant", ""))
    )


# ---------------------------------------------------------------------------------------
# The HTTP side.
