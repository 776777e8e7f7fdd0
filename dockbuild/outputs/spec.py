"""``-o`` output specs as buildx reads them: types, keys, shortcuts, checked before a build.

Also what a spec says about the image it writes: its names and its annotations.
"""

from __future__ import annotations

import re

from dockbuild.errors import DockbuildError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

_TYPES = ("docker", "oci", "local", "tar", "image", "registry")
_IMAGE_KEYS = {
    "name",
    "push",
    "push-by-digest",
    "registry.insecure",
    "insecure",
    "oci-mediatypes",
    "compression",
    "compression-level",
    "force-compression",
    "rewrite-timestamp",
    "source-date-epoch",
    "name-canonical",
    "dangling-name-prefix",
    # BuildKit keys that have nothing to do here (no image store, no attestations): accepted.
    "unpack",
    "store",
    "oci-artifact",
    "attestation-inline",
    "prefer-nondist-layers",
    "compatibility-version",
    "buildinfo",
    "buildinfo-attrs",
    "context",
}
_KEYS = {
    "image": _IMAGE_KEYS,
    "registry": _IMAGE_KEYS,
    "docker": _IMAGE_KEYS | {"dest"},
    "oci": _IMAGE_KEYS | {"dest", "tar"},
    "local": {"dest", "platform-split", "mode", "attestation-prefix"},
    "tar": {"dest", "platform-split", "attestation-prefix"},
}
_BOOLS = {
    "push",
    "push-by-digest",
    "registry.insecure",
    "insecure",
    "oci-mediatypes",
    "force-compression",
    "rewrite-timestamp",
    "name-canonical",
    "tar",
    "unpack",
    "store",
    "platform-split",
}
# A pattern, compiled by re (and cached there) when first used: every build with an
# output loads this module, few name an annotation.
_ANNOTATION = (
    r"annotation(?:-(manifest|manifest-descriptor|index|index-descriptor))?"
    r"(?:\[([^\]]*)\])?\.(.+)"
)


class OutputSpec:
    """One output: its type, where it goes (``dest``), its other keys and the image names.

    A plain class, not a dataclass: every build with an output loads this module, and
    the dataclasses module costs a no-op rebuild more than the rest of its start-up;
    ``--push`` sets ``push=true`` in ``attrs`` after parsing."""

    __slots__ = ("type", "dest", "attrs", "names", "load")

    def __init__(
        self,
        kind: str,
        dest: str | None = None,  # None or "-" = stdout (docker, oci, tar)
        attrs: dict[str, str] | None = None,
        names: list[str] | None = None,
        load: bool = False,  # docker: `docker load` it rather than writing a file
    ) -> None:
        self.type = kind
        self.dest = dest
        self.attrs = {} if attrs is None else attrs
        self.names = [] if names is None else names
        self.load = load

    def __repr__(self) -> str:
        return f"OutputSpec({self.type!r}, {self.dest!r}, {self.attrs!r}, {self.names!r}, load={self.load!r})"

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.attrs.get(key)
        return default if value is None else _bool(value, key)

    @property
    def push(self) -> bool:
        return self.type in ("image", "registry") and self.flag("push", self.type == "registry")

    @property
    def writes_stdout(self) -> bool:
        return self.type in ("docker", "oci", "tar") and not self.load and self.dest in (None, "-")


def _bool(value: str, key: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("", "true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise DockbuildError(f"invalid output option {key}={value!r}: expected true or false")


def parse_outputs(
    raw: Sequence[str],
    *,
    tags: Sequence[str],
    stdout_is_tty: bool,
    push: bool = False,
    load: bool = False,
    multi_platform: bool = False,
) -> list[OutputSpec]:
    """``-o`` values as buildx reads them; none at all means a docker tarball on a pipe
    (an OCI tarball, holding an image index, when several platforms are built).

    ``--push`` is ``-o type=registry`` (or sets push=true on an image output already
    given); ``--load`` is a docker tarball fed to ``docker load``.
    """
    specs = []
    for text in raw:
        if text == "-":
            specs.append(OutputSpec("tar", "-"))
            continue
        if "=" not in text:
            specs.append(OutputSpec("local", text))
            continue
        attrs: dict[str, str] = {}
        for field_ in _split_csv(text):
            key, sep, value = field_.partition("=")
            if not sep:
                raise DockbuildError(f"invalid output {text!r}: {field_!r} is not KEY=VALUE")
            attrs[
                key.strip().lower() if not key.strip().startswith("annotation") else key.strip()
            ] = value
        kind = attrs.pop("type", "")
        if kind not in _TYPES:
            raise DockbuildError(
                f"invalid output {text!r}: unknown type {kind!r}",
                hint="use type=docker, oci, image, registry, local or tar",
            )
        for key, value in attrs.items():
            if key.startswith("annotation") and kind in ("image", "registry", "docker", "oci"):
                match = re.fullmatch(_ANNOTATION, key)
                if not match:
                    raise DockbuildError(f"invalid output {text!r}: bad annotation key {key!r}")
                if match.group(1) in ("index", "index-descriptor") and not multi_platform:
                    # BuildKit's image writer refuses them too: one platform, no index.
                    raise DockbuildError(
                        f"invalid output {text!r}: {key}: "
                        "index annotations not supported for single platform export",
                        hint="annotate the manifest (annotation.K=V) or its descriptor in "
                        "index.json (annotation-manifest-descriptor.K=V)",
                    )
                continue
            if key not in _KEYS[kind]:
                raise DockbuildError(
                    f"invalid output {text!r}: type={kind} has no option {key!r}",
                    hint="options: " + ", ".join(sorted(_KEYS[kind])),
                )
            if key in _BOOLS:
                _bool(value, key)
        dest = attrs.pop("dest", None)
        if kind == "local" and not dest:
            raise DockbuildError("type=local needs dest=DIRECTORY")
        names = [n.strip() for n in attrs.pop("name", "").split(",") if n.strip()]
        spec = OutputSpec(kind, dest, attrs, names or list(tags))
        _check_image_spec(spec)
        specs.append(spec)
    if push:
        image_specs = [s for s in specs if s.type in ("image", "registry")]
        if image_specs:
            for s in image_specs:
                s.attrs["push"] = "true"
        else:
            specs.append(OutputSpec("registry", names=list(tags)))
        if not tags and not any(s.names for s in specs if s.push):
            raise DockbuildError("--push needs an image name", hint="add -t NAME")
    if load:
        specs.append(OutputSpec("docker", names=list(tags), load=True))
    if not raw and not push and not load and not stdout_is_tty:
        specs.append(OutputSpec("oci" if multi_platform else "docker", "-", names=list(tags)))
    for s in specs:
        if s.push and not s.names:
            raise DockbuildError(
                f"type={s.type},push=true needs an image name", hint="add -t NAME or name=NAME"
            )
    to_stdout = [s for s in specs if s.writes_stdout]
    if len(to_stdout) > 1:
        raise DockbuildError("only one output can write to stdout")
    if to_stdout and stdout_is_tty:
        raise DockbuildError(
            f"refusing to write a {to_stdout[0].type} archive to a terminal",
            hint="redirect stdout or give dest=FILE",
        )
    return specs


def _check_image_spec(spec: OutputSpec) -> None:
    """Refuse bad values now, before the build runs."""
    from dockbuild.engine.compression import check_level
    from dockbuild.outputs.image import normalize_name

    if spec.type in ("local", "tar"):
        return
    compression = spec.attrs.get("compression", "gzip")
    if compression == "estargz":
        raise DockbuildError(
            "compression=estargz is not supported: dockbuild does not write eStargz "
            "(lazy-pulling) layers",
            hint="use gzip, zstd or uncompressed",
        )
    if compression not in ("gzip", "zstd", "uncompressed"):
        raise DockbuildError(
            f"unsupported compression {compression!r}", hint="use gzip, zstd or uncompressed"
        )
    level = spec.attrs.get("compression-level")
    if level is not None:
        if not level.strip().lstrip("-").isdigit():
            raise DockbuildError(f"invalid compression-level={level!r}: expected a number")
        try:
            check_level(compression, int(level))
        except ValueError as e:
            raise DockbuildError(str(e)) from None
    epoch = spec.attrs.get("source-date-epoch")
    if epoch is not None and not epoch.isdigit():
        raise DockbuildError(f"invalid source-date-epoch={epoch!r}: expected seconds since 1970")
    for name in spec.names:
        try:
            normalize_name(name)
        except ValueError as e:
            raise DockbuildError(str(e)) from None
    if spec.attrs.get("compression") == "zstd" and not spec.flag("oci-mediatypes", True):
        raise DockbuildError(
            "compression=zstd needs OCI media types", hint="drop oci-mediatypes=false"
        )


def _split_csv(text: str) -> list[str]:
    import csv

    return next(csv.reader([text]))


def image_names(spec: OutputSpec, manifest_digest: str) -> list[str]:
    """The image's names: ``name=``/``-t``, plus ``name@digest`` with name-canonical;
    without names, ``dangling-name-prefix@digest``."""
    from dockbuild.outputs.image import normalize_name

    names = [normalize_name(n) for n in spec.names]
    if not names and spec.attrs.get("dangling-name-prefix"):
        names = [f"{spec.attrs['dangling-name-prefix']}@{manifest_digest}"]
    if spec.flag("name-canonical"):
        names += [f"{_repository(n)}@{manifest_digest}" for n in names if "@" not in n]
    return names


def _repository(name: str) -> str:
    """``domain/path`` of a full name, without tag or digest."""
    name = name.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def image_annotations(spec: OutputSpec, platform: str) -> dict[str, dict[str, str]]:
    """``annotation.*`` and ``annotation-<type>[platform].*`` keys, by where they go
    (``index*`` ones only for several platforms: :func:`parse_outputs` refuses them for one)."""
    out: dict[str, dict[str, str]] = {
        "manifest": {},
        "manifest-descriptor": {},
        "index": {},
        "index-descriptor": {},
    }
    for key, value in spec.attrs.items():
        match = re.fullmatch(_ANNOTATION, key)
        if not match:
            continue
        where, plat, name = match.group(1) or "manifest", match.group(2), match.group(3)
        if plat and plat != platform:
            continue  # for a platform this build does not make
        out[where][name] = value
    return out
