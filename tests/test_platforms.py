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
        ("linux/i686", "linux/i686"),  # containerd maps i386 only
        ("linux/arm64/v8.0", "linux/arm64"),
        ("linux/arm64/8.2", "linux/arm64/8.2"),  # only 8, v8, v8.0, 9, 9.0, v9.0 are rewritten
        ("linux/arm64/v8.2", "linux/arm64/v8.2"),
        ("linux/arm64/9", "linux/arm64/v9"),
        ("linux/arm/5", "linux/arm/v5"),
        ("linux/arm/8", "linux/arm/v8"),
        ("linux/armhf/v6", "linux/arm/v7"),  # armhf is v7 whatever the variant
        ("linux/x86-64/v2", "linux/amd64/v2"),
        ("linux/AMD64/V3", "linux/amd64/v3"),
        ("macos/arm64", "darwin/arm64"),
        ("hurd/386", "hurd/386"),
        ("windows(10.0.17763+win32k+a)/amd64", "windows(10.0.17763+a+win32k)/amd64"),
        ("loong64", "linux/loong64"),
        ("mips64le", "linux/mips64le"),
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


@pytest.mark.parametrize(
    "text",
    ["", "linux/", "linux/arm/v7/x", "a b", "linux/amd64,,linux/arm64", "linux/*", "linux/arm+64", "nosuchcpu"],
)
def test_malformed_platforms_are_refused(text: str) -> None:
    with pytest.raises(DockbuildError, match="invalid platform"):
        platforms.parse_list(text)


def test_results_are_named_per_platform_as_buildkit_names_them() -> None:
    assert platforms.path_name("linux/arm/v7") == "linux_arm_v7"
    assert platforms.split("linux/arm/v7") == ("linux", "arm", "v7")
    assert platforms.split("linux/amd64") == ("linux", "amd64", "")


def test_an_os_word_keeps_its_os_and_an_arch_word_means_linux() -> None:
    host_arch = platforms.host().split("/", 1)[1]
    assert platforms.normalize("windows") == f"windows/{host_arch}"
    assert platforms.normalize("zos") == f"zos/{host_arch}"
    assert platforms.normalize("s390x") == "linux/s390x"


@pytest.mark.parametrize(
    ("asked", "runs"),
    [
        ("linux/amd64", ["linux/amd64", "linux/386"]),
        ("linux/amd64/v3", ["linux/amd64/v3", "linux/amd64/v2", "linux/amd64", "linux/386"]),
        ("linux/arm/v7", ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        ("linux/arm/v5", ["linux/arm/v5"]),
        ("linux/arm64", ["linux/arm64", "linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        ("linux/arm64/v8.2", ["linux/arm64/v8.2", "linux/arm64/v8.1", "linux/arm64", "linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        ("linux/arm64/v9", ["linux/arm64/v9", "linux/arm64/v8.5", "linux/arm64/v8.4", "linux/arm64/v8.3", "linux/arm64/v8.2", "linux/arm64/v8.1", "linux/arm64", "linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        ("linux/arm64/v10", []),  # a variant containerd's table lacks matches nothing
        ("linux/riscv64", ["linux/riscv64"]),
    ],
)
def test_the_platforms_an_asked_platform_runs_are_containerds_only_matcher(asked: str, runs: list[str]) -> None:
    assert platforms.compatible(asked) == runs
