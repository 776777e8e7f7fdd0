"""The OCI distribution client: resolve an image reference to a verified manifest, pull blobs.

What every image source shares (descriptors, platform matching, manifest parsing) lives
in manifest.py and is re-exported here. `requests` is imported only when a
`RegistryClient` is created.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import tempfile
import threading
import time
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from dockbuild import __version__, platforms
from dockbuild.atomic import fsync_dir
from dockbuild.engine.registry.auth import (
    Challenge,
    basic_authorization,
    docker_config_dir,
    fetch_bearer_token,
    lookup_credentials,
    parse_www_authenticate,
)
from dockbuild.engine.registry.manifest import (  # noqa: F401 (re-exported)
    _ALGORITHMS,
    _DIGEST,
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_ACCEPT,
    MANIFEST_TYPES,
    MAX_CONFIG_SIZE,
    MAX_INDEX_DEPTH,
    MAX_MANIFEST_SIZE,
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    MEDIA_SCHEMA1,
    ResolvedImage,
    _is_attestation,
    config_platform,
    parse_image_manifest,
    select_manifest,
    sniff_media_type,
    verify_digest,
)
from dockbuild.engine.registry.manifest import (
    Descriptor as Descriptor,  # the public name importers use
)
from dockbuild.engine.registry.reference import DOCKER_HUB, Reference
from dockbuild.errors import DigestMismatchError, RegistryError, RegistryUnreachableError

if TYPE_CHECKING:
    import requests

_CHUNK = 1 << 20
# Yielded by _blob_chunks when a ranged request got the whole blob: start over.
_RESTART: Any = object()
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10


def _is_loopback(domain: str) -> bool:
    """localhost, 127.0.0.0/8 and [::1], with or without a port."""
    host = domain[1:].split("]", 1)[0] if domain.startswith("[") else domain.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_host(domain: str) -> str:
    """Docker Hub's name is docker.io; its API lives elsewhere."""
    return "registry-1.docker.io" if domain == DOCKER_HUB else domain


def _connection_reason(error: BaseException) -> str:
    """A short, human reason for a failed connection, from requests' nested errors."""
    text = str(error)
    for pattern, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("Temporary failure in name resolution", "unknown host (DNS lookup failed)"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("timed out", "timed out"),
        ("Connection reset", "connection reset"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
        ("WRONG_VERSION_NUMBER", "TLS handshake failed (is it a plain-HTTP registry?)"),
    ):
        if pattern in text:
            return reason
    return type(error).__name__ + (f": {text}" if text else "")


def _error_details(response: requests.Response) -> list[tuple[str, str]]:
    """(code, message) pairs from a distribution-spec error body, if there is one."""
    try:
        body = json.loads(response.content[:65536] or b"{}")
    except (ValueError, UnicodeDecodeError):
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return []
    return [
        (str(e.get("code", "")), str(e.get("message", ""))) for e in errors if isinstance(e, dict)
    ]


def ca_file(domain: str) -> str | None:
    """A CA certificate configured for ``domain``, as docker and podman look for one.

    ``<dir>/<host[:port]>/ca.crt`` (or the first ``*.crt``) in ``$DOCKBUILD_CERTS_D``
    (colon-separated), ``/etc/docker/certs.d``, ``/etc/containers/certs.d`` and
    ``~/.config/containers/certs.d``.
    """
    dirs = [d for d in os.environ.get("DOCKBUILD_CERTS_D", "").split(":") if d]
    dirs += [
        "/etc/docker/certs.d",
        "/etc/containers/certs.d",
        str(Path.home() / ".config" / "containers" / "certs.d"),
    ]
    for base in dirs:
        host_dir = Path(base) / domain
        if (host_dir / "ca.crt").is_file():
            return str(host_dir / "ca.crt")
        with contextlib.suppress(OSError):
            found = sorted(p for p in host_dir.glob("*.crt") if p.is_file())
            if found:
                return str(found[0])
    return None


class RegistryClient:
    """Pulls from registries speaking the OCI distribution API (and Docker Hub's v2).

    Loopback registries use plain HTTP, others HTTPS; `insecure` names hosts that
    may use an unverified certificate or plain HTTP (docker's insecure-registries).
    Tokens are cached per registry and repository. One client may be shared by
    threads pulling layers in parallel.
    """

    def __init__(
        self,
        *,
        config_dir: Path | None = None,
        insecure: frozenset[str] | set[str] | tuple[str, ...] = (),
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        import requests  # here, not at module level: most builds never talk to a registry
        import urllib3

        self._requests = requests
        # What a broken connection raises: requests' wrappers before the body, urllib3's
        # own errors while streaming it from response.raw.
        self._stream_errors: tuple[type[BaseException], ...] = (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
        )
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"dockbuild/{__version__}"
        self._config_dir = config_dir
        self._insecure = frozenset(insecure)
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._lock = threading.Lock()
        # (domain, repository path) -> (Authorization header value, monotonic expiry)
        self._authorization: dict[tuple[str, str], tuple[str, float]] = {}
        self._plain_http: set[str] = set()
        # What a token is asked for: pushers widen it to "pull,push" and add the
        # repositories they mount blobs from ("repository:other/repo:pull").
        self.scope_actions = "pull"
        # Loopback registries found to speak TLS (they answered plain HTTP with a 400).
        self._tls_loopback: set[str] = set()
        self.extra_scopes: list[str] = []

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API -------------------------------------------------------------------

    def resolve(self, ref: Reference, platform: str = "linux/amd64") -> ResolvedImage:
        """The verified manifest and config of `ref` for `platform`.

        An index or manifest list is followed to the entry for `platform`; the
        manifest is checked against the registry's Docker-Content-Digest, the digest in
        `ref` and the digest in the index, and the config against the manifest.
        """
        platforms.normalize(platform)  # reject a bad platform before any network traffic
        where = str(ref)
        data, media_type, digest = self.fetch_manifest(ref)
        for _ in range(MAX_INDEX_DEPTH):
            media_type, document = sniff_media_type(data, media_type, where)
            if media_type in MANIFEST_TYPES:
                break
            data, media_type, digest = self.fetch_manifest(
                ref, select_manifest(document, platform, where)
            )
        else:
            raise RegistryError(f"{where}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        config_desc, layers = parse_image_manifest(document, where)
        config = self.fetch_blob_bytes(ref, config_desc)
        return ResolvedImage(
            ref=ref,
            manifest_digest=digest,
            manifest=data,
            manifest_media_type=media_type,
            config_digest=config_desc.digest,
            config=config,
            layers=layers,
            platform=config_platform(config, where, platform),
        )

    def fetch_blob(self, ref: Reference, desc: Descriptor, dest: Path) -> None:
        """Download a blob to `dest`, verified, atomically.

        The bytes stream into a temporary file beside `dest` while being hashed; only a
        blob with the right size and digest is fsynced and renamed to `dest`. A broken
        connection resumes the download where it stopped with a ranged request (or
        starts again if the registry ignores the range), up to the retry limit.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        where = f"{ref.repository}@{desc.digest}"
        algorithm, _, expected = desc.digest.partition(":")
        if algorithm not in _ALGORITHMS:
            raise RegistryError(f"{where}: unsupported digest algorithm {algorithm!r}")
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                hasher = _ALGORITHMS[algorithm]()
                size = 0
                for attempt in range(self._retries + 1):
                    try:
                        # closing(): an early raise must release the connection now, not at GC.
                        with contextlib.closing(self._blob_chunks(ref, desc, size)) as chunks:
                            for chunk in chunks:
                                if chunk is _RESTART:  # the range was ignored: a full body
                                    out.seek(0)
                                    out.truncate()
                                    hasher = _ALGORITHMS[algorithm]()
                                    size = 0
                                    continue
                                size += len(chunk)
                                if size > desc.size:
                                    raise DigestMismatchError(
                                        f"{where}: the registry sent more than the {desc.size} "
                                        f"bytes the manifest promises (expected {desc.digest})"
                                    )
                                hasher.update(chunk)
                                out.write(chunk)
                        break
                    except self._stream_errors as e:
                        if attempt >= self._retries:
                            raise RegistryError(
                                f"{where}: download from {ref.domain} failed: {_connection_reason(e)}"
                            ) from e
                        self._sleep(attempt, None)
                if size != desc.size:
                    raise DigestMismatchError(
                        f"{where}: size mismatch: expected {desc.size} bytes, got {size}"
                    )
                actual = hasher.hexdigest()
                if actual != expected:
                    raise DigestMismatchError(
                        f"{where}: content digest mismatch: expected {desc.digest}, "
                        f"got {algorithm}:{actual}"
                    )
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def fetch_manifest(
        self, ref: Reference, desc: Descriptor | None = None
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of one manifest or index, whatever it describes
        (an image, a cache export): ``ref`` itself, by its tag or digest, or the entry
        ``desc`` of an index in ``ref``'s repository.

        Verified every way available: against the registry's Docker-Content-Digest, the
        digest asked for, and ``desc``'s size.
        """
        identifier = desc.digest if desc else ref.identifier
        expected_digest = desc.digest if desc else ref.digest
        expected_size = desc.size if desc else None
        declared_type = desc.media_type if desc else None
        where = str(ref) if identifier == ref.identifier else f"{ref.repository}@{identifier}"
        response = self._request(
            ref,
            "GET",
            f"/v2/{ref.path}/manifests/{identifier}",
            headers={"Accept": MANIFEST_ACCEPT},
            what=where,
        )
        with response:
            data = self._read_limited(response, expected_size or MAX_MANIFEST_SIZE, where)
            header_digest = response.headers.get("Docker-Content-Digest")
            content_type = response.headers.get("Content-Type") or declared_type
        if expected_size is not None and len(data) != expected_size:
            raise DigestMismatchError(
                f"{where}: size mismatch: expected {expected_size} bytes, got {len(data)}"
            )
        if header_digest and _DIGEST.fullmatch(header_digest):
            verify_digest(data, header_digest, where)
        if expected_digest:
            verify_digest(data, expected_digest, where)
        digest = expected_digest or "sha256:" + hashlib.sha256(data).hexdigest()
        return data, content_type or "", digest

    def fetch_blob_bytes(
        self, ref: Reference, desc: Descriptor, limit: int = MAX_CONFIG_SIZE
    ) -> bytes:
        """A small blob (a config) in memory, verified against ``desc``."""
        where = f"{ref.repository}@{desc.digest}"
        if desc.size > limit:
            raise RegistryError(
                f"{where}: {desc.size} bytes is more than the {limit} a config may have"
            )
        parts: list[bytes] = []
        received = 0
        with contextlib.closing(self._blob_chunks(ref, desc)) as chunks:
            for chunk in chunks:
                received += len(chunk)
                if received > desc.size:
                    break  # more than promised: the size check below reports it
                parts.append(chunk)
        data = b"".join(parts)
        if received != desc.size:
            raise DigestMismatchError(
                f"{where}: size mismatch: expected {desc.size} bytes, got {received}"
                + (" or more" if received > desc.size else "")
            )
        verify_digest(data, desc.digest, where)
        return data

    # -- streams ---------------------------------------------------------------------

    def _blob_chunks(
        self, ref: Reference, desc: Descriptor, offset: int = 0
    ) -> Generator[bytes, None, None]:
        """The blob's bytes from ``offset`` (a ranged request); when the registry answers
        a range with the whole blob, ``_RESTART`` comes first."""
        where = f"{ref.repository}@{desc.digest}"
        # Registries serve blobs as stored; a proxy must not re-encode them.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = self._request(
            ref,
            "GET",
            f"/v2/{ref.path}/blobs/{desc.digest}",
            headers=headers,
            what=where,
        )
        with response:
            if offset and response.status_code != 206:
                yield _RESTART
            # raw + decode_content=False: hash the bytes as sent, never a decoded form.
            yield from response.raw.stream(_CHUNK, decode_content=False)

    @staticmethod
    def _read_limited(response: requests.Response, limit: int, where: str) -> bytes:
        parts: list[bytes] = []
        size = 0
        for chunk in response.raw.stream(_CHUNK, decode_content=True):
            size += len(chunk)
            if size > limit:
                raise RegistryError(f"{where}: the manifest is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    # -- HTTP, auth, retries ----------------------------------------------------------

    def _base_url(self, domain: str) -> str:
        host = _api_host(domain)
        # A loopback registry speaks plain HTTP, unless a CA was configured for it.
        plain = (
            _is_loopback(domain) and ca_file(domain) is None and domain not in self._tls_loopback
        ) or domain in self._plain_http
        return f"{'http' if plain else 'https'}://{host}"

    def _request(
        self,
        ref: Reference,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        what: str,
        data: bytes | None = None,
        accept_status: frozenset[int] = frozenset(),
    ) -> requests.Response:
        """Send one API request with auth, retries and redirects; raise on failure.

        ``path`` may also be an absolute URL (an upload ``Location``); statuses in
        ``accept_status`` are returned to the caller instead of raised.

        A 401 is answered once by authenticating against the challenge; connection
        errors, 429 and 5xx are retried with exponential backoff.
        """
        authenticated = False
        attempt = 0
        while True:
            request_headers = dict(headers)
            authorization = self._cached_authorization(ref)
            if authorization:
                request_headers["Authorization"] = authorization
            url = (
                path
                if path.startswith(("http://", "https://"))
                else self._base_url(ref.domain) + path
            )
            try:
                response = self._send(method, url, request_headers, ref.domain, data)
            except (self._requests.ConnectionError, self._requests.Timeout) as e:
                if attempt < self._retries and not isinstance(
                    e, self._requests.exceptions.SSLError
                ):
                    self._sleep(attempt, None)
                    attempt += 1
                    continue
                raise RegistryUnreachableError(
                    f"{what}: cannot reach registry {ref.domain}: {_connection_reason(e)}"
                ) from e
            if response.status_code == 401 and not authenticated:
                authenticated = True
                challenges = parse_www_authenticate(response.headers.get("WWW-Authenticate", ""))
                response.close()
                if self._authenticate(ref, challenges):
                    continue
                raise self._unauthorized(what)
            if response.status_code in _RETRY_STATUSES and attempt < self._retries:
                retry_after = response.headers.get("Retry-After")
                response.close()
                self._sleep(attempt, retry_after)
                attempt += 1
                continue
            if response.status_code >= 400 and response.status_code not in accept_status:
                with response:
                    raise self._status_error(response, what)
            return response

    def _send(
        self, method: str, url: str, headers: dict[str, str], domain: str, data: bytes | None = None
    ) -> requests.Response:
        """Follow redirects by hand so Authorization never travels to another host."""
        verify: bool | str = domain not in self._insecure and (ca_file(domain) or True)
        for _ in range(_MAX_REDIRECTS):
            try:
                response = self._session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    stream=True,
                    allow_redirects=False,
                    timeout=self._timeout,
                    verify=verify,
                )
            except self._requests.exceptions.SSLError:
                # docker's insecure-registries: fall back to plain HTTP for such hosts.
                if domain in self._insecure and url.startswith("https://"):
                    self._plain_http.add(domain)
                    url = "http://" + url.removeprefix("https://")
                    continue
                raise
            if (
                response.status_code == 400
                and url.startswith("http://")
                and _is_loopback(domain)
                and self._speaks_tls(url, method, response)
            ):
                # A loopback registry behind TLS: speak TLS to it from now on.
                response.close()
                self._tls_loopback.add(domain)
                url = "https://" + url.removeprefix("http://")
                continue
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECT_STATUSES or not location:
                return response
            response.close()
            target = urljoin(url, location)
            if urlsplit(target).netloc != urlsplit(url).netloc:
                # Blob storage (S3, a CDN) gets a signed URL; our token is not for it.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if response.status_code == 303:
                method = "GET"
            url = target
        raise RegistryError(f"{url}: more than {_MAX_REDIRECTS} redirects")

    def _speaks_tls(self, url: str, method: str, response: requests.Response) -> bool:
        """Whether a 400 is Go's answer to plain HTTP sent to a TLS server."""
        marker = b"HTTP request to an HTTPS server"
        if method != "HEAD":
            return marker in response.content[:512]
        parts = urlsplit(url)  # a HEAD answer has no body: ask /v2/ the same way
        probe = self._session.get(f"http://{parts.netloc}/v2/", timeout=self._timeout)
        with probe:
            return probe.status_code == 400 and marker in probe.content[:512]

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self._backoff * (2**attempt)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 30.0))
        time.sleep(delay)

    def _cached_authorization(self, ref: Reference) -> str | None:
        with self._lock:
            cached = self._authorization.get((ref.domain, ref.path))
        if cached and time.monotonic() < cached[1]:
            return cached[0]
        return None

    def _authenticate(self, ref: Reference, challenges: list[Challenge]) -> bool:
        """Answer a 401 challenge; False when there is nothing to answer it with."""
        by_scheme = {c.scheme: c for c in challenges}
        credentials = lookup_credentials(ref.domain, self._config_dir)
        if "bearer" in by_scheme:
            token = fetch_bearer_token(
                self._session,
                by_scheme["bearer"],
                [f"repository:{ref.path}:{self.scope_actions}", *self.extra_scopes],
                credentials,
                timeout=self._timeout,
            )
            value, expires = f"Bearer {token.token}", token.expires_at
        elif "basic" in by_scheme and credentials and credentials.username:
            value, expires = basic_authorization(credentials), float("inf")
        else:
            return False
        with self._lock:
            self._authorization[(ref.domain, ref.path)] = (value, expires)
        return True

    def _unauthorized(self, what: str) -> RegistryError:
        config = docker_config_dir() if self._config_dir is None else self._config_dir
        shown = str(config / "config.json")
        home = str(Path.home()).rstrip("/") + "/"
        if home != "/" and shown.startswith(home):
            shown = "~/" + shown.removeprefix(home)
        return RegistryError(
            f"{what}: unauthorized: authentication required; "
            f"log in with docker login or check {shown}"
        )

    def _status_error(self, response: requests.Response, what: str) -> RegistryError:
        details = _error_details(response)
        codes = {code for code, _ in details}
        status = response.status_code
        if status == 401 or "UNAUTHORIZED" in codes:
            return self._unauthorized(what)
        if "MANIFEST_UNKNOWN" in codes or (status == 404 and "/manifests/" in response.url):
            return RegistryError(f"{what}: manifest unknown")
        if "NAME_UNKNOWN" in codes:
            return RegistryError(f"{what}: repository unknown to the registry")
        if "BLOB_UNKNOWN" in codes or (status == 404 and "/blobs/" in response.url):
            return RegistryError(f"{what}: blob unknown to the registry")
        if status == 403 or "DENIED" in codes:
            message = next((m for c, m in details if c == "DENIED" and m), "access denied")
            return RegistryError(f"{what}: denied: {message}")
        message = "; ".join(m or c for c, m in details) or response.reason or ""
        return RegistryError(f"{what}: the registry answered {status} {message}".rstrip())
