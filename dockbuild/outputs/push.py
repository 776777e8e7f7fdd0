"""``type=image`` and ``type=registry``: the image pushed to every repository it names.

Without ``push=true`` nothing keeps it (there is no image store); its ids are still
reported.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dockbuild.engine.store import Store
    from dockbuild.outputs.exporter import ExportRun
    from dockbuild.outputs.image import ImageBlobs, IndexBlobs
    from dockbuild.outputs.spec import OutputSpec
    from dockbuild.progress import Progress

# BuildKit's daemon keeps a type=image result in its image store; dockbuild has none.
_NOT_STORED = (
    "WARNING: -o type=image without push=true keeps the image nowhere: dockbuild has no "
    "image store (its digests are still reported). Use --push, --load, or "
    "-o type=oci,dest=FILE (or type=docker)"
)


def _say_not_stored(spec: OutputSpec, progress: Progress) -> None:
    """The warning for an image kept nowhere, unless ``store=false`` says that is the wish
    (BuildKit's key for "not into the image store"; kaniko's --no-push)."""
    if spec.flag("store", True):
        progress.message(_NOT_STORED)


def _layer_origins(store: Store, sources: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(layer digest, the repository it was pulled from) for each registry image read:
    BuildKit's distribution-source labels, taken from the pinned manifests in the cache."""
    from dockbuild.engine.registry.reference import parse_reference

    origins = []
    for identifier in sources:
        location, _, manifest_digest = identifier.removeprefix("docker-image://").rpartition("@")
        try:
            ref = parse_reference(location)
            manifest = json.loads(store.blob_path(manifest_digest).read_bytes())
        except (OSError, ValueError):
            continue  # not in the cache (nothing of it was pulled): nothing to mount
        origins += [(layer["digest"], ref) for layer in manifest.get("layers", [])]
    return origins


def _push(
    spec: OutputSpec,
    blobs: ImageBlobs | IndexBlobs,
    names: list[str],
    progress: Progress,
    pusher: Any,
    origins: list[tuple[str, Any]],
) -> Any:
    """Push to every repository named (tags, or by digest), sharing one pusher per build
    so a second repository mounts the blobs the first one received; a layer of an image
    the build pulled from the same registry is mounted from the repository it came from.
    An index goes after the images it lists, each pushed by its digest."""
    from dockbuild.engine.registry.client import RegistryClient
    from dockbuild.engine.registry.hosts import load_hosts
    from dockbuild.engine.registry.push import PushBlob, Pusher
    from dockbuild.engine.registry.reference import Reference, parse_reference
    from dockbuild.outputs.image import IndexBlobs

    refs = [parse_reference(n) for n in names if "@" not in n]
    insecure = spec.flag("registry.insecure") or spec.flag("insecure")
    if pusher is None or insecure:
        known = pusher.known if pusher is not None else {}
        if pusher is not None:
            pusher.client.close()
        # config.toml's insecure registries, and with registry.insecure=true the ones named.
        client = RegistryClient(insecure=load_hosts().insecure | ({r.domain for r in refs} if insecure else set()))
        pusher = Pusher(client)
        pusher.known.update(known)
    for digest, origin in origins:
        pusher.remember(digest, origin)
    by_digest = spec.flag("push-by-digest")
    images = blobs.images if isinstance(blobs, IndexBlobs) else [blobs]
    items: dict[str, list[PushBlob]] = {}
    for image in images:
        items[image.manifest_digest] = [
            *(PushBlob(d.digest, d.size, path=image.blobs[d.digest]) for d in image.layers),
            PushBlob(image.config_digest, len(image.config), data=image.config),
        ]
    repos: dict[tuple[str, str], list[str]] = {}
    for ref in refs:
        tags = repos.setdefault((ref.domain, ref.path), [])
        if ref.tag and not by_digest:
            tags.append(ref.tag)
    for (domain, path), tags in repos.items():
        ref = Reference(domain, path)
        vertex = progress.vertex(f"pushing {ref.repository}")
        pusher.log = lambda text, v=vertex: v.log("stdout", text.encode())
        try:
            if isinstance(blobs, IndexBlobs):
                for image in images:  # by digest: the index names them
                    pusher.push(ref, items[image.manifest_digest], image.manifest, image.manifest_doc["mediaType"])
                pusher.push(ref, [], blobs.manifest, blobs.manifest_doc["mediaType"], tags=tags)
            else:
                pusher.push(ref, items[blobs.manifest_digest], blobs.manifest, blobs.manifest_doc["mediaType"], tags=tags)
        except BaseException as e:
            vertex.error(str(e))
            raise
        vertex.done()
    return pusher


class RegistryExporter:
    """Pushes image outputs, sharing one pusher per build: a second repository mounts
    the blobs the first one received."""

    def __init__(self) -> None:
        self.pusher: Any = None

    def export(self, run: ExportRun, spec: OutputSpec) -> None:
        from dockbuild.outputs.blobs import export_image, export_index

        if run.multi_platform:
            index = export_index(run, spec)
            if not spec.push:
                _say_not_stored(spec, run.progress)
                return
            sources = tuple(dict.fromkeys(s for image in run.images.values() for s in image.sources))
            origins = _layer_origins(run.store, sources)
            self.pusher = _push(spec, index.blobs, index.names, run.progress, self.pusher, origins)
            return
        image = export_image(run, spec)
        if not spec.push:
            _say_not_stored(spec, run.progress)
            return
        origins = _layer_origins(run.store, run.image.sources)
        self.pusher = _push(spec, image.blobs, image.names, run.progress, self.pusher, origins)

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.client.close()
            self.pusher = None
