"""Image reference parsing and docker's normalisation, as a table."""

from __future__ import annotations

import pytest

from dockbuild.engine.registry.reference import Reference, parse_reference
from dockbuild.errors import DockbuildError

DIGEST = "sha256:" + "ab" * 32

# text -> (canonical str(), familiar form)
NORMALISED = [
    ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("index.docker.io/library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("user/app:v1", "docker.io/user/app:v1", "user/app:v1"),
    ("docker.io/library/a/b", "docker.io/library/a/b:latest", "library/a/b:latest"),
    ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
    ("localhost:5000/x", "localhost:5000/x:latest", "localhost:5000/x:latest"),
    ("127.0.0.1:5000/foo:1", "127.0.0.1:5000/foo:1", "127.0.0.1:5000/foo:1"),
    ("ghcr.io/o/r/deep:tag", "ghcr.io/o/r/deep:tag", "ghcr.io/o/r/deep:tag"),
    ("[::1]:5000/x", "[::1]:5000/x:latest", "[::1]:5000/x:latest"),
    (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}", f"busybox@{DIGEST}"),
    (
        f"busybox:1.36@{DIGEST}",
        f"docker.io/library/busybox:1.36@{DIGEST}",
        f"busybox:1.36@{DIGEST}",
    ),
    ("a_b-c__d---e/f.g", "docker.io/a_b-c__d---e/f.g:latest", "a_b-c__d---e/f.g:latest"),
    # A first component without . or : is a Docker Hub user, not a registry.
    ("myhost/app", "docker.io/myhost/app:latest", "myhost/app:latest"),
    ("localhost:5000", "docker.io/library/localhost:5000", "localhost:5000"),
]


@pytest.mark.parametrize(("text", "canonical", "familiar"), NORMALISED)
def test_reference_normalises_like_docker(text: str, canonical: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == canonical
    assert ref.familiar == familiar
    assert parse_reference(canonical) == ref


def test_reference_fields_split_domain_path_tag_digest() -> None:
    ref = parse_reference(f"localhost:5000/team/app:v2@{DIGEST}")
    assert ref == Reference("localhost:5000", "team/app", "v2", DIGEST)
    assert ref.repository == "localhost:5000/team/app"
    assert ref.identifier == DIGEST


def test_digest_alone_leaves_tag_empty() -> None:
    ref = parse_reference(f"busybox@{DIGEST}")
    assert ref.tag is None
    assert ref.identifier == DIGEST


def test_with_digest_pins_and_keeps_tag() -> None:
    ref = parse_reference("busybox:1.36").with_digest(DIGEST)
    assert str(ref) == f"docker.io/library/busybox:1.36@{DIGEST}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (" busybox", "whitespace"),
        ("BusyBox", "lowercase"),
        ("docker.io/User/app", "lowercase"),
        ("busybox:", "invalid tag"),
        ("busybox:-bad", "invalid tag"),
        ("busybox:" + "t" * 129, "invalid tag"),
        ("busybox@sha256:1234", "64 lowercase hex"),
        ("busybox@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("busybox@sha256:" + "A" * 64, "64 lowercase hex"),
        ("a//b", "invalid repository name component"),
        ("a/b_/c", "invalid repository name component"),
        ("-host.com/app", "invalid registry host"),
        ("localhost:5000/", "no repository name"),
        ("x/" + "a" * 300, "longer than 255"),
    ],
)
def test_invalid_references_are_rejected_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(DockbuildError) as caught:
        parse_reference(text)
    assert message in caught.value.message
    assert "invalid image reference" in caught.value.message
