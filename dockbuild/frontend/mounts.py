"""`RUN --mount` flags: the CSV `key=value` fields parsed and checked as BuildKit's
commands_runmount.go does. Lowering a mount to an LLB mount is RUN's job (convert_run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dockbuild.errors import DockerfileError
from dockbuild.frontend.goformat import go_quote, parse_go_bool, parse_ram_in_bytes, parse_uint32
from dockbuild.frontend.suggest import with_suggestion

MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
_SHARING_MODES = ("shared", "private", "locked")
_MOUNT_KEYS = (
    "type", "from", "source", "target", "readonly", "id", "sharing", "required", "size",
    "mode", "uid", "gid", "src", "dst", "destination", "ro", "rw", "readwrite", "env",
)  # fmt: skip


@dataclass
class MountFlag:
    """One `RUN --mount` as written in the Dockerfile. String fields are raw words.

    When parsed without an expander (as `parse_instruction` does), values that need
    expansion (they contain `$`, a quote or a backslash) are kept as written and not yet
    checked, and `deferred` is True; `parse_mount(text, expand)` gives the final form.
    Defaults that depend on other mounts (secret target, ssh id/target, cache id) are
    left empty for the conversion step to fill, as BuildKit does.
    """

    type: str = "bind"
    from_: str = ""
    source: str = ""
    target: str = ""
    read_only: bool = True
    id: str = ""
    sharing: str = ""
    required: bool = False
    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    env: str | None = None
    deferred: bool = False


class MountFlagError(ValueError):
    """A `--mount` value BuildKit would refuse; the message names the field."""


def parse_mount(text: str, expand: Callable[[str], str] | None = None) -> MountFlag:
    """Parse one `--mount` value (CSV `key=value` fields) into a MountFlag.

    With `expand` (a word expander with the step's ARG/ENV scope) every value is expanded
    first and all rules are checked. Without it, values that need expansion are kept raw
    and unchecked (`deferred`), the rest are checked now. Raises DockerfileError (without
    a location: the caller knows the instruction).
    """
    try:
        return parse_mount_fields(text, expand)
    except MountFlagError as err:
        raise DockerfileError(f"--mount={text}: {err}") from None


def parse_mount_fields(text: str, expand: Callable[[str], str] | None) -> MountFlag:
    """`parse_mount`, raising MountFlagError with the bare reason."""
    mount = MountFlag()
    read_only_auto = True
    deferred = False
    for item in _csv_fields(text):
        key, has_value, value = item.partition("=")
        key = key.lower()
        if not has_value:
            if key in ("readonly", "ro"):
                mount.read_only, read_only_auto = True, False
            elif key in ("readwrite", "rw"):
                mount.read_only, read_only_auto = False, False
            elif key == "required":
                _require_type(mount, key, ("secret", "ssh"))
                mount.required = True
            else:
                raise MountFlagError(f"invalid field {item!r} must be a key=value pair")
            continue
        if key == "from" and _needs_expansion_dollar(value):
            raise MountFlagError(
                "'from' doesn't support variable expansion, define alias stage instead"
            )
        if expand is not None:
            value = expand(value)
        elif _needs_expansion(value):
            # Kept as written; type-dependent checks wait for the expanded form.
            deferred = True
            _set_raw(mount, key, value, item)
            continue
        if key in ("readonly", "ro", "readwrite", "rw"):
            read_only_auto = False
        _set_field(mount, key, value, item)
    if deferred:
        mount.deferred = True
        return mount
    if mount.type not in ("secret", "ssh", "cache"):
        for name, number in (("mode", mount.mode), ("uid", mount.uid), ("gid", mount.gid)):
            if number is not None:
                raise MountFlagError(f"{name} not allowed for {mount.type!r} type mounts")
    if read_only_auto:
        mount.read_only = mount.type not in ("cache", "tmpfs")
    if mount.sharing and mount.type != "cache":
        raise MountFlagError(f"invalid cache sharing set for {mount.type} mount")
    if mount.type == "secret":
        if mount.from_:
            raise MountFlagError("secret mount should not have a from")
        if not (mount.source or mount.target or mount.id):
            raise MountFlagError("invalid secret mount. one of source, target required")
        if mount.source and mount.id:
            raise MountFlagError("both source and id can't be set")
    return mount


def _needs_expansion(value: str) -> bool:
    return any(ch in value for ch in "$'\"\\")


def _needs_expansion_dollar(value: str) -> bool:
    # A `$` at the very end expands to itself, so only an earlier one is a variable.
    index = value.find("$")
    return index != -1 and index != len(value) - 1


def _require_type(mount: MountFlag, key: str, types: tuple[str, ...]) -> None:
    if mount.type not in types:
        raise MountFlagError(f"unexpected key {key!r} for mount type {mount.type!r}")


# The keys whose value is a plain string field, by the field they set.
_RAW_FIELDS = {
    "type": "type",
    "from": "from_",
    "source": "source",
    "src": "source",
    "target": "target",
    "dst": "target",
    "destination": "target",
    "id": "id",
    "sharing": "sharing",
    "env": "env",
}


def _set_raw(mount: MountFlag, key: str, value: str, item: str) -> None:
    target = _RAW_FIELDS.get(key)
    if target is None and key not in _MOUNT_KEYS:
        raise MountFlagError(
            with_suggestion(f"unexpected key {key!r} in {item!r}", key, _MOUNT_KEYS)
        )
    if target:
        setattr(mount, target, value)


def _set_field(mount: MountFlag, key: str, value: str, item: str) -> None:
    if key == "type":
        lowered = value.lower()
        if lowered not in MOUNT_TYPES:
            raise MountFlagError(
                with_suggestion(f"unsupported mount type {go_quote(value)}", value, MOUNT_TYPES)
            )
        mount.type = lowered
    elif key in ("readonly", "ro", "readwrite", "rw"):
        flag = parse_go_bool(value)
        if flag is None:
            raise MountFlagError(f"invalid value for {key}: {value}")
        mount.read_only = flag if key in ("readonly", "ro") else not flag
    elif key == "required":
        _require_type(mount, key, ("secret", "ssh"))
        flag = parse_go_bool(value)
        if flag is None:
            raise MountFlagError(f"invalid value for {key}: {value}")
        mount.required = flag
    elif key == "size":
        _require_type(mount, key, ("tmpfs",))
        size = parse_ram_in_bytes(value)
        if size is None:
            raise MountFlagError(f"invalid value for {key}: {value}")
        mount.size = size
    elif key == "sharing":
        if mount.type != "cache":
            raise MountFlagError(f"invalid cache sharing set for {mount.type} mount")
        if value.lower() not in _SHARING_MODES:
            raise MountFlagError(
                f"unsupported sharing value {value!r} (expected shared, private or locked)"
            )
        mount.sharing = value.lower()
    elif key in ("mode", "uid", "gid"):
        number = parse_uint32(value, 8 if key == "mode" else 10)
        if number is None:
            raise MountFlagError(f"invalid value {value} for {key}")
        setattr(mount, key, number)
    else:
        target = _RAW_FIELDS.get(key)
        if target is None:
            raise MountFlagError(
                with_suggestion(f"unexpected key {key!r} in {item!r}", key, _MOUNT_KEYS)
            )
        setattr(mount, target, value)


def _csv_fields(text: str) -> list[str]:
    """One CSV record as Go's encoding/csv reads it (quotes only around whole fields)."""
    if '"' not in text:
        return text.split(",")  # no quoting: the common case
    fields: list[str] = []
    index = 0
    length = len(text)
    while True:
        if index < length and text[index] == '"':
            index += 1
            value = ""
            while True:
                end = text.find('"', index)
                if end < 0:
                    raise MountFlagError(f'extraneous or missing " in quoted-field: {text}')
                value += text[index:end]
                index = end + 1
                if index < length and text[index] == '"':
                    value += '"'
                    index += 1
                    continue
                break
            if index < length and text[index] != ",":
                raise MountFlagError(f'extraneous or missing " in quoted-field: {text}')
        else:
            end = text.find(",", index)
            end = length if end < 0 else end
            value = text[index:end]
            if '"' in value:
                raise MountFlagError(f'bare " in non-quoted-field: {text}')
            index = end
        fields.append(value)
        if index >= length:
            return fields
        index += 1  # the comma
