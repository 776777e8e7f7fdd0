"""``--secret`` and ``--ssh`` values, parsed and read the way buildx does.

A secret is named by an id and comes from a file or an environment variable; its bytes
are read only when a RUN step mounts it and go straight to the executor, so they never
reach a layer, the cache, the image config, the history or the progress output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dockbuild.errors import DockbuildError

# BuildKit refuses secrets larger than this (session/secrets: MaxSecretSize).
MAX_SECRET_SIZE = 500 * 1024


@dataclass(frozen=True)
class SecretSource:
    """Where the secret ``id`` comes from: exactly one of ``path`` and ``env``."""

    id: str
    path: str | None = None
    env: str | None = None

    def read(self) -> bytes:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise DockbuildError(
                    f"secret {self.id}: environment variable {self.env} is not set"
                )
            data = value.encode()
        else:
            assert self.path is not None
            try:
                with open(self.path, "rb") as f:
                    data = f.read(MAX_SECRET_SIZE + 1)
            except OSError as e:
                raise DockbuildError(
                    f"secret {self.id}: cannot read {self.path}: {e.strerror}"
                ) from None
        if len(data) > MAX_SECRET_SIZE:
            raise DockbuildError(f"secret {self.id} is larger than {MAX_SECRET_SIZE} bytes")
        return data


def parse_secret(value: str) -> SecretSource:
    """``[type=file|env,]id=ID[,src|source=PATH][,env=VAR]`` (buildx's --secret).

    Without an id, the id is the base name of ``src`` (or the name of ``env``). Without a
    source, as buildx does: an environment variable named ID if one is set,
    else a file named ID.
    """
    kind = ""
    sid = ""
    path: str | None = None
    env: str | None = None
    for field in _csv(value):
        key, sep, val = field.partition("=")
        key = key.strip().lower()
        if not sep:
            raise DockbuildError(f"invalid --secret {value!r}: field {field!r} must be KEY=VALUE")
        if key == "type":
            if val not in ("file", "env"):
                raise DockbuildError(
                    f"invalid --secret {value!r}: unsupported type {val!r} (file or env)"
                )
            kind = val
        elif key == "id":
            sid = val
        elif key in ("source", "src"):
            path = val
        elif key == "env":
            env = val
        else:
            raise DockbuildError(f"invalid --secret {value!r}: unexpected key {key!r}")
    if not sid:  # buildx: the id is the file's base name, or the variable's name
        sid = os.path.basename(path.rstrip("/")) if path else env or ""
    if not sid:
        raise DockbuildError(
            f"invalid --secret {value!r}: id is required", hint="--secret id=NAME,src=FILE"
        )
    if kind == "env" and env is None:
        env, path = path or sid, None
    if kind == "file" and path is None:
        path = sid
    if path is None and env is None:
        if sid in os.environ:
            env = sid
        else:
            path = sid
    if path is not None and env is not None:
        raise DockbuildError(f"invalid --secret {value!r}: give either src or env, not both")
    if path is not None and not os.path.isfile(path):
        raise DockbuildError(
            f"secret {sid}: no file {path}"
            + (
                ""
                if kind or "src=" in value or "source=" in value
                else f" and no environment variable {sid}"
            ),
            hint="--secret id=NAME,src=FILE or --secret id=NAME,env=VARIABLE",
        )
    return SecretSource(sid, path, env)


@dataclass(frozen=True)
class SSHSource:
    """An ``--ssh`` id and its agent sockets or key files (none: $SSH_AUTH_SOCK)."""

    id: str
    paths: tuple[str, ...] = ()


def parse_ssh(value: str) -> SSHSource:
    """``default``, ``ID=PATH[,PATH...]`` (buildx's --ssh): PATHs are agent sockets or keys."""
    sid, sep, rest = value.partition("=")
    sid = sid.strip()
    if not sid:
        raise DockbuildError(f"invalid --ssh {value!r}", hint="--ssh default or --ssh ID=PATH")
    paths = tuple(p for p in rest.split(",") if p) if sep else ()
    for path in paths:
        if not os.path.exists(path):
            raise DockbuildError(f"--ssh {sid}: {path} does not exist")
    if not paths and not os.environ.get("SSH_AUTH_SOCK"):
        raise DockbuildError(
            f"--ssh {sid}: SSH_AUTH_SOCK is not set",
            hint="start an agent (eval $(ssh-agent); ssh-add) or pass --ssh ID=PATH",
        )
    return SSHSource(sid, paths)


def _csv(text: str) -> list[str]:
    import csv

    try:
        rows = list(csv.reader([text]))
    except csv.Error as e:
        raise DockbuildError(f"invalid value {text!r}: {e}") from None
    return [f for f in (rows[0] if rows else []) if f]
