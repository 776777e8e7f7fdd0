"""`RUN --mount` values: fields, aliases, defaults and the errors BuildKit gives."""

from __future__ import annotations

import pytest

from dockbuild.errors import DockerfileError
from dockbuild.frontend.mounts import MountFlag, parse_mount


def test_mount_defaults_to_a_read_only_bind() -> None:
    assert parse_mount("target=/src,from=build,source=/out") == MountFlag(
        type="bind", target="/src", from_="build", source="/out", read_only=True
    )
    assert parse_mount("target=/src,rw").read_only is False
    assert parse_mount("dst=/src,readwrite=true").read_only is False


def test_mount_keys_are_case_insensitive_and_aliases_work() -> None:
    mount = parse_mount("TYPE=secret,Src=token,Destination=/t,required,mode=0440,uid=1,gid=2")

    assert mount == MountFlag(
        type="secret", source="token", target="/t", required=True, mode=0o440, uid=1, gid=2
    )


def test_mount_tmpfs_size_is_parsed_in_bytes() -> None:
    assert parse_mount("type=tmpfs,target=/t,size=64m").size == 64 * 1024 * 1024


def test_mount_csv_quoting_allows_commas_in_values() -> None:
    assert parse_mount('type=bind,"source=a,b",target=/x').source == "a,b"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("type=volume,target=/x", 'unsupported mount type "volume"'),
        ("type=cahce,target=/x", r"did you mean cache\?"),
        ("type=cache,taget=/x", r"unexpected key 'taget' .*did you mean target\?"),
        ("type=bind,target=/x,mode=0755", "mode not allowed for 'bind' type mounts"),
        ("type=tmpfs,target=/x,uid=0", "uid not allowed for 'tmpfs' type mounts"),
        ("type=bind,target=/x,sharing=shared", "invalid cache sharing set for bind mount"),
        ("type=cache,target=/x,sharing=global", "unsupported sharing value 'global'"),
        ("type=bind,target=/x,required", "unexpected key 'required' for mount type 'bind'"),
        ("type=cache,target=/x,size=1m", "unexpected key 'size' for mount type 'cache'"),
        ("type=secret,id=a,from=b", "secret mount should not have a from"),
        ("type=secret,id=a,source=b", "both source and id can't be set"),
        ("type=secret", "one of source, target required"),
        ("type=cache,target", "invalid field 'target' must be a key=value pair"),
        ("type=cache,target=/x,mode=9", "invalid value 9 for mode"),
        ("type=cache,target=/x,ro=maybe", "invalid value for ro: maybe"),
        ("type=cache,from=$STAGE,target=/x", "doesn't support variable expansion"),
        ('type=cache,tar"get=/x', 'bare " in non-quoted-field'),
    ],
)
def test_mount_errors(spec: str, message: str) -> None:
    with pytest.raises(DockerfileError, match=message):
        parse_mount(spec)
