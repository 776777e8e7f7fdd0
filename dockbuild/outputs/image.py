"""Image documents: config, manifest and index bytes exactly as BuildKit writes them.

Digests are over bytes, so the bytes must be BuildKit's, which are Go's encoding/json:

- compact output with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped as ``\\u003c``...;
- struct fields in declaration order, maps with sorted keys;
- the config is patched by BuildKit through ``map[string]json.RawMessage``, so its top
  level keys come out sorted while nested objects keep their struct order
  (ocispec ``ImageConfig`` then docker's ``Healthcheck``, ``OnBuild``, ``Shell``);
- the manifest is ``json.MarshalIndent(ocispecs.Manifest, "", "  ")``: schemaVersion,
  mediaType, config, layers, annotations; descriptors are mediaType, digest, size, ...;
- index.json of an OCI layout is containerd's ``json.Marshal(ocispec.Index)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dockbuild.engine.compression import (
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    config_media_type,
    convert_layer_media_type,
    manifest_media_type,
)

ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CREATED = "org.opencontainers.image.created"

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'

# --- Go's encoding/json ------------------------------------------------------------------

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def go_json(value: Any, *, indent: int | None = None) -> bytes:
    """Serialise like Go's ``json.Marshal`` (or ``MarshalIndent`` with ``indent``)."""
    if indent is None:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(value, ensure_ascii=False, indent=indent, separators=(",", ": "))
    # These characters only ever occur inside JSON strings, so replacing them everywhere
    # is exactly Go's HTML-safe string escaping.
    for char, escaped in _GO_ESCAPES.items():
        text = text.replace(char, escaped)
    return text.encode("utf-8")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


Order = Callable[[Any], Any]


def _sorted_map(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    return {k: value[k] for k in sorted(value)}


def _struct(fields: Sequence[str], nested: Mapping[str, Order] | None = None) -> Order:
    """Order a dict like a Go struct: known fields in order, unknown ones sorted after."""

    def order(value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        out: dict[str, Any] = {}
        for key in [
            *[f for f in fields if f in value],
            *sorted(k for k in value if k not in fields),
        ]:
            item = value[key]
            fn = (nested or {}).get(key)
            out[key] = fn(item) if fn is not None else item
        return out

    return order


def _list_of(fn: Order) -> Order:
    return lambda value: [fn(v) for v in value] if isinstance(value, list) else value


_platform = _struct(("architecture", "os", "os.version", "os.features", "variant"))
_descriptor = _struct(
    ("mediaType", "digest", "size", "urls", "annotations", "data", "platform", "artifactType"),
    {"annotations": _sorted_map, "platform": _platform},
)
_history = _struct(("created", "created_by", "author", "comment", "empty_layer"))
_rootfs = _struct(("type", "diff_ids"))
_healthcheck = _struct(("Test", "Interval", "Timeout", "StartPeriod", "StartInterval", "Retries"))
_image_config = _struct(
    (
        "User",
        "ExposedPorts",
        "Env",
        "Entrypoint",
        "Cmd",
        "Volumes",
        "WorkingDir",
        "Labels",
        "StopSignal",
        "ArgsEscaped",
        "Healthcheck",
        "OnBuild",
        "Shell",
    ),
    {
        "ExposedPorts": _sorted_map,
        "Volumes": _sorted_map,
        "Labels": _sorted_map,
        "Healthcheck": _healthcheck,
    },
)
_CONFIG_NESTED: dict[str, Order] = {
    "config": _image_config,
    "rootfs": _rootfs,
    "history": _list_of(_history),
}
_manifest = _struct(
    ("schemaVersion", "mediaType", "artifactType", "config", "layers", "subject", "annotations"),
    {
        "config": _descriptor,
        "layers": _list_of(_descriptor),
        "subject": _descriptor,
        "annotations": _sorted_map,
    },
)
_index = _struct(
    ("schemaVersion", "mediaType", "artifactType", "manifests", "subject", "annotations"),
    {"manifests": _list_of(_descriptor), "subject": _descriptor, "annotations": _sorted_map},
)


# --- documents ---------------------------------------------------------------------------


# Named tuples, not frozen dataclasses: a cached export loads this module, and the
# dataclasses module is a large part of its start-up.


class Descriptor(NamedTuple):
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = {}  # read only: the default is never written
    platform: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        ordered: dict[str, Any] = _descriptor(out)
        return ordered

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Descriptor:
        return cls(
            media_type=value["mediaType"],
            digest=value["digest"],
            size=int(value["size"]),
            annotations=dict(value.get("annotations") or {}),
            platform=value.get("platform"),
        )

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


def config_json(config: Mapping[str, Any]) -> bytes:
    """The config blob: top-level keys sorted, nested objects in Go struct order."""
    ordered = {}
    for key in sorted(config):
        fn = _CONFIG_NESTED.get(key)
        ordered[key] = fn(config[key]) if fn is not None else config[key]
    return go_json(ordered)


def manifest_json(
    config: Descriptor,
    layers: Sequence[Descriptor],
    *,
    oci_mediatypes: bool,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """The image manifest blob, indented as BuildKit's writer indents it."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_media_type(oci_mediatypes),
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return go_json(_manifest(doc), indent=2)


def index_json(manifests: Sequence[Descriptor], *, media_type: str | None = None) -> bytes:
    """An index document (compact, as containerd writes an OCI layout's index.json)."""
    doc: dict[str, Any] = {"schemaVersion": 2}
    if media_type:
        doc["mediaType"] = media_type
    doc["manifests"] = [m.to_json() for m in manifests]
    return go_json(_index(doc))


def platform_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The platform an image config describes, for its index entry."""
    out: dict[str, Any] = {
        "architecture": config.get("architecture", ""),
        "os": config.get("os", ""),
    }
    for key in ("os.version", "os.features", "variant"):
        if config.get(key):
            out[key] = config[key]
    return out


class LayerBlob(NamedTuple):
    """A compressed layer in the cache store: its descriptor and where to read it."""

    descriptor: Descriptor
    path: Path


class ImageBlobs(NamedTuple):
    """One single-platform image, ready for an exporter: documents and blob locations.

    ``blobs`` maps each layer digest to the file holding it (the cache store's
    ``blobs/sha256/<hex>``); config and manifest are held as bytes.
    """

    config: bytes
    manifest: bytes
    blobs: Mapping[str, Path]

    @property
    def manifest_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.manifest)
        return doc

    @property
    def config_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.config)
        return doc

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_json(d) for d in self.manifest_doc["layers"]]

    def manifest_descriptor(self, annotations: Mapping[str, str] | None = None) -> Descriptor:
        """The manifest's descriptor, with the platform of its config."""
        return Descriptor(
            media_type=self.manifest_doc["mediaType"],
            digest=self.manifest_digest,
            size=len(self.manifest),
            annotations=dict(annotations or {}),
            platform=platform_of(self.config_doc),
        )


class IndexBlobs(NamedTuple):
    """A multi-platform image: its index (or Docker manifest list) and one image per
    platform, in the order the platforms were asked for."""

    manifest: bytes  # the index document
    images: Sequence[ImageBlobs]

    @property
    def manifest_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.manifest)
        return doc

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    def manifest_descriptor(self, annotations: Mapping[str, str] | None = None) -> Descriptor:
        """The index's descriptor (it has no platform of its own)."""
        return Descriptor(
            media_type=self.manifest_doc["mediaType"],
            digest=self.manifest_digest,
            size=len(self.manifest),
            annotations=dict(annotations or {}),
        )


def build_index(
    images: Sequence[ImageBlobs],
    *,
    oci_mediatypes: bool,
    descriptor_annotations: Sequence[Mapping[str, str]] = (),
    annotations: Mapping[str, str] | None = None,
) -> IndexBlobs:
    """The index of ``images``: one entry per platform with its ``platform`` fields, the
    document indented as BuildKit's image writer indents it."""
    notes = list(descriptor_annotations) or [{}] * len(images)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX if oci_mediatypes else DOCKER_MANIFEST_LIST,
        "manifests": [
            image.manifest_descriptor(note).to_json() for image, note in zip(images, notes, strict=True)
        ],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return IndexBlobs(go_json(_index(doc), indent=2), tuple(images))


def build_image(
    config: Mapping[str, Any],
    layers: Sequence[LayerBlob],
    *,
    oci_mediatypes: bool,
    annotations: Mapping[str, str] | None = None,
) -> ImageBlobs:
    """Assemble config and manifest for ``layers`` (bottom first).

    ``config`` is the full image config with history; the engine has filled
    ``rootfs.diff_ids``, one per layer. Layer media types are converted to the family
    that ``oci_mediatypes`` asks for.
    """
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise ValueError(f"config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    config_bytes = config_json(config)
    config_desc = Descriptor(
        config_media_type(oci_mediatypes), sha256_digest(config_bytes), len(config_bytes)
    )
    layer_descs = [
        Descriptor(
            convert_layer_media_type(layer.descriptor.media_type, oci_mediatypes),
            layer.descriptor.digest,
            layer.descriptor.size,
            # Docker media types carry no annotations (BuildKit drops them).
            annotations=layer.descriptor.annotations if oci_mediatypes else {},
        )
        for layer in layers
    ]
    manifest = manifest_json(
        config_desc, layer_descs, oci_mediatypes=oci_mediatypes, annotations=annotations
    )
    return ImageBlobs(
        config=config_bytes,
        manifest=manifest,
        blobs={layer.descriptor.digest: layer.path for layer in layers},
    )


# --- image names -----------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """A reference in full form, as BuildKit names images: docker.io/library/x:latest."""
    rest, digest = (name.split("@", 1) + [""])[:2] if "@" in name else (name, "")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, remainder
    else:
        domain, path = "docker.io", rest
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path.split(":", 1)[0]:
        path = "library/" + path
    repo, _, tag = path.partition(":")
    if not repo or repo != repo.lower():
        raise ValueError(f"invalid image name {name!r}: repository names must be lowercase")
    if not tag and not digest:
        tag = "latest"
    out = f"{domain}/{repo}"
    if tag:
        out += f":{tag}"
    if digest:
        out += f"@{digest}"
    return out


def familiar_name(name: str) -> str:
    """The short form docker shows (``hello:1`` for ``docker.io/library/hello:1``)."""
    full = normalize_name(name)
    if full.startswith("docker.io/"):
        full = full[len("docker.io/") :]
        if full.startswith("library/") and full.count("/") == 1:
            full = full[len("library/") :]
    return full


def ref_name(name: str) -> str:
    """The OCI ``ref.name`` annotation for a name: what follows the repository (the tag).

    containerd's rule: the object after the first ``:`` or ``@`` of the path, so
    ``docker.io/library/hello:1`` gives ``1`` and a digest reference ``@sha256:...``.
    """
    full = normalize_name(name)
    path = full.split("/", 1)[1]
    cut = min((i for i in (path.find(":"), path.find("@")) if i >= 0), default=-1)
    if cut < 0:
        return full
    obj = path[cut:]
    return obj[1:] if obj.startswith(":") else obj


def layout_index(
    image: ImageBlobs | IndexBlobs,
    names: Sequence[str],
    *,
    created: str | None = None,
    descriptor_annotations: Mapping[str, str] | None = None,
) -> bytes:
    """index.json of an OCI layout (and docker tarball) holding ``image`` under ``names``.

    One manifest entry per name with the containerd name and OCI ref annotations, or a
    single unnamed entry, as containerd's archive exporter writes it.
    """
    base: dict[str, str] = dict(descriptor_annotations or {})
    if created:
        base[ANNOTATION_CREATED] = created
    entries = []
    unnamed: list[str | None] = [None]
    for name in [*names] or unnamed:
        annotations = dict(base)
        if name is not None:
            full = normalize_name(name)
            annotations[ANNOTATION_IMAGE_NAME] = full
            annotations[ANNOTATION_REF_NAME] = ref_name(full)
        entries.append(image.manifest_descriptor(annotations))
    return index_json(entries, media_type=OCI_INDEX)
