"""Image sources: resolve a base image, pull the layer blobs that are missing.

A layer's blob is kept in ``blobs/`` (an export reuses it unchanged) and is unpacked into
``snapshots/<id>`` (id from its diff_id) the first time a step reads its files, then
shared by every build after that (Store.unpacked_paths). Tags resolve through the
registry once and are then reused from the cache unless ``--pull`` is given.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dockbuild import llb
from dockbuild.engine.store import BlobInfo, Store
from dockbuild.errors import DigestMismatchError, DockbuildError
from dockbuild.progress import Progress, Vertex

if TYPE_CHECKING:  # the registry client loads only when a registry is asked
    from dockbuild.engine.registry.client import RegistryClient
    from dockbuild.engine.registry.reference import Reference

T = TypeVar("T")

_LAYER_COMPRESSION = {"gzip": "gzip", "zstd": "zstd"}


@dataclass(frozen=True)
class ImageInfo:
    """What the frontend learns about a base image: a pinned identifier and its config."""

    identifier: str  # docker-image://REF@sha256:... or oci-layout://NAME@sha256:...
    config: dict[str, Any]
    name: str  # how progress shows it


def compression_of(media_type: str) -> str:
    for suffix, kind in _LAYER_COMPRESSION.items():
        if media_type.endswith(suffix):
            return kind
    return "uncompressed"


class ImageSources:
    """Resolves and materialises image sources for one build."""

    def __init__(
        self,
        store: Store,
        layouts: dict[str, Path] | None = None,
        pull: bool = False,
        platform: str = "linux/amd64",
    ) -> None:
        self.store = store
        self.layouts = layouts or {}  # named oci-layout contexts
        self.pull = pull
        self.platform = platform
        self._client: RegistryClient | None = None
        self._hosts: Any = None  # registry mirrors and insecure hosts, read with the client
        self._mirror_client: Any = None
        self._client_lock = threading.Lock()
        self._layer_locks: dict[str, threading.Lock] = {}

    # -- resolution (for the frontend) ---------------------------------------------

    def resolve_registry(self, ref_text: str, platform: str | None = None) -> ImageInfo:
        """Pin a registry reference to the manifest for ``platform`` (the build's default
        if None); tags are cached unless --pull."""
        from dockbuild.engine.registry.reference import parse_reference

        ref = parse_reference(ref_text)
        platform = platform or self.platform
        manifest_digest = None
        if ref.digest is None and not self.pull:
            manifest_digest = self.store.get_resolution(str(ref), platform)
        if manifest_digest is None or not self._have_image_meta(manifest_digest):
            resolved = self._from_mirrors(ref, lambda c, r: c.resolve(r, platform))
            self.store.put_blob_bytes(resolved.manifest)
            self.store.put_blob_bytes(resolved.config)
            manifest_digest = resolved.manifest_digest
            if ref.digest is None:
                self.store.put_resolution(str(ref), platform, manifest_digest)
        name = f"{ref.repository}:{ref.tag}" if ref.tag else ref.repository
        return ImageInfo(
            identifier=f"docker-image://{name}@{manifest_digest}",
            config=self._config_of(manifest_digest),
            name=f"{name}@{manifest_digest}",
        )

    def resolve_layout(
        self,
        name: str,
        tag: str | None = None,
        digest: str | None = None,
        platform: str | None = None,
    ) -> ImageInfo:
        """The image for ``platform`` (the build's default if None) in a named layout."""
        from dockbuild.engine.sources import oci_layout

        path = self.layouts[name]
        resolved = oci_layout.resolve_layout(path, tag, digest, platform or self.platform)
        self.store.put_blob_bytes(resolved.manifest)
        self.store.put_blob_bytes(resolved.config)
        return ImageInfo(
            identifier=f"oci-layout://{name}@{resolved.manifest_digest}",
            config=json.loads(resolved.config),
            name=f"{name}@{resolved.manifest_digest}",
        )

    def client(self) -> RegistryClient:
        with self._client_lock:
            if self._client is None:
                from dockbuild.engine.registry.client import RegistryClient
                from dockbuild.engine.registry.hosts import load_hosts

                self._hosts = load_hosts()
                self._client = RegistryClient(insecure=self._hosts.insecure)
            return self._client

    def _from_mirrors(self, ref: Reference, call: Callable[[RegistryClient, Reference], T]) -> T:
        """``call(candidate)`` for each mirror of ``ref``'s registry, then the registry
        itself: the first that succeeds wins; the registry's own error is the one raised."""
        client = self.client()
        candidates = self._hosts.candidates(ref)
        if len(candidates) > 1:
            from dockbuild.engine.registry.client import RegistryClient

            with self._client_lock:
                if self._mirror_client is None:  # no retries: a dead mirror is skipped at once
                    self._mirror_client = RegistryClient(insecure=self._hosts.insecure, retries=0)
        for candidate in candidates[:-1]:
            try:
                return call(self._mirror_client, candidate)
            except DockbuildError:
                continue  # verified content only: a failing mirror just falls over
        return call(client, candidates[-1])

    def _have_image_meta(self, manifest_digest: str) -> bool:
        if not self.store.has_blob(manifest_digest):
            return False
        manifest = json.loads(self.store.blob_path(manifest_digest).read_bytes())
        if "config" not in manifest:
            return False
        return self.store.has_blob(manifest["config"]["digest"])

    def _manifest(self, manifest_digest: str) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads(self.store.blob_path(manifest_digest).read_bytes())
        return manifest

    def _config_of(self, manifest_digest: str) -> dict[str, Any]:
        manifest = self._manifest(manifest_digest)
        config: dict[str, Any] = json.loads(self.store.blob_path(manifest["config"]["digest"]).read_bytes())
        return config

    # -- materialisation (for the solver) --------------------------------------------

    def materialize(
        self, op: llb.SourceOp, progress: Progress, work: AbstractContextManager[Any]
    ) -> tuple[str, ...]:
        scheme, _, rest = op.identifier.partition("://")
        location, _, manifest_digest = rest.rpartition("@")
        if scheme not in ("docker-image", "oci-layout") or not manifest_digest:
            raise DockbuildError(f"unsupported source {op.identifier!r}")
        if not self._have_image_meta(manifest_digest):
            if scheme == "oci-layout":
                self.resolve_layout(location, digest=manifest_digest)
            else:
                self.resolve_registry(f"{_strip_tag(location)}@{manifest_digest}")
        manifest = self._manifest(manifest_digest)
        config = self._config_of(manifest_digest)
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        layers = manifest.get("layers", [])
        if len(diff_ids) != len(layers):
            raise DockbuildError(
                f"image {location}: config lists {len(diff_ids)} layers, manifest {len(layers)}"
            )
        ids = tuple(diff_id.partition(":")[2][:20] for diff_id in diff_ids)
        missing = [i for i, lid in enumerate(ids) if not self.store.has_layer(lid)]
        vertex = progress.vertex(op.name or f"FROM {location}")
        if not missing:
            vertex.cached()  # at once: its start and CACHED lines stay together
            return ids
        with work:
            try:
                with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                    jobs = [
                        pool.submit(
                            self._ensure_layer,
                            scheme,
                            location,
                            layers[i],
                            diff_ids[i],
                            ids[i],
                            vertex,
                        )
                        for i in missing
                    ]
                    for job in jobs:
                        job.result()
            except DockbuildError as e:
                vertex.error(e.message)
                raise
        vertex.done()
        return ids

    def _ensure_layer(
        self, scheme: str, location: str, desc: dict[str, Any], diff_id: str, layer_id: str, vertex: Vertex
    ) -> None:
        """Bring the layer's blob in, verified; it is unpacked when a step reads it."""
        with self.store.lock("layer:" + layer_id):
            if self.store.has_layer(layer_id):
                return
            if not self.store.has_blob(desc["digest"]):
                self._fetch(scheme, location, desc)
                vertex.log("stdout", f"{desc['digest']} {desc['size']} bytes done\n".encode())
            self.store.add_packed_layer(
                BlobInfo(layer_id, compression_of(desc["mediaType"]), desc["digest"], desc["size"]),
                diff_id,
            )

    def _fetch(self, scheme: str, location: str, desc: dict[str, Any]) -> None:
        """Download (or copy) a blob into the store, hashing it once on the way in. It
        lands in this process's temp area first: a killed pull leaves nothing behind
        that the next build does not sweep."""
        tmp = self.store.tempdir("p") / "blob"
        if scheme == "oci-layout":
            from dockbuild.engine.sources import oci_layout

            src = oci_layout.blob_path(self.layouts[location], desc["digest"])
            h = hashlib.sha256()
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                for chunk in iter(lambda: fin.read(1 << 20), b""):
                    h.update(chunk)
                    fout.write(chunk)
            if "sha256:" + h.hexdigest() != desc["digest"]:
                raise DigestMismatchError(
                    f"blob {desc['digest']} in layout {location} has digest sha256:{h.hexdigest()}"
                )
        else:
            from dockbuild.engine.registry.client import Descriptor
            from dockbuild.engine.registry.reference import parse_reference

            ref = parse_reference(location)
            descriptor = Descriptor(desc["mediaType"], desc["digest"], desc["size"])
            self._from_mirrors(ref, lambda c, r: c.fetch_blob(r, descriptor, tmp))
        self.store.put_blob_file(tmp, desc["digest"])


def _strip_tag(location: str) -> str:
    """``repo:tag`` -> ``repo`` (a port in the domain is not a tag)."""
    head, sep, tail = location.rpartition(":")
    return head if sep and "/" not in tail else location
