"""Choosing an image index's entry for a platform, as containerd's Only matcher does in
BuildKit's pulls."""

from __future__ import annotations

from typing import Any

import pytest

from dockbuild.engine.registry.manifest import select_manifest
from dockbuild.errors import RegistryError


def _index(*plats: dict[str, str]) -> dict[str, Any]:
    return {
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{i:064x}",
                "size": 1,
                "platform": p,
            }
            for i, p in enumerate(plats, start=1)
        ]
    }


ARM5 = {"os": "linux", "architecture": "arm", "variant": "v5"}
ARM6 = {"os": "linux", "architecture": "arm", "variant": "v6"}
ARM64_V8 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
I386 = {"os": "linux", "architecture": "386"}
AMD64 = {"os": "linux", "architecture": "amd64"}


@pytest.mark.parametrize(
    ("asked", "entries", "chosen"),
    [
        ("linux/arm/v7", [ARM5, ARM6], 2),  # the newest variant that runs
        ("linux/arm64", [ARM6, ARM64_V8], 2),  # arm64/v8 is arm64
        ("linux/arm64", [ARM5, ARM6], 2),  # an arm64 machine runs 32-bit arm
        ("linux/amd64", [I386], 1),
        ("linux/amd64/v2", [I386, AMD64], 2),
    ],
)
def test_an_index_entry_is_the_best_that_runs_on_the_asked_platform(
    asked: str, entries: list[dict[str, str]], chosen: int
) -> None:
    assert select_manifest(_index(*entries), asked, "img").digest == f"sha256:{chosen:064x}"


def test_an_index_without_a_platform_that_runs_names_the_ones_it_has() -> None:
    with pytest.raises(RegistryError) as caught:
        select_manifest(_index(ARM6, AMD64), "linux/arm/v5", "img")
    assert "no image for platform linux/arm/v5 (available: linux/arm/v6, linux/amd64)" in caught.value.message
