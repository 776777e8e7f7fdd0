"""A blob download cut mid-way resumes with a ranged request where it stopped, and the
result is still verified against its digest."""

from __future__ import annotations

import os
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from test_registry import StubRegistry, client, leftovers, sha256, stub  # noqa: F401

from dockbuild.engine.registry.client import Descriptor, RegistryClient
from dockbuild.engine.registry.reference import parse_reference


def test_broken_download_resumes_with_a_range(stub: StubRegistry, client: RegistryClient, tmp_path: Path) -> None:  # noqa: F811
    layer = os.urandom(300_000)
    cuts = [1000, 150_000]  # bytes sent by the first two answers before the drop

    def blob(_: StubRegistry, h: BaseHTTPRequestHandler):  # type: ignore[no-untyped-def]
        rng = h.headers.get("Range", "")
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        body = layer[start:]
        headers = {"Content-Range": f"bytes {start}-{len(layer) - 1}/{len(layer)}"} if start else {}
        if cuts:
            headers["X-Stub-Send-Only"] = str(cuts.pop(0) - start)
        return (206 if start else 200), headers, body

    desc = Descriptor("application/octet-stream", sha256(layer), len(layer))
    stub.routes = {f"/v2/team/app/blobs/{desc.digest}": blob}
    client.fetch_blob(parse_reference(f"{stub.host}/team/app:v1"), desc, tmp_path / "blob")
    assert (tmp_path / "blob").read_bytes() == layer
    ranges = [headers.get("Range") for _, headers in stub.requests]
    assert ranges == [None, "bytes=1000-", "bytes=150000-"]
    assert leftovers(tmp_path) == ["blob"]
