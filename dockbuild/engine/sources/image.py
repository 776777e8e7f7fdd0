"""Image sources: resolve a base image, pull what is missing, unpack each layer once.

A layer is unpacked into ``snapshots/<id>`` (id from its diff_id) the first time any
build needs it and shared by every build after that; its original compressed blob stays
in ``blobs/`` so an export reuses it unchanged. Tags resolve through the registry once
and are then reused from the cache unless ``--pull`` is given.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockbuild import llb
from dockbuild.engine.store import BlobInfo, Store, remove_tree
from dockbuild.errors import DigestMismatchError, DockbuildError
from dockbuild.progress import Progress

_LAYER_COMPRESSION = {"gzip": "gzip", "zstd": "zstd"}


@dataclass(frozen=True)
class ImageInfo:
    """What the frontend learns about a base image: a pinned identifier and its config."""

    identifier: str  # docker-image://REF@sha256:... or oci-layout://NAME@sha256:...
    config: dict
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
        self._client = None
        self._hosts: Any = None  # registry mirrors and insecure hosts, read with the client
        self._mirror_client: Any = None
        self._client_lock = threading.Lock()
        self._layer_locks: dict[str, threading.Lock] = {}

    # -- resolution (for the frontend) ---------------------------------------------

    def resolve_registry(self, ref_text: str) -> ImageInfo:
        """Pin a registry reference to a platform manifest; tags are cached unless --pull."""
        from dockbuild.engine.registry.reference import parse_reference

        ref = parse_reference(ref_text)
        manifest_digest = None
        if ref.digest is None and not self.pull:
            manifest_digest = self.store.get_resolution(str(ref), self.platform)
        if manifest_digest is None or not self._have_image_meta(manifest_digest):
            resolved = self._from_mirrors(ref, lambda c, r: c.resolve(r, self.platform))
            self.store.put_blob_bytes(resolved.manifest)
            self.store.put_blob_bytes(resolved.config)
            manifest_digest = resolved.manifest_digest
            if ref.digest is None:
                self.store.put_resolution(str(ref), self.platform, manifest_digest)
        name = f"{ref.repository}:{ref.tag}" if ref.tag else ref.repository
        return ImageInfo(
            identifier=f"docker-image://{name}@{manifest_digest}",
            config=self._config_of(manifest_digest),
            name=f"{name}@{manifest_digest}",
        )

    def resolve_layout(self, name: str, tag: str | None = None, digest: str | None = None) -> ImageInfo:
        from dockbuild.engine.sources import oci_layout

        path = self.layouts[name]
        resolved = oci_layout.resolve_layout(path, tag, digest, self.platform)
        self.store.put_blob_bytes(resolved.manifest)
        self.store.put_blob_bytes(resolved.config)
        return ImageInfo(
            identifier=f"oci-layout://{name}@{resolved.manifest_digest}",
            config=json.loads(resolved.config),
            name=f"{name}@{resolved.manifest_digest}",
        )

    def client(self):  # type: ignore[no-untyped-def]
        with self._client_lock:
            if self._client is None:
                from dockbuild.engine.registry.client import RegistryClient
                from dockbuild.engine.registry.hosts import load_hosts

                self._hosts = load_hosts()
                self._client = RegistryClient(insecure=self._hosts.insecure)
            return self._client

    def _from_mirrors(self, ref, call):  # type: ignore[no-untyped-def]
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

    def _manifest(self, manifest_digest: str) -> dict:
        return json.loads(self.store.blob_path(manifest_digest).read_bytes())

    def _config_of(self, manifest_digest: str) -> dict:
        manifest = self._manifest(manifest_digest)
        return json.loads(self.store.blob_path(manifest["config"]["digest"]).read_bytes())

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
        vertex = progress.vertex(op.name or f"FROM {location}")
        missing = [i for i, lid in enumerate(ids) if not self.store.has_layer(lid)]
        if not missing:
            vertex.cached()
            return ids
        with work:
            try:
                with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                    jobs = [
                        pool.submit(
                            self._ensure_layer, scheme, location, layers[i], diff_ids[i], ids[i], vertex
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
        self, scheme: str, location: str, desc: dict, diff_id: str, layer_id: str, vertex
    ) -> None:  # type: ignore[no-untyped-def]
        with self.store.lock("layer:" + layer_id):
            if self.store.has_layer(layer_id):
                return
            blob = self.store.blob_path(desc["digest"])
            if not blob.exists():
                self._fetch(scheme, location, desc, blob)
                vertex.log("stdout", f"{desc['digest']} {desc['size']} bytes done\n".encode())
            dest = self.store.tempdir("l")
            try:
                got = _unpack_verified(blob, dest / "diff")
                if got != diff_id:
                    raise DigestMismatchError(
                        f"layer {desc['digest']}: uncompressed content is {got}, "
                        f"the image config says {diff_id}"
                    )
                self.store.commit_layer(layer_id, dest / "diff", diff_id)
            finally:
                remove_tree(dest)
            self.store.set_layer_blob(
                BlobInfo(layer_id, compression_of(desc["mediaType"]), desc["digest"], desc["size"])
            )
            vertex.log("stdout", f"extracting {desc['digest']} done\n".encode())

    def _fetch(self, scheme: str, location: str, desc: dict, blob: Path) -> None:
        if scheme == "oci-layout":
            from dockbuild.engine.sources import oci_layout

            src = oci_layout.blob_path(self.layouts[location], desc["digest"])
            tmp = self.store.tempdir("c") / "blob"
            h = hashlib.sha256()
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                for chunk in iter(lambda: fin.read(1 << 20), b""):
                    h.update(chunk)
                    fout.write(chunk)
            if "sha256:" + h.hexdigest() != desc["digest"]:
                raise DigestMismatchError(
                    f"blob {desc['digest']} in layout {location} has digest sha256:{h.hexdigest()}"
                )
            self.store.put_blob_file(tmp)
            return
        from dockbuild.engine.registry.client import Descriptor
        from dockbuild.engine.registry.reference import parse_reference

        ref = parse_reference(location)
        descriptor = Descriptor(desc["mediaType"], desc["digest"], desc["size"])
        self._from_mirrors(ref, lambda c, r: c.fetch_blob(r, descriptor, blob))


class _HashingReader:
    """Wraps a stream and hashes what passes through (the layer's diff_id)."""

    def __init__(self, raw) -> None:  # type: ignore[no-untyped-def]
        self.raw = raw
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data


def _unpack_verified(blob: Path, dest: Path) -> str:
    from dockbuild.engine import archive
    from dockbuild.userns import in_user_namespace

    dest.mkdir()
    with archive.open_blob(blob) as stream:
        reader = _HashingReader(stream)
        # In a user namespace (rootless), ownership and opaque dirs take the rootless path.
        archive.unpack_layer(reader, dest, rootless=in_user_namespace())
        while reader.read(1 << 20):  # tar padding after the end-of-archive marker
            pass
    return "sha256:" + reader.sha.hexdigest()


def _strip_tag(location: str) -> str:
    """``repo:tag`` -> ``repo`` (a port in the domain is not a tag)."""
    head, sep, tail = location.rpartition(":")
    return head if sep and "/" not in tail else location
