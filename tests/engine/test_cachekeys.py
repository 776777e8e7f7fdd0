"""Cache keys: what a step's key is made of, and what must never enter it."""

from __future__ import annotations

from pathlib import Path

from dockbuild import llb
from dockbuild.engine.cachekeys import CacheKeys
from dockbuild.engine.mounts import CacheMounts
from dockbuild.engine.sources.local import LocalDir
from dockbuild.engine.store import Store

CONTEXT = llb.SourceOp("local://context")


def context(
    tmp_path: Path, files: dict[str, str], excludes: tuple[str, ...] = ()
) -> dict[str, LocalDir]:
    root = tmp_path / "ctx"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return {"context": LocalDir(root, excludes)}


def key(op: llb.Op, locals_: dict[str, LocalDir] | None = None, **secrets: str) -> str:
    """The key a fresh build computes (a context is read once per build)."""
    if locals_ is not None:
        locals_ = {name: LocalDir(local.path, local.excludes) for name, local in locals_.items()}
    keys = CacheKeys(locals_ or {})
    keys.secrets = dict(secrets)
    return keys.key(op)


def run(base: llb.Op | None, command: str, *mounts: llb.Mount, **fields: object) -> llb.ExecOp:
    return llb.ExecOp(
        mounts=(llb.Mount("/", base, output=True), *mounts),
        args=("/bin/sh", "-c", command),
        **fields,
    )  # type: ignore[arg-type]  # fields: the ExecOp keywords each test varies


def copy(base: llb.Op | None, src: str, **fields: object) -> llb.FileOp:
    return llb.FileOp(base, (llb.Copy(CONTEXT, src, "/app/", **fields),))  # type: ignore[arg-type]  # as above


BASE = llb.FileOp(None, (llb.Mkfile("/etc/base", b"base"),))


def test_the_command_env_and_user_are_in_the_key() -> None:
    plain = key(run(BASE, "make"))
    assert key(run(BASE, "make")) == plain
    assert key(run(BASE, "make test")) != plain
    assert key(run(BASE, "make", env=("CC=clang",))) != plain
    assert key(run(BASE, "make", user="1000")) != plain


def test_a_changed_input_changes_the_keys_of_every_step_on_it() -> None:
    other_base = llb.FileOp(None, (llb.Mkfile("/etc/base", b"changed"),))
    assert key(run(other_base, "make")) != key(run(BASE, "make"))
    two_steps = run(run(BASE, "configure"), "make")
    assert key(run(run(other_base, "configure"), "make")) != key(two_steps)
    bind = llb.Mount("/src", BASE, readonly=True)
    other_bind = llb.Mount("/src", other_base, readonly=True)
    assert key(run(None, "make", bind)) != key(run(None, "make", other_bind))


def test_display_names_and_proxy_variables_are_not_in_the_key() -> None:
    plain = key(run(BASE, "make"))
    assert key(run(BASE, "make", name="[2/3] RUN make")) == plain
    assert key(run(BASE, "make", proxy_env=("HTTP_PROXY=http://proxy:3128",))) == plain


def test_a_copy_is_keyed_by_the_content_of_the_files_it_selects(tmp_path: Path) -> None:
    locals_ = context(tmp_path, {"app.py": "print(1)\n", "README": "docs\n"})
    step = copy(BASE, "app.py")
    before = key(step, locals_)
    (tmp_path / "ctx" / "README").write_text("other docs\n")  # not selected
    assert key(step, locals_) == before
    (tmp_path / "ctx" / "app.py").write_text("print(2)\n")
    assert key(step, locals_) != before
    (tmp_path / "ctx" / "app.py").chmod(0o755)
    assert len({before, key(step, locals_), key(copy(BASE, "README"), locals_)}) == 3


def test_files_the_dockerignore_excludes_do_not_change_a_copys_key(tmp_path: Path) -> None:
    locals_ = context(
        tmp_path, {"src/main.c": "int main;\n", "src/main.o": "obj"}, excludes=("**/*.o",)
    )
    step = copy(BASE, "src")
    before = key(step, locals_)
    (tmp_path / "ctx" / "src" / "main.o").write_text("rebuilt obj")
    assert key(step, locals_) == before
    (tmp_path / "ctx" / "src" / "main.c").write_text("int main(void);\n")
    assert key(step, locals_) != before


def test_secret_values_never_enter_the_key() -> None:
    secret = llb.Mount("/run/secrets/token", type="secret", secret_id="token")
    step = run(BASE, "cat /run/secrets/token", secret)
    assert key(step, token="s3cr3t-one") == key(step, token="s3cr3t-two") == key(step)
    assert "s3cr3t" not in repr(step.definition())


def test_cache_mount_contents_never_enter_the_key(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    try:
        cache = llb.Mount("/root/.cache", type="cache", cache_id="pip")
        step = run(BASE, "pip install -r requirements.txt", cache)
        before = CacheKeys({}, store).key(step)
        with CacheMounts(store.root).use(
            "pip", "", "shared", None, None, None, None, lambda: False
        ) as path:
            (path / "wheel.whl").write_bytes(b"a cached download")
        assert CacheKeys({}, store).key(step) == before
        # The mount itself is part of what the step means: its id is in the key.
        other = run(
            BASE,
            "pip install -r requirements.txt",
            llb.Mount("/root/.cache", type="cache", cache_id="npm"),
        )
        assert CacheKeys({}, store).key(other) != before
    finally:
        store.close()


def test_scratch_has_a_fixed_key() -> None:
    assert CacheKeys({}).key(None) == "scratch"
