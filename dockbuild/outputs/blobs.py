"""An image's blobs for an export: one compressed blob per layer, made once by
:mod:`dockbuild.engine.layers` and remembered, then the config and the manifest.

A second export of the same image compresses nothing; the layers of a pulled base
image keep their original blobs.
"""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any, NamedTuple

from dockbuild.engine import layers

if TYPE_CHECKING:
    from dockbuild.engine.store import Store
    from dockbuild.outputs.exporter import ExportRun, Image
    from dockbuild.outputs.image import ImageBlobs, IndexBlobs
    from dockbuild.outputs.spec import OutputSpec
    from dockbuild.progress import Progress


class LayerOptions(NamedTuple):
    """How layer blobs are made: the ``compression*`` and ``rewrite-timestamp`` options."""

    compression: str = "gzip"
    level: int | None = None
    force: bool = False
    clamp: int | None = None  # rewrite-timestamp: clamp file times of new layers to this

    def key(self, *, clamp: bool, squash: int | None = None) -> str:
        """The store's name for this blob variant (see :func:`layers.variant_key`)."""
        return layers.variant_key(
            self.compression,
            level=self.level,
            clamp=self.clamp if clamp else None,
            squash=squash,
        )


def layer_blobs(
    store: Store, image: Image, options: LayerOptions | str, progress: Progress
) -> list[layers.Blob]:
    """One compressed blob per layer, made (and remembered) where missing.

    Base-image layers keep the blob they came with unless ``force-compression``;
    ``rewrite-timestamp`` clamps the file times of the build's own layers only.
    """
    if isinstance(options, str):
        options = LayerOptions(options)
    out: list[layers.Blob] = []
    vertex = None
    layer_ids = list(image.state)
    squash_from = None
    if image.squash and len(layer_ids) - image.base_layers > 1:
        squash_from = image.base_layers
    for index, layer_id in enumerate(layer_ids[:squash_from]):
        base = index < image.base_layers
        if base and not options.force:
            found = layers.lookup_any(store, layer_id, (options.compression, *layers.KINDS))
            if found is not None:
                out.append(found)
                continue
        key = options.key(clamp=not base)
        blob = layers.lookup(store, layer_id, key)
        if blob is None:
            if vertex is None:
                vertex = progress.vertex("exporting layers")
            # One writer per blob: the platforms of one build (exported in parallel) and
            # other builds share the layers they have in common.
            with store.lock(f"layer-blob:{layer_id}:{key}"):
                blob = layers.lookup(store, layer_id, key) or _make_blob(store, layer_id, key, base, options)
        out.append(blob)
    if squash_from is not None:
        top = layer_ids[-1]
        key = options.key(clamp=True, squash=squash_from)
        blob = layers.lookup(store, top, key)
        if blob is None:
            if vertex is None:
                vertex = progress.vertex("exporting layers")
            from dockbuild.outputs.squash import write_squashed_tar

            upper = store.unpacked_paths(layer_ids[squash_from:])
            blob = layers.write_blob(
                store,
                options.compression,
                options.level,
                lambda f: write_squashed_tar(upper, f, store, clamp_mtime=options.clamp),
            )
            layers.remember(store, top, key, blob)
        out.append(blob)
    if vertex is not None:
        vertex.done()
    return out


def _make_blob(store: Store, layer_id: str, key: str, base: bool, options: LayerOptions) -> layers.Blob:
    # A base layer's tar cannot be made again byte for byte from its files: its blob is
    # recompressed so its diff_id stays. Our own layers' tars are deterministic, and
    # writing them again is faster than decompressing.
    existing = layers.lookup_any(store, layer_id) if base else None
    if existing is not None:
        source = store.blob_path(existing.digest)
        blob = layers.recompress(store, options.compression, options.level, source)
        layers.remember(store, layer_id, key, blob)
        return blob
    return layers.make_layer_blob(
        store,
        layer_id,
        options.compression,
        level=options.level,
        clamp=None if base else options.clamp,
    )


def squash_history(config: dict[str, Any], base_layers: int) -> None:
    """With one layer for all the build added, only its last non-empty entry keeps one."""
    seen = 0
    entries = config.get("history", [])
    own = []
    for entry in entries:
        if entry.get("empty_layer"):
            continue
        seen += 1
        if seen > base_layers:
            own.append(entry)
    for entry in own[:-1]:
        entry["empty_layer"] = True


def timestamp(epoch: float | None) -> str:
    """RFC 3339 in UTC, as BuildKit writes ``created``: the epoch, or now."""
    when = (
        datetime.datetime.fromtimestamp(epoch, datetime.UTC)
        if epoch is not None
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


def image_blobs(
    store: Store, image: Image, spec: OutputSpec, progress: Progress, now: str | None = None
) -> tuple[ImageBlobs, dict[str, dict[str, str]]]:
    """The image ``spec`` asks for (compression, times, media types, annotations) and the
    annotations by where they go."""
    from dockbuild.outputs.image import Descriptor, LayerBlob, build_image, platform_of
    from dockbuild.outputs.spec import image_annotations
    from dockbuild.platforms import format_platform

    level = spec.attrs.get("compression-level")
    epoch = image.epoch
    if spec.attrs.get("source-date-epoch"):
        epoch = int(spec.attrs["source-date-epoch"])
    options = LayerOptions(
        compression=spec.attrs.get("compression", "gzip"),
        level=int(level) if level is not None else None,
        force=spec.flag("force-compression"),
        clamp=epoch if spec.flag("rewrite-timestamp") and epoch is not None else None,
    )
    oci = spec.flag("oci-mediatypes", True)
    made = layer_blobs(store, image, options, progress)
    config = json.loads(json.dumps(image.config))
    fallback = timestamp(epoch) if epoch is not None or now is None else now
    history = config.get("history", [])
    for index, entry in enumerate(history):
        if index in image.history_times:
            when = image.history_times[index]
            entry["created"] = fallback if epoch is not None or when is None else when
        else:
            entry.setdefault("created", fallback)
    # The last history time, as BuildKit: a rebuild from the cache is the same image.
    config["created"] = history[-1]["created"] if history and epoch is None else fallback
    if image.squash:
        squash_history(config, image.base_layers)
    config["rootfs"] = {"type": "layers", "diff_ids": [b.diff_id for b in made]}
    blobs = [
        LayerBlob(Descriptor(b.media_type(), b.digest, b.size), store.blob_path(b.digest))
        for b in made
    ]
    plat = platform_of(config)
    platform = format_platform(
        str(plat.get("os") or ""), str(plat.get("architecture") or ""), str(plat.get("variant") or "")
    )
    notes = image_annotations(spec, platform)
    return build_image(config, blobs, oci_mediatypes=oci, annotations=notes["manifest"]), notes


class ExportedImage(NamedTuple):
    """An image output's blobs, its annotations by where they go, and its names."""

    blobs: ImageBlobs
    notes: dict[str, dict[str, str]]
    names: list[str]


class ExportedIndex(NamedTuple):
    """A multi-platform image output: its index (with one image per platform), and its
    names."""

    blobs: IndexBlobs
    names: list[str]
    descriptor_annotations: dict[str, str]  # annotation-index-descriptor.*: in index.json


def export_index(run: ExportRun, spec: OutputSpec) -> ExportedIndex:
    """The image index ``spec`` asks for (one image per platform of ``run``), its names,
    and its ids recorded in ``run`` (the index's digest; an index has no config)."""
    from concurrent.futures import ThreadPoolExecutor

    from dockbuild.outputs.exporter import ExportIds
    from dockbuild.outputs.image import build_index
    from dockbuild.outputs.spec import image_names

    # The platforms' layers are compressed in parallel (zlib and zstd release the GIL).
    with ThreadPoolExecutor(max_workers=len(run.images)) as pool:
        made = list(
            pool.map(lambda image: image_blobs(run.store, image, spec, run.progress, run.now), run.images.values())
        )
    index = build_index(
        [blobs for blobs, _ in made],
        oci_mediatypes=spec.flag("oci-mediatypes", True),
        descriptor_annotations=[notes["manifest-descriptor"] for _, notes in made],
        annotations=made[0][1]["index"],
    )
    names = image_names(spec, index.manifest_digest)
    run.ids = ExportIds(
        manifest_digest=index.manifest_digest,
        descriptor=index.manifest_descriptor(made[0][1]["index-descriptor"]).to_json(),
        names=names,
    )
    return ExportedIndex(index, names, made[0][1]["index-descriptor"])


def export_image(run: ExportRun, spec: OutputSpec) -> ExportedImage:
    """The image ``spec`` asks for, its names, and its ids recorded in ``run``."""
    from dockbuild.outputs.exporter import ExportIds
    from dockbuild.outputs.spec import image_names

    blobs, notes = image_blobs(run.store, run.image, spec, run.progress, run.now)
    names = image_names(spec, blobs.manifest_digest)
    run.ids = ExportIds(
        image_id=blobs.config_digest,
        manifest_digest=blobs.manifest_digest,
        descriptor=blobs.manifest_descriptor(notes["manifest-descriptor"]).to_json(),
        names=names,
    )
    return ExportedImage(blobs, notes, names)
