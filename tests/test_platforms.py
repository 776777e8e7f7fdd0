"""Platform names normalised as containerd's platforms package does (--platform,
FROM --platform, the platform ARGs)."""

from __future__ import annotations

import pytest

from dockbuild import platforms
from dockbuild.errors import DockbuildError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/amd64/v1", "linux/amd64"),
        ("linux/amd64/v3", "linux/amd64/v3"),
        ("x86_64", "linux/amd64"),
        ("amd64", "linux/amd64"),
        ("arm64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("aarch64", "linux/arm64"),
        ("linux/aarch64/8", "linux/arm64"),
        ("linux/arm64/v9.0", "linux/arm64/v9"),
        ("armhf", "linux/arm/v7"),
        ("arm", "linux/arm/v7"),
        ("linux/arm/7", "linux/arm/v7"),
        ("linux/arm/v6", "linux/arm/v6"),
        ("armel", "linux/arm/v6"),
        ("i386", "linux/386"),
        ("386", "linux/386"),
        ("linux/i686", "linux/386"),
        ("riscv64", "linux/riscv64"),
        ("ppc64le", "linux/ppc64le"),
        ("s390x", "linux/s390x"),
        ("Linux/ARM64", "linux/arm64"),
        ("windows/amd64", "windows/amd64"),
    ],
)
def test_platforms_normalise_as_containerd_does(text: str, expected: str) -> None:
    assert platforms.normalize(text) == expected


def test_a_single_os_word_means_this_machines_architecture() -> None:
    host = platforms.host()
    assert platforms.normalize("linux") == host
    assert platforms.normalize("local") == host


def test_a_platform_list_is_normalised_and_deduplicated_in_order() -> None:
    assert platforms.parse_list("linux/arm64/v8, amd64,aarch64,linux/arm/v7") == [
        "linux/arm64",
        "linux/amd64",
        "linux/arm/v7",
    ]


@pytest.mark.parametrize("text", ["", "linux/", "linux/arm/v7/x", "a b", "linux/amd64,,linux/arm64"])
def test_malformed_platforms_are_refused(text: str) -> None:
    with pytest.raises(DockbuildError, match="invalid platform"):
        platforms.parse_list(text)


def test_results_are_named_per_platform_as_buildkit_names_them() -> None:
    assert platforms.path_name("linux/arm/v7") == "linux_arm_v7"
    assert platforms.split("linux/arm/v7") == ("linux", "arm", "v7")
    assert platforms.split("linux/amd64") == ("linux", "amd64", "")
