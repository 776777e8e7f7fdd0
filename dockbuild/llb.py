"""The build graph (LLB): frozen ops shared by the frontend and the engine, nothing else.

An op names its inputs by holding them, so a graph is a tree of dataclasses whose shared
subtrees are the same objects (or equal ones: equal ops have equal digests and are solved
once). ``None`` as an input means the empty filesystem (``scratch``).

Each op's digest is a sha256 over a canonical JSON encoding of its definition and its
inputs' digests. Fields declared with ``metadata={"digest": False}`` (display names, cache
opt-outs) are left out, so they never change what a step means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from dockbuild.errors import Location

# A field that describes how to show or schedule an op, not what it computes.
_META = {"digest": False}


def _meta(default: Any = "") -> Any:
    return field(default=default, compare=False, hash=False, metadata=_META)


# A field that enters the digest only when set: ops that leave it at its default keep
# the digest they had before it existed (as protobuf leaves empty fields out).
_WHEN_SET = {"digest": "when set"}


class Op:
    """Base of every op: canonical JSON and digest."""

    def __repr__(self) -> str:
        # Ops print as their kind and digest (their definition can be long), from this one
        # method rather than one generated per op class at import, on every build's start.
        return f"<{type(self).__name__} {self.digest}>"

    def inputs(self) -> tuple[Op | None, ...]:
        """The ops this one reads, in a fixed order (``None`` = scratch)."""
        return ()

    def definition(self) -> dict[str, Any]:
        """This op alone, inputs replaced by their digests, metadata left out."""
        out: dict[str, Any] = {"op": type(self).__name__}
        # Every concrete op is a dataclass; the base class itself is not one.
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # see above
            if f.metadata.get("digest", True):
                value = getattr(self, f.name)
                if f.metadata.get("digest") == "when set" and value == f.default:
                    continue
                out[f.name] = _encode(value)
        return out

    @property
    def digest(self) -> str:
        cached = self.__dict__.get("_digest")
        if cached is None:
            blob = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
            cached = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
            object.__setattr__(self, "_digest", cached)
        return cached


def _encode(value: Any) -> Any:
    if isinstance(value, Op):
        return value.digest
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, bytes):
        return {"sha256": hashlib.sha256(value).hexdigest(), "len": len(value)}
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {"kind": type(value).__name__} | {
            f.name: _encode(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("digest", True)
        }
    raise TypeError(f"cannot encode {type(value).__name__} in an LLB op")


@dataclass(frozen=True, repr=False)
class SourceOp(Op):
    """A filesystem that comes from outside the graph.

    Identifiers, as in BuildKit:
    - ``docker-image://docker.io/library/busybox:latest@sha256:<manifest>`` (always pinned
      by the frontend's resolver);
    - ``oci-layout://<store>@sha256:<manifest>``, ``<store>`` being a named build context
      whose path the build request holds (so the digest never depends on a host path);
    - ``local://<name>`` (``context``, ``dockerfile`` or a named context), attrs
      ``exclude`` (the .dockerignore patterns, newline-joined).
    """

    identifier: str
    attrs: tuple[tuple[str, str], ...] = ()
    platform: str = "linux/amd64"
    name: str = _meta()

    def attr(self, key: str, default: str = "") -> str:
        return dict(self.attrs).get(key, default)


@dataclass(frozen=True)
class Mount:
    """A mount of an ExecOp. The first mount, at ``/``, is the rootfs."""

    target: str
    input: Op | None = None
    selector: str = ""  # a path inside ``input`` to mount instead of its root
    type: str = "bind"  # bind | cache | tmpfs | secret | ssh
    readonly: bool = False
    output: bool = False  # whether the changes under this mount are the op's result
    cache_id: str = ""
    sharing: str = "shared"  # shared | private | locked (cache mounts)
    secret_id: str = ""  # secret / ssh id
    required: bool = False
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None  # tmpfs bytes
    env: str = ""  # secret: also expose it as this environment variable


# The network modes a RUN step can have (--network, RUN --network).
NETWORK_MODES = ("default", "none", "host")


@dataclass(frozen=True, repr=False)
class ExecOp(Op):
    """Run a process on top of ``mounts[0].input``; the result is the changed rootfs."""

    mounts: tuple[Mount, ...]
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    user: str = ""  # "name[:group]" or "uid[:gid]", resolved in the rootfs; "" = root
    network: str = "default"  # one of NETWORK_MODES
    security: str = "sandbox"  # sandbox | insecure
    hostname: str = "buildkitsandbox"
    # --add-host entries ("name:ip") for /etc/hosts, and /dev/shm's size in bytes (0 =
    # 64 MiB): both part of the digest, as in BuildKit's ExecOp Meta.
    extra_hosts: tuple[str, ...] = field(default=(), metadata=_WHEN_SET)
    shm_size: int = field(default=0, metadata=_WHEN_SET)
    # The platform the process runs as, when it is not the build's own (a RUN of a
    # linux/arm64 stage built on amd64): part of the digest, so that a step never hits
    # the cache of the same command run for another platform; "" = the build platform.
    platform: str = field(default="", metadata=_WHEN_SET)
    # Proxy variables: in the process env but never in the digest or cache key.
    proxy_env: tuple[str, ...] = _meta(())
    name: str = _meta()
    ignore_cache: bool = _meta(False)
    location: Location | None = _meta(None)  # the Dockerfile lines, for errors

    def inputs(self) -> tuple[Op | None, ...]:
        # A cache mount reads its ``from`` state only to seed a new cache dir.
        return tuple(
            m.input
            for m in self.mounts
            if m.type == "bind" or (m.type == "cache" and m.input is not None)
        )

    @property
    def rootfs(self) -> Op | None:
        return self.mounts[0].input


@dataclass(frozen=True)
class Chown:
    """An owner for FileOp actions: by name (resolved in the destination) or by id."""

    user: str  # name or decimal id
    group: str = ""  # name or decimal id; "" = the user's primary group (or gid=uid)


@dataclass(frozen=True)
class Copy:
    """Copy ``src`` (a path or glob in ``source``) to ``dest`` in the op's base."""

    source: Op | None
    src: str
    dest: str
    chown: Chown | None = None
    mode: str = ""  # "" keeps modes; octal ("755") or symbolic ("u+x,go=r")
    follow_symlinks: bool = True  # for the source path itself, not below it
    dir_copy_contents: bool = True  # a directory source copies its contents
    allow_wildcard: bool = True
    allow_empty_wildcard: bool = False
    create_dest_path: bool = True
    exclude: tuple[str, ...] = ()
    parents: bool = False
    timestamp: int | None = None  # override mtimes (SOURCE_DATE_EPOCH), None keeps
    # ADD: extract a local tar archive (detected by content) into ``dest``.
    attempt_unpack: bool = False
    # COPY --parents: patterns below ``src`` whose matches keep their path from ``src``.
    include: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mkdir:
    path: str
    mode: int = 0o755
    make_parents: bool = True
    chown: Chown | None = None
    timestamp: int | None = None


@dataclass(frozen=True)
class Mkfile:
    path: str
    data: bytes
    mode: int = 0o644
    chown: Chown | None = None
    timestamp: int | None = None


@dataclass(frozen=True)
class Rm:
    path: str
    allow_not_found: bool = False
    allow_wildcard: bool = False


FileAction = Copy | Mkdir | Mkfile | Rm


@dataclass(frozen=True, repr=False)
class FileOp(Op):
    """Apply file actions, in order, on top of ``base``; the result is the new state."""

    base: Op | None
    actions: tuple[FileAction, ...]
    name: str = _meta()
    ignore_cache: bool = _meta(False)
    location: Location | None = _meta(None)

    def inputs(self) -> tuple[Op | None, ...]:
        sources = tuple(a.source for a in self.actions if isinstance(a, Copy))
        return (self.base, *sources)


@dataclass(frozen=True, repr=False)
class MergeOp(Op):
    """Stack independent states (layers of the later ones on top): COPY --link."""

    states: tuple[Op | None, ...]
    name: str = _meta()

    def inputs(self) -> tuple[Op | None, ...]:
        return self.states


def walk(root: Op | None) -> list[Op]:
    """Every op reachable from ``root``, inputs before the ops that read them, once each."""
    seen: set[str] = set()
    order: list[Op] = []

    def visit(op: Op | None) -> None:
        if op is None or op.digest in seen:
            return
        seen.add(op.digest)
        for dep in op.inputs():
            visit(dep)
        order.append(op)

    visit(root)
    return order


def to_json(root: Op | None) -> dict[str, Any]:
    """The graph as JSON: ops in dependency order with digests, and the root's digest."""
    ops = []
    for op in walk(root):
        entry = {"digest": op.digest, **op.definition()}
        name = getattr(op, "name", "")
        if name:
            entry["name"] = name
        ops.append(entry)
    return {"ops": ops, "root": root.digest if root is not None else None}
