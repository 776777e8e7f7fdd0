"""Running a translated command line: dockbuild's own build, in this process.

A front end reads its tool's flags into a :class:`Plan` (a ``dockbuild build`` command
line, settings for the environment, what to write after the build), then :func:`run`
enters the user namespace a rootless build needs (re-running the front end there, not
dockbuild, so the work after the build is still done), and calls the CLI's ``main`` as
``dockbuild build`` would be called.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Plan:
    argv: list[str] = field(default_factory=list)  # dockbuild's command line: build ...
    # [registry."HOST"] settings for dockbuild's config file (mirrors, insecure).
    registries: dict[str, dict[str, Any]] = field(default_factory=dict)
    certificates: dict[str, str] = field(default_factory=dict)  # host -> CA file
    env: dict[str, str] = field(default_factory=dict)
    # Run before the build (a context to unpack) and after a successful one (digest files).
    before: list[Callable[[], None]] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)


def usage_error(program: str, message: str) -> int:
    print(f"{program}: error: {message}\nhint: see '{program} --help'", file=sys.stderr)
    return 2


def run(module: str, args: list[str], plan: Plan, notes: list[str]) -> int:
    """Build as ``plan`` says; the exit status (dockbuild's, or 1 if what comes after fails)."""
    from dockbuild.userns import reexec_module

    reexec_module(module, args)  # returns here when this process can build
    for note in notes:
        print(note, file=sys.stderr)
    from dockbuild.errors import DockbuildError

    try:
        for step in plan.before:
            step()
        os.environ.update(plan.env)
        if plan.registries:
            os.environ["DOCKBUILD_CONFIG"] = _config_with(plan.registries)
        if plan.certificates:
            certs = _certs_dir(plan.certificates)
            os.environ["DOCKBUILD_CERTS_D"] = ":".join(filter(None, [certs, os.environ.get("DOCKBUILD_CERTS_D")]))
    except DockbuildError as e:
        print(f"ERROR: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_status
    import gc

    # As dockbuild's own entry point does (dockbuild/__main__.py): collect rarely, and
    # never the start-up heap.
    gc.set_threshold(50_000, 20, 100)
    from dockbuild.cli import main

    gc.freeze()
    try:
        main(plan.argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code:
            return code
    try:
        for step in plan.after:
            step()
    except DockbuildError as e:
        print(f"ERROR: {e.message}", file=sys.stderr)
        return e.exit_status
    return 0


def script(main: Callable[[], int]) -> None:
    """A console script: ``main()``, then the end of dockbuild's own command (exit
    handlers and a flush, no teardown of the build's heap: tens of milliseconds of a
    cached build). A reader of stdout that went away (``| head``) ends it quietly."""
    from dockbuild.__main__ import _leave

    try:
        code = main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    _leave(code)


def scratch_dir(prefix: str) -> str:
    """A temporary directory, removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def _config_with(registries: dict[str, dict[str, Any]]) -> str:
    """A copy of the user's config.toml with these [registry."HOST"] settings merged in."""
    from dockbuild import config

    data = config.load()
    section = data.setdefault("registry", {})
    for host, settings in registries.items():
        section.setdefault(host, {}).update(settings)
    path = os.path.join(scratch_dir("dockbuild-config-"), "config.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_toml(data))
    return path


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML for what config files hold: tables, strings, numbers, booleans, lists of them."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ValueError(f"cannot write {v!r} to TOML")

    plain, arrays, tables = [], [], []
    for key, v in data.items():
        name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
        if isinstance(v, dict):
            tables.append(f"[{name}]\n" + _toml(v, name))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays += [f"[[{name}]]\n" + _toml(item, name) for item in v]
        else:
            plain.append(f"{json.dumps(key)} = {value(v)}\n")
    return "".join(plain + arrays + tables)


def _certs_dir(certificates: dict[str, str]) -> str:
    """A certs.d directory (HOST/ca.crt) for kaniko's --registry-certificate HOST=FILE."""
    from dockbuild.errors import UsageError

    root = scratch_dir("dockbuild-certs-")
    for host, path in certificates.items():
        if not os.path.isfile(path):
            raise UsageError(f"--registry-certificate {host}={path}: no such file")
        os.makedirs(os.path.join(root, host))
        os.symlink(os.path.abspath(path), os.path.join(root, host, "ca.crt"))
    return root
