"""Image references (`busybox`, `localhost:5000/x:1`, `ghcr.io/o/r@sha256:...`), normalised as docker does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dockbuild.errors import DockbuildError

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"

# The grammar of distribution/reference (github.com/distribution/reference/regexp.go).
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Reference:
    """A normalised image reference.

    `domain` is the registry host (`docker.io` for Docker Hub, never `index.docker.io`),
    `path` the repository inside it (`library/busybox`). `tag` defaults to `latest`
    unless a digest was given alone; when both are given the digest decides what is
    pulled and the tag is kept for display.
    """

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """The full repository name, `docker.io/library/busybox`."""
        return f"{self.domain}/{self.path}"

    @property
    def familiar(self) -> str:
        """The short form docker prints: `busybox:latest`, `user/app@sha256:...`."""
        name = self.repository
        if self.domain == DOCKER_HUB:
            name = self.path
            rest = name.removeprefix("library/")
            if "/" not in rest:
                name = rest
        return name + self._suffix()

    @property
    def identifier(self) -> str:
        """What names the manifest in the registry API: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to a manifest digest (the tag kept for display)."""
        return Reference(self.domain, self.path, self.tag, digest)

    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag else ""
        return suffix + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.repository + self._suffix()


def _invalid(text: str, why: str) -> DockbuildError:
    return DockbuildError(
        f"invalid image reference {text!r}: {why}",
        hint="expected [REGISTRY/]NAME[:TAG][@sha256:DIGEST], e.g. busybox:1.36 or "
        "localhost:5000/app@sha256:...",
    )


def parse_digest(text: str, digest: str) -> str:
    """Validate `algorithm:hex` (sha256 or sha512); `text` is the reference for messages."""
    algorithm, _, hex_part = digest.partition(":")
    expected = _DIGEST_HEX_LENGTH.get(algorithm)
    if expected is None:
        raise _invalid(text, f"unsupported digest algorithm {algorithm!r} (use sha256)")
    if len(hex_part) != expected or not re.fullmatch(r"[a-f0-9]+", hex_part):
        raise _invalid(text, f"a {algorithm} digest is {expected} lowercase hex characters")
    return digest


def parse_reference(text: str) -> Reference:
    """Parse and normalise a reference the way `docker pull` does.

    `busybox` -> `docker.io/library/busybox:latest`; `index.docker.io/x/y` ->
    `docker.io/x/y:latest`; the first component is a registry only if it has a `.` or
    a `:` or is `localhost` (so `user/app` is on Docker Hub).
    """
    if not text or text != text.strip():
        raise _invalid(text, "empty or surrounded by whitespace")
    remainder, at, digest = text.partition("@")
    if at:
        parse_digest(text, digest)
    tag: str | None = None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _invalid(text, f"invalid tag {tag!r}")

    first, slash, rest = remainder.partition("/")
    if slash and (any(c in first for c in ".:") or first == "localhost"):
        domain, path = first, rest
        if not _DOMAIN.fullmatch(domain):
            raise _invalid(text, f"invalid registry host {domain!r}")
    else:
        domain, path = DOCKER_HUB, remainder
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"

    if not path:
        raise _invalid(text, "no repository name")
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            if component.lower() != component:
                raise _invalid(text, "repository name must be lowercase")
            raise _invalid(
                text,
                f"invalid repository name component {component!r} "
                "(lowercase letters, digits and single . _ __ - separators)",
            )
    if len(f"{domain}/{path}") > _MAX_NAME_LENGTH:
        raise _invalid(text, f"repository name longer than {_MAX_NAME_LENGTH} characters")

    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest if at else None)
