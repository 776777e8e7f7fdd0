"""Images from an OCI image layout directory (buildx's `oci-layout://PATH[:TAG|@DIGEST]`).

The result is the same `ResolvedImage` a registry pull gives, with `ref=None`: a layout
has no registry name, and a synthetic one would look pullable when it is not. Layers
stay in the layout; `blob_path` says where each one is. Every manifest, index and config
read here is checked against the digest and size that named it; layer blobs are
verified by whoever reads them (they can be large).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dockbuild.engine.registry.manifest import (
    MANIFEST_TYPES,
    MAX_CONFIG_SIZE,
    MAX_INDEX_DEPTH,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ResolvedImage,
    config_platform,
    parse_image_manifest,
    select_manifest,
    sniff_media_type,
    verify_digest,
)
from dockbuild.errors import DigestMismatchError, DockbuildError

REF_NAME = "org.opencontainers.image.ref.name"
DEFAULT_TAG = "latest"
_DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")


def blob_path(layout: Path, digest: str) -> Path:
    """Where a layout keeps the blob `digest` (validated, so it cannot name another path)."""
    if not _DIGEST.fullmatch(digest):
        raise DockbuildError(f"invalid digest {digest!r}: expected sha256: and 64 hex digits")
    algorithm, _, hex_part = digest.partition(":")
    return layout / "blobs" / algorithm / hex_part


def _read_index_json(layout: Path) -> dict[str, Any]:
    if not (layout / "oci-layout").is_file():
        raise DockbuildError(
            f"{layout} is not an OCI image layout (no oci-layout file)",
            hint="export one with -o type=oci,tar=false or skopeo copy ... oci:DIR",
        )
    try:
        version = json.loads((layout / "oci-layout").read_bytes()).get("imageLayoutVersion")
        index = json.loads((layout / "index.json").read_bytes())
    except FileNotFoundError as e:
        raise DockbuildError(f"{layout} is not an OCI image layout (no index.json)") from e
    except (ValueError, AttributeError) as e:
        raise DockbuildError(f"{layout}: oci-layout or index.json is not valid JSON") from e
    if version != "1.0.0":
        raise DockbuildError(f"{layout}: unsupported image layout version {version!r}")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise DockbuildError(f"{layout}: index.json has no manifests list")
    return index


def _read_blob(layout: Path, desc: Descriptor, limit: int, where: str) -> bytes:
    """A small blob (manifest, index, config), verified against its descriptor."""
    path = blob_path(layout, desc.digest)
    if desc.size > limit:
        raise DockbuildError(f"{where}: {desc.digest} is {desc.size} bytes, more than {limit}")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError as e:
        raise DockbuildError(f"{where}: blob {desc.digest} is missing from the layout") from e
    if len(data) != desc.size:
        raise DigestMismatchError(
            f"{where}: size mismatch for {desc.digest}: expected {desc.size} bytes, got {len(data)}"
        )
    verify_digest(data, desc.digest, where)
    return data


def _entry_tag(entry: Any) -> str | None:
    annotations = entry.get("annotations") if isinstance(entry, dict) else None
    return (annotations or {}).get(REF_NAME)


def _choose_top(
    layout: Path, index: dict[str, Any], tag: str | None, digest: str | None, platform: str
) -> Descriptor:
    """The top-level entry meant by tag / digest / the defaults."""
    where = str(layout)
    entries: list[Any] = index["manifests"]
    if digest is not None:
        blob_path(layout, digest)  # validates the digest
        for entry in entries:
            if isinstance(entry, dict) and entry.get("digest") == digest:
                return Descriptor.from_json(entry, where)
        # Not listed, but the blob may still be there (a manifest inside a nested index).
        path = blob_path(layout, digest)
        if not path.is_file():
            raise DockbuildError(f"{where}: no manifest {digest} in the layout")
        size = path.stat().st_size
        if size > MAX_MANIFEST_SIZE:
            raise DockbuildError(f"{where}: {digest} is too large to be a manifest")
        return Descriptor(media_type="", digest=digest, size=size)

    wanted = tag or DEFAULT_TAG
    matching = [e for e in entries if _entry_tag(e) == wanted]
    if not matching and tag is None and len(entries) == 1:
        matching = entries
    if not matching:
        tags = sorted({t for e in entries if (t := _entry_tag(e))})
        raise DockbuildError(
            f"{where}: no image tagged {wanted!r} in the layout"
            + (f" (tags: {', '.join(tags)})" if tags else ""),
            hint="name one with oci-layout://PATH:TAG or oci-layout://PATH@sha256:...",
        )
    if len(matching) == 1:
        return Descriptor.from_json(matching[0], where)
    # Several entries under one name (podman/skopeo store one per platform this way).
    return select_manifest({"manifests": matching}, platform, f"{where}:{wanted}")


def resolve_layout(
    layout: Path,
    tag: str | None = None,
    digest: str | None = None,
    platform: str = "linux/amd64",
) -> ResolvedImage:
    """The image for `platform` in an OCI layout, chosen by tag or digest.

    Without either: the only entry of index.json, else the one tagged `latest`. An
    index (nested or not) is followed to its entry for `platform`.
    """
    layout = Path(layout)
    where = str(layout) + (f"@{digest}" if digest else f":{tag}" if tag else "")
    desc = _choose_top(layout, _read_index_json(layout), tag, digest, platform)
    for _ in range(MAX_INDEX_DEPTH):
        data = _read_blob(layout, desc, MAX_MANIFEST_SIZE, where)
        media_type, document = sniff_media_type(data, desc.media_type or None, where)
        if media_type in MANIFEST_TYPES:
            break
        desc = select_manifest(document, platform, where)
    else:
        raise DockbuildError(f"{where}: indexes nested more than {MAX_INDEX_DEPTH} deep")
    config_desc, layers = parse_image_manifest(document, where)
    config = _read_blob(layout, config_desc, MAX_CONFIG_SIZE, where)
    return ResolvedImage(
        ref=None,
        manifest_digest=desc.digest,
        manifest=data,
        manifest_media_type=media_type,
        config_digest=config_desc.digest,
        config=config,
        layers=layers,
        platform=config_platform(config, where, platform),
    )
