"""--squash: several overlay-format layers merged into one layer tar by the whiteout rules."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from dockbuild.engine.store import Store
from dockbuild.outputs.squash import write_squashed_tar


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _opaque(path: Path) -> None:
    os.setxattr(path, "user.overlay.opaque", b"y")


def _squash(tmp_path: Path, layers: list[Path]) -> tarfile.TarFile:
    store = Store(tmp_path / "root")
    out = io.BytesIO()
    try:
        write_squashed_tar(layers, out, store)
    finally:
        store.close()
    return tarfile.open(fileobj=io.BytesIO(out.getvalue()))  # noqa: SIM115 - in memory


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    if os.geteuid() != 0:
        pytest.skip("whiteouts are character devices: mknod needs root")
    one, two, three = (tmp_path / n for n in ("one", "two", "three"))
    # one: files and a directory
    (one / "keep").mkdir(parents=True)
    (one / "keep" / "a").write_text("a1")
    (one / "gone").mkdir()
    (one / "gone" / "x").write_text("x")
    (one / "temp.txt").write_text("temporary")
    (one / "a-target").write_text("shared")  # first by name: the tar's file, then a link
    os.link(one / "a-target", one / "b-link")
    # two: change a file, remove a directory (and a base file), remove a temp file
    two.mkdir()
    (two / "keep").mkdir()
    (two / "keep" / "a").write_text("a2")
    _whiteout(two / "gone")
    _whiteout(two / "temp.txt")
    _whiteout(two / "from-base")
    _whiteout(two / "a-target")
    # three: make the removed directory again, opaque over the earlier "keep"
    three.mkdir()
    (three / "gone").mkdir()
    (three / "gone" / "y").write_text("y")
    (three / "keep").mkdir()
    _opaque(three / "keep")
    (three / "keep" / "b").write_text("b3")
    return [one, two, three]


def test_later_layers_win_and_whiteouts_hide_earlier_content(
    tmp_path: Path, layers: list[Path]
) -> None:
    tar = _squash(tmp_path, layers)
    names = tar.getnames()
    assert names == sorted(names, key=lambda n: n.encode())
    assert "keep/a" not in names  # hidden by the opaque directory of layer three
    assert tar.extractfile("keep/b").read() == b"b3"  # type: ignore[union-attr]
    assert "keep/.wh..wh..opq" in names  # kept: it may hide base content too
    assert ".wh.from-base" in names  # a base file stays deleted
    assert ".wh.temp.txt" in names and "temp.txt" not in names
    # "gone" was removed, then made again: the new directory, opaque, without x.
    assert "gone/y" in names and "gone/x" not in names
    assert "gone/.wh..wh..opq" in names and ".wh.gone" not in names


def test_a_hardlink_whose_target_was_removed_keeps_its_content(
    tmp_path: Path, layers: list[Path]
) -> None:
    tar = _squash(tmp_path, layers)
    member = tar.getmember("b-link")
    assert member.isreg()
    assert tar.extractfile(member).read() == b"shared"  # type: ignore[union-attr]
    assert "a-target" not in tar.getnames()
