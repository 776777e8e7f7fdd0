"""-o parsing as buildx reads it: types, keys, --push / --load shortcuts, stdout rules."""

from __future__ import annotations

import pytest

from dockbuild.errors import DockbuildError
from dockbuild.outputs.export import source_date_epoch
from dockbuild.outputs.spec import OutputSpec, image_names, parse_outputs


def parse(*raw: str, tags: tuple[str, ...] = (), **kw: bool) -> list[OutputSpec]:
    return parse_outputs(list(raw), tags=list(tags), stdout_is_tty=False, **kw)


def test_registry_is_image_with_push_and_takes_a_quoted_name_list() -> None:
    (spec,) = parse('type=registry,"name=reg.io/a:1,reg.io/b:2",compression=zstd')
    assert spec.push and spec.names == ["reg.io/a:1", "reg.io/b:2"]
    assert spec.attrs["compression"] == "zstd"
    (image,) = parse("type=image,name=x")
    assert not image.push
    (pushed,) = parse("type=image,name=x,push=true")
    assert pushed.push


def test_push_shortcut_adds_a_registry_output_or_sets_push_on_an_image_one() -> None:
    (spec,) = parse(tags=("reg.io/a:1",), push=True)
    assert spec.type == "registry" and spec.names == ["reg.io/a:1"]
    specs = parse("type=image,name=reg.io/b:1", "type=oci,dest=o.tar", push=True)
    assert [s.push for s in specs] == [True, False]
    with pytest.raises(DockbuildError, match="--push needs an image name"):
        parse(push=True)


def test_load_shortcut_is_a_docker_output_that_does_not_use_stdout() -> None:
    specs = parse("-", tags=("app:1",), load=True)
    assert [(s.type, s.load, s.writes_stdout) for s in specs] == [
        ("tar", False, True),
        ("docker", True, False),
    ]


def test_no_output_on_a_pipe_is_a_docker_tarball_unless_push_or_load() -> None:
    assert [s.type for s in parse()] == ["docker"]
    assert [s.type for s in parse(tags=("r.io/a",), push=True)] == ["registry"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("type=bogus", "unknown type 'bogus'"),
        ("type=oci,dest=x,push-by-digest=maybe", "expected true or false"),
        ("type=local", "needs dest"),
        ("type=tar,compression=gzip", "has no option 'compression'"),
        ("type=oci,annotation-weird.x=1", "bad annotation key"),
        ("type=oci,source-date-epoch=soon", "invalid source-date-epoch"),
        ("type=image,push=true", "needs an image name"),
    ],
)
def test_bad_outputs_are_refused_with_a_reason(raw: str, message: str) -> None:
    with pytest.raises(DockbuildError, match=message):
        parse(raw)


def test_two_outputs_on_stdout_are_refused() -> None:
    with pytest.raises(DockbuildError, match="only one output"):
        parse("type=oci", "type=docker")


def test_canonical_and_danglingimage_names() -> None:
    digest = "sha256:" + "ab" * 32
    (spec,) = parse("type=image,name=reg.io:5000/team/app:1,name-canonical=true")
    assert image_names(spec, digest) == ["reg.io:5000/team/app:1", f"reg.io:5000/team/app@{digest}"]
    (dangling,) = parse("type=oci,dest=x,dangling-name-prefix=reg.io/tmp")
    assert image_names(dangling, digest) == [f"reg.io/tmp@{digest}"]


def test_source_date_epoch_comes_from_the_build_arg_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "100")
    assert source_date_epoch({}) == 100
    assert source_date_epoch({"SOURCE_DATE_EPOCH": "200"}) == 200
    assert source_date_epoch({"SOURCE_DATE_EPOCH": None}) == 100  # `--build-arg NAME`
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert source_date_epoch({}) is None
    with pytest.raises(DockbuildError, match="invalid SOURCE_DATE_EPOCH"):
        source_date_epoch({"SOURCE_DATE_EPOCH": "1.5"})
