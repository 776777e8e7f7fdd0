"""Every path the user gives, checked before any step runs: one line naming it and why not.

Outputs (``dest``), ``--iidfile``, ``--metadata-file``, ``--cache-to dest`` and ``--secret
src``. A destination's missing parent directories are made when it is written (see
:func:`dockbuild.atomic.output_file`), so a missing one is fine here as long as the
nearest existing ancestor is a directory dockbuild may write to.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dockbuild.atomic import Destination, destination
from dockbuild.errors import DockbuildError


def check_destinations(
    outputs: Sequence[Any],
    *,
    iidfile: str | None = None,
    metadata_file: str | None = None,
    cache_to: Iterable[Any] = (),
    secrets: Iterable[str] = (),
) -> None:
    """Raise a DockbuildError for the first path the build could not write (or read).

    ``outputs``: :class:`dockbuild.outputs.spec.OutputSpec`; ``cache_to``: cache specs
    (``type``, ``attrs``); ``secrets``: ``--secret`` values."""
    for spec in outputs:
        if spec.dest in (None, "-") or spec.load:
            continue
        flag = f"-o type={spec.type},dest={spec.dest}"
        if spec.type == "local" or (spec.type == "oci" and not spec.flag("tar", True)):
            _check_dir(flag, Path(spec.dest), beside=True, inside=spec.type == "local")
        else:
            _check_file(flag, Path(spec.dest))
    if iidfile:
        _check_file(f"--iidfile {iidfile}", Path(iidfile))
    if metadata_file:
        _check_file(f"--metadata-file {metadata_file}", Path(metadata_file))
    for cache in cache_to:
        if cache.type == "local":
            dest = cache.attrs["dest"]
            _check_dir(f"--cache-to dest={dest}", Path(dest), beside=False, inside=True)
    for value in secrets:
        _check_secret(value)


def _refuse(flag: str, reason: str) -> DockbuildError:
    return DockbuildError(f"{flag}: {reason}")


def _target(flag: str, dest: Path) -> Destination:
    try:
        return destination(dest)
    except OSError as e:
        raise _refuse(flag, (e.strerror or str(e)).lower()) from None


def _check_file(flag: str, dest: Path) -> None:
    where = _target(flag, dest)
    target, mode = where.path, where.mode
    if mode is None:
        _check_creatable(flag, target)
    elif stat.S_ISDIR(mode):
        raise _refuse(flag, f"{dest} is a directory")
    elif where.written_through:
        if not os.access(target, os.W_OK):
            raise _refuse(flag, f"{dest} is not writable")
    else:
        _check_writable_dir(flag, target.parent)  # the new file is renamed into it


def _check_dir(flag: str, dest: Path, *, beside: bool, inside: bool) -> None:
    """A directory output, written ``beside`` ``dest`` (a temp dir renamed into place)
    and/or ``inside`` an existing ``dest``."""
    where = _target(flag, dest)
    target, mode = where.path, where.mode
    if mode is None:
        _check_creatable(flag, target)
        return
    if not stat.S_ISDIR(mode):
        raise _refuse(flag, f"{dest} exists and is not a directory")
    if beside:
        _check_writable_dir(flag, target.absolute().parent)
    if inside:
        _check_writable_dir(flag, target)


def _check_creatable(flag: str, target: Path) -> None:
    """``target`` is missing: its nearest existing ancestor must be a writable directory."""
    ancestor = target.absolute().parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not os.path.isdir(ancestor):
        raise _refuse(flag, f"{_shown(ancestor, target)} is not a directory")
    _check_writable_dir(flag, ancestor, target)


def _check_writable_dir(flag: str, directory: Path, target: Path | None = None) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        shown = _shown(directory, target) if target is not None else directory
        raise _refuse(flag, f"directory {shown} is not writable")


def _shown(path: Path, target: Path) -> str:
    """``path`` as the user spelled it: relative when ``target`` was given relative."""
    if target.is_absolute():
        return str(path)
    return os.path.relpath(path) if path != Path.cwd() else "."


def _check_secret(value: str) -> None:
    from dockbuild.secrets import parse_secret

    secret = parse_secret(value)  # a missing file is its error: "secret ID: no file PATH"
    if secret.path is not None and not os.access(secret.path, os.R_OK):
        raise _refuse(f"--secret id={secret.id},src={secret.path}", "the file is not readable")
