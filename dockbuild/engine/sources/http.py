"""HTTP(S) sources (``ADD https://...``): downloaded once, verified, kept as blobs.

As BuildKit does: the file is named after the URL's last path component (the frontend
passes the name), has mode 0600 and the mtime of the ``Last-Modified`` header, and with
``--checksum=sha256:...`` the content must match (then the cache key needs no
download). Without a checksum the URL is fetched to compute the key, conditionally
(``If-None-Match`` / ``If-Modified-Since`` from the last fetch), so an unchanged
resource is not downloaded twice.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dockbuild import llb
from dockbuild.errors import DockbuildError

if TYPE_CHECKING:
    from dockbuild.engine.store import Store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS http_sources (
    url TEXT PRIMARY KEY,
    etag TEXT NOT NULL,
    last_modified TEXT NOT NULL,
    digest TEXT NOT NULL,        -- sha256:<hex> of the body, a blob in the store
    mtime INTEGER NOT NULL,      -- seconds, from Last-Modified (else the fetch time)
    fetched REAL NOT NULL
)
"""
_db_lock = threading.Lock()


def _db(store: Store) -> sqlite3.Connection:
    conn = sqlite3.connect(store.root / "db.sqlite", timeout=60, isolation_level=None)
    conn.execute(_SCHEMA)
    return conn


def _lookup(store: Store, url: str) -> tuple[str, str, str, int] | None:
    with _db_lock:
        conn = _db(store)
        try:
            row: tuple[str, str, str, int] | None = conn.execute(
                "SELECT etag, last_modified, digest, mtime FROM http_sources WHERE url=?", (url,)
            ).fetchone()
            return row
        finally:
            conn.close()


def _remember(store: Store, url: str, etag: str, last_modified: str, digest: str, mtime: int) -> None:
    with _db_lock:
        conn = _db(store)
        try:
            conn.execute(
                "INSERT OR REPLACE INTO http_sources VALUES (?,?,?,?,?,?)",
                (url, etag, last_modified, digest, mtime, time.time()),
            )
        finally:
            conn.close()


def _headers(url: str, secrets: Mapping[str, Any] | None) -> dict[str, str]:
    """Auth from the secrets BuildKit names ``HTTP_AUTH_HEADER_<host>`` (the whole
    Authorization value) and ``HTTP_AUTH_TOKEN_<host>`` (a bearer token). Their values
    only ever go into this request's headers."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    out = {"User-Agent": "dockbuild"}
    header = (secrets or {}).get(f"HTTP_AUTH_HEADER_{host}")
    token = (secrets or {}).get(f"HTTP_AUTH_TOKEN_{host}")
    if header is not None:
        out["Authorization"] = _secret_text(header)
    elif token is not None:
        out["Authorization"] = "Bearer " + _secret_text(token)
    return out


def _secret_text(secret: Any) -> str:
    data = secret.read() if hasattr(secret, "read") else secret
    return (data.decode() if isinstance(data, bytes) else str(data)).strip()


def _fetch(
    url: str, store: Store, conditional: bool, expect: str = "", secrets: Mapping[str, Any] | None = None
) -> tuple[str, int]:
    """Download ``url`` into the blob store; return (digest, mtime)."""
    import urllib.error
    import urllib.request

    known = _lookup(store, url) if conditional else None
    headers = _headers(url, secrets)
    if known is not None and store.has_blob(known[2]):
        if known[0]:
            headers["If-None-Match"] = known[0]
        if known[1]:
            headers["If-Modified-Since"] = known[1]
    request = urllib.request.Request(url, headers=headers)
    tmp = store.tempdir("h") / "body"
    try:
        for attempt in range(3):
            try:
                response = urllib.request.urlopen(request, timeout=60)
                break
            except urllib.error.HTTPError as e:
                if e.code == 304 and known is not None:
                    return known[2], known[3]
                if e.code >= 500 and attempt < 2:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise DockbuildError(f"failed to fetch {url}: invalid response status {e.code}") from None
            except (urllib.error.URLError, OSError) as e:
                if attempt < 2:
                    time.sleep(0.5 * 2**attempt)
                    continue
                reason = getattr(e, "reason", e)
                raise DockbuildError(f"failed to fetch {url}: {reason}") from None
        h = hashlib.sha256()
        with response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            etag = response.headers.get("ETag", "")
            last_modified = response.headers.get("Last-Modified", "")
        digest = "sha256:" + h.hexdigest()
        if expect and digest != expect:
            raise DockbuildError(
                f"failed to fetch {url}: digest mismatch: expected {expect}, got {digest}"
            )
        store.put_blob_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.parent.rmdir()
    mtime = int(time.time())
    if last_modified:
        with contextlib.suppress(TypeError, ValueError):
            mtime = int(email.utils.parsedate_to_datetime(last_modified).timestamp())
    _remember(store, url, etag, last_modified, digest, mtime)
    return digest, mtime


def content_key(op: llb.SourceOp, store: Store, secrets: Mapping[str, Any] | None = None) -> str:
    """What the file is: the declared checksum, else the fetched content and mtime."""
    checksum = op.attr("checksum")
    if checksum:
        return checksum
    digest, mtime = _fetch(op.identifier, store, conditional=True, secrets=secrets)
    return f"{digest}@{mtime}"


def materialize(
    op: llb.SourceOp, store: Store, layer_dir: Path, secrets: Mapping[str, Any] | None = None
) -> None:
    """Write the file (mode 0600, mtime from Last-Modified) into an empty layer dir."""
    checksum = op.attr("checksum")
    known = _lookup(store, op.identifier)
    if known is not None and store.has_blob(known[2]) and (not checksum or known[2] == checksum):
        digest, mtime = known[2], known[3]
    else:
        digest, mtime = _fetch(op.identifier, store, conditional=False, expect=checksum, secrets=secrets)
    dest = layer_dir / op.attr("filename", "__unnamed__")
    with open(store.blob_path(digest), "rb") as src, open(dest, "wb") as f:
        while chunk := src.read(1 << 20):
            f.write(chunk)
    os.chmod(dest, 0o600)
    os.utime(dest, (mtime, mtime))
