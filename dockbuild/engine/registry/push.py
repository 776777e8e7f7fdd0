"""Push an image to a registry: blobs (skipped when present, mounted, uploaded), then manifest.

The OCI distribution-spec push flow, as BuildKit's pusher does it:

1. ``HEAD /v2/<repo>/blobs/<digest>``: 200 means the blob is there, nothing to send;
2. a blob known to be in another repository of the same registry is mounted
   (``POST .../uploads/?mount=<digest>&from=<repo>``; 201 = mounted, 202 = refused and an
   upload session started instead): one this process pushed there, or one the caller
   :meth:`Pusher.remember`-ed (the layers of a pulled base image, by their repository);
3. otherwise uploaded: monolithic (``POST`` then ``PUT ?digest=`` with the body) for
   small blobs, chunked (``PATCH`` with ``Content-Range``, then ``PUT ?digest=``) for
   blobs larger than the chunk size, always following the latest ``Location``;
4. layers and config first, then ``PUT /v2/<repo>/manifests/<tag or digest>``; the
   registry's ``Docker-Content-Digest`` must be the manifest's digest.

Credentials come from docker's config.json through the client's auth machinery; the
token is asked for ``pull,push``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from dockbuild.engine.registry.client import RegistryClient
from dockbuild.engine.registry.reference import Reference
from dockbuild.errors import RegistryError

if TYPE_CHECKING:
    import requests

# Blobs up to this size go in one PUT; bigger ones in PATCH chunks of this size.
DEFAULT_CHUNK_SIZE = 32 << 20
_PARALLEL_BLOBS = 3


@dataclass(frozen=True)
class PushBlob:
    """One blob to push: its digest and size, and its bytes or the file holding them."""

    digest: str
    size: int
    data: bytes | None = None
    path: Path | None = None


@dataclass
class PushResult:
    """What happened to each blob: "exists", "mounted" or "uploaded" (with chunk counts)."""

    blobs: dict[str, str] = field(default_factory=dict)
    manifest_digest: str = ""


def chunk_size_from_env() -> int:
    """``DOCKBUILD_PUSH_CHUNK_SIZE`` (bytes) or the default."""
    text = os.environ.get("DOCKBUILD_PUSH_CHUNK_SIZE", "")
    if text.isdigit() and int(text) > 0:
        return int(text)
    return DEFAULT_CHUNK_SIZE


class Pusher:
    """Pushes images to registries through one client (its session, auth and TLS setup).

    It remembers which repository received each blob, so pushing the same image to a
    second repository of the same registry mounts the blobs instead of uploading them.
    """

    def __init__(
        self,
        client: RegistryClient,
        *,
        chunk_size: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        client.scope_actions = "pull,push"
        self.chunk_size = chunk_size or chunk_size_from_env()
        self.log = log or (lambda _text: None)
        self._lock = threading.Lock()
        # digest -> (domain, repository path) that holds it
        self.known: dict[str, tuple[str, str]] = {}

    def _say(self, text: str) -> None:
        with self._lock:  # progress vertices are not thread-safe; blobs push in threads
            self.log(text)

    def remember(self, digest: str, ref: Reference) -> None:
        """Note that ``ref``'s repository holds ``digest`` (e.g. a pulled base layer)."""
        with self._lock:
            self.known.setdefault(digest, (ref.domain, ref.path))

    def push(
        self,
        ref: Reference,
        blobs: Sequence[PushBlob],
        manifest: bytes,
        media_type: str,
        *,
        tags: Sequence[str] = (),
    ) -> PushResult:
        """Push ``blobs`` (layers, config) then ``manifest`` under each tag, or by digest.

        With no tags the manifest is pushed by its digest only (push-by-digest).
        """
        result = PushResult()
        with ThreadPoolExecutor(max_workers=_PARALLEL_BLOBS) as pool:
            outcomes = list(pool.map(lambda b: (b.digest, self._push_blob(ref, b)), blobs))
        result.blobs = dict(outcomes)
        import hashlib

        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        for identifier in list(tags) or [digest]:
            self._put_manifest(ref, identifier, manifest, media_type, digest)
        result.manifest_digest = digest
        return result

    # -- blobs ----------------------------------------------------------------------

    def _push_blob(self, ref: Reference, blob: PushBlob) -> str:
        if self._exists(ref, blob.digest):
            self._say(f"{blob.digest}: already exists\n")
            self.remember(blob.digest, ref)
            return "exists"
        location = None
        source = self._mount_source(ref, blob.digest)
        if source is not None:
            location = self._mount(ref, blob.digest, source)
            if location is None:
                self._say(f"{blob.digest}: mounted from {source}\n")
                self.remember(blob.digest, ref)
                return "mounted"
        if location is None:
            location = self._start_upload(ref, blob.digest)
        if blob.size > self.chunk_size:
            chunks = self._upload_chunked(ref, blob, location)
            outcome = f"uploaded in {chunks} chunks"
        else:
            self._finish_upload(ref, blob, location, self._read_all(blob))
            outcome = "uploaded"
        self._say(f"{blob.digest}: {outcome} ({blob.size} bytes)\n")
        with self._lock:
            self.known[blob.digest] = (ref.domain, ref.path)
        return outcome

    def _exists(self, ref: Reference, digest: str) -> bool:
        response = self.client._request(
            ref,
            "HEAD",
            f"/v2/{ref.path}/blobs/{digest}",
            headers={},
            what=f"{ref.repository}@{digest}",
            accept_status=frozenset({404}),
        )
        with response:
            return response.status_code == 200

    def _mount_source(self, ref: Reference, digest: str) -> str | None:
        with self._lock:
            known = self.known.get(digest)
        if known is None or known[0] != ref.domain or known[1] == ref.path:
            return None
        scope = f"repository:{known[1]}:pull"
        if scope not in self.client.extra_scopes:
            self.client.extra_scopes.append(scope)
        return known[1]

    def _mount(self, ref: Reference, digest: str, source: str) -> str | None:
        """Mount from ``source``: None when mounted, else the upload session it started."""
        response = self.client._request(
            ref,
            "POST",
            f"/v2/{ref.path}/blobs/uploads/?mount={digest}&from={source}",
            headers={"Content-Length": "0"},
            what=f"{ref.repository}: mount {digest} from {source}",
        )
        with response:
            if response.status_code == 201:
                return None
            if response.status_code == 202:
                return self._location(ref, response)
        raise RegistryError(
            f"{ref.repository}: mounting {digest} from {source}: "
            f"unexpected status {response.status_code}"
        )

    def _start_upload(self, ref: Reference, digest: str) -> str:
        response = self.client._request(
            ref,
            "POST",
            f"/v2/{ref.path}/blobs/uploads/",
            headers={"Content-Length": "0"},
            what=f"{ref.repository}: upload {digest}",
        )
        with response:
            if response.status_code != 202:
                raise RegistryError(
                    f"{ref.repository}: starting the upload of {digest}: "
                    f"unexpected status {response.status_code}"
                )
            return self._location(ref, response)

    def _upload_chunked(self, ref: Reference, blob: PushBlob, location: str) -> int:
        offset = 0
        chunks = 0
        with self._open(blob) as f:
            while offset < blob.size:
                data = f.read(self.chunk_size)
                if not data:
                    raise RegistryError(
                        f"{blob.digest}: the blob is shorter than {blob.size} bytes"
                    )
                end = offset + len(data) - 1
                response = self.client._request(
                    ref,
                    "PATCH",
                    location,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{end}",
                        "Content-Length": str(len(data)),
                    },
                    what=f"{ref.repository}: upload {blob.digest}",
                    data=data,
                )
                with response:
                    if response.status_code != 202:
                        raise RegistryError(
                            f"{ref.repository}: chunk {offset}-{end} of {blob.digest}: "
                            f"unexpected status {response.status_code}"
                        )
                    location = self._location(ref, response)
                offset = end + 1
                chunks += 1
        self._finish_upload(ref, blob, location, b"")
        return chunks

    def _finish_upload(self, ref: Reference, blob: PushBlob, location: str, data: bytes) -> None:
        separator = "&" if "?" in location else "?"
        response = self.client._request(
            ref,
            "PUT",
            f"{location}{separator}digest={blob.digest}",
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(data)),
            },
            what=f"{ref.repository}: upload {blob.digest}",
            data=data,
        )
        with response:
            if response.status_code not in (201, 204):
                raise RegistryError(
                    f"{ref.repository}: completing the upload of {blob.digest}: "
                    f"unexpected status {response.status_code}"
                )

    @staticmethod
    def _location(ref: Reference, response: requests.Response) -> str:
        location: str | None = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{ref.repository}: the registry gave no upload Location")
        if location.startswith("/"):
            parts = urlsplit(response.url)
            location = f"{parts.scheme}://{parts.netloc}{location}"
        return location

    @staticmethod
    def _read_all(blob: PushBlob) -> bytes:
        if blob.data is not None:
            return blob.data
        assert blob.path is not None
        data = blob.path.read_bytes()
        if len(data) != blob.size:
            raise RegistryError(
                f"{blob.digest}: {blob.path} holds {len(data)} bytes, expected {blob.size}"
            )
        return data

    @staticmethod
    def _open(blob: PushBlob) -> BinaryIO:
        import io

        if blob.data is not None:
            return io.BytesIO(blob.data)
        assert blob.path is not None
        return open(blob.path, "rb")  # noqa: SIM115 - the caller closes it

    # -- manifests ------------------------------------------------------------------

    def _put_manifest(
        self, ref: Reference, identifier: str, manifest: bytes, media_type: str, digest: str
    ) -> None:
        target = (
            f"{ref.repository}:{identifier}"
            if ":" not in identifier
            else f"{ref.repository}@{identifier}"
        )
        response = self.client._request(
            ref,
            "PUT",
            f"/v2/{ref.path}/manifests/{identifier}",
            headers={"Content-Type": media_type},
            what=target,
            data=manifest,
        )
        with response:
            answered = response.headers.get("Docker-Content-Digest")
            if response.status_code not in (200, 201, 202):
                raise RegistryError(f"{target}: unexpected status {response.status_code}")
        if answered and answered != digest:
            raise RegistryError(
                f"{target}: the registry stored the manifest as {answered}, expected {digest}"
            )
        self._say(f"pushing manifest for {target}@{digest} done\n")
