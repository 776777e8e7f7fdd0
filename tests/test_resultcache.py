"""The result record's code stamp: what makes a new dockbuild miss the old results."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import dockbuild.resultcache


def _load_copy(package: Path) -> ModuleType:
    """dockbuild/resultcache.py as it would run from ``package`` (a copy of it there)."""
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '0.1.0'\n")
    shutil.copy(dockbuild.resultcache.__file__, package / "resultcache.py")
    spec = importlib.util.spec_from_file_location("copied_resultcache", package / "resultcache.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_editable_checkout_with_an_edited_source_file_gets_another_stamp(tmp_path: Path) -> None:
    module = _load_copy(tmp_path / "checkout" / "dockbuild")
    (tmp_path / "checkout" / "dockbuild" / "sub").mkdir()
    source = tmp_path / "checkout" / "dockbuild" / "sub" / "llb.py"
    source.write_text("A = 1\n")
    first = module.code_stamp()
    assert module.code_stamp() == first
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert module.code_stamp() != first
    (tmp_path / "checkout" / "dockbuild" / "sub" / "__pycache__").mkdir()
    second = module.code_stamp()
    (tmp_path / "checkout" / "dockbuild" / "sub" / "__pycache__" / "llb.cpython-311.pyc").write_bytes(b"x")
    assert module.code_stamp() == second  # bytecode is not code the user changed


def test_an_installed_package_installed_again_gets_another_stamp(tmp_path: Path) -> None:
    package = tmp_path / "lib" / "site-packages" / "dockbuild"
    module = _load_copy(package)
    first = module.code_stamp()
    assert str(package) in first
    init = package / "__init__.py"
    before = init.stat()
    init.unlink()
    init.write_text("__version__ = '0.1.0'\n")  # as an installer writes it: a new file,
    os.utime(init, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # written later
    assert module.code_stamp() != first
