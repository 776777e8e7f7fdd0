"""The typed instructions of a Dockerfile (BuildKit's instructions/commands.go).

Every string field is a raw, unexpanded word unless its docstring says
otherwise: variable expansion happens later (`shell`), with the ARG/ENV scope that only
the conversion step knows, just as BuildKit expands after parsing.

The instructions are plain dataclasses, not frozen ones: nothing changes them after
parsing, and a big Dockerfile makes thousands of them (a frozen dataclass sets each field
through object.__setattr__, about three times the cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import ClassVar

from dockbuild.errors import Location
from dockbuild.frontend.mounts import MountFlag
from dockbuild.frontend.parser import chomp_heredoc_content

# --- base and shared types -------------------------------------------------------------


@dataclass(kw_only=True, repr=False, eq=False)
class Instruction:
    """Fields every instruction has: where it is and its text (the joined logical line)."""

    keyword: ClassVar[str] = ""
    # The stages, named contexts or images the instruction reads (COPY --from, RUN
    # --mount from=), raw; the two that have any override this.
    from_refs: ClassVar[tuple[str, ...]] = ()
    location: Location
    original: str

    def __repr__(self) -> str:
        # One for every instruction class, rather than one generated per class: each
        # generated method is compiled at import, which is part of every build's start.
        # (Instructions compare by identity: nothing compares two of them.)
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclass_fields(self))
        return f"{type(self).__name__}({fields})"


@dataclass
class InlineFile:
    """A RUN heredoc: `name` is the delimiter, `data` the raw body (tabs not yet stripped
    when `chomp`; see `chomped_data`)."""

    name: str
    data: str
    chomp: bool = False
    expand: bool = True
    file_descriptor: int = 0

    @property
    def chomped_data(self) -> str:
        """The body as the command sees it (leading tabs removed for `<<-`)."""
        return chomp_heredoc_content(self.data) if self.chomp else self.data


@dataclass
class HeredocSource:
    """A COPY/ADD heredoc source: written as file `path` (the delimiter word) with `data`
    (already tab-stripped for `<<-`; raw words, expanded later only if `expand`)."""

    path: str
    data: str
    expand: bool = True


# --- the instructions ------------------------------------------------------------------


@dataclass(kw_only=True, repr=False, eq=False)
class FromCommand(Instruction):
    """FROM [--platform=P] base [AS name]. `base_name` and `platform` are raw words (expanded
    later with global ARGs only); `stage_name` is lower-cased, "" when unnamed."""

    keyword: ClassVar[str] = "from"
    base_name: str
    stage_name: str = ""
    platform: str = ""
    comment: str = ""


@dataclass(kw_only=True, repr=False, eq=False)
class RunCommand(Instruction):
    """RUN. `cmd_line` holds one raw string for the shell form (`prepend_shell` True) or
    the JSON array items for the exec form. `files` are the heredocs. `mounts` are parsed
    `--mount` flags and `mount_specs` their raw CSV text (re-parse with `parse_mount` and an
    expander at conversion time). `network` is default|none|host, `security` sandbox|insecure.
    """

    keyword: ClassVar[str] = "run"
    cmd_line: tuple[str, ...]
    prepend_shell: bool
    files: tuple[InlineFile, ...] = ()
    mounts: tuple[MountFlag, ...] = ()
    mount_specs: tuple[str, ...] = ()
    network: str = "default"
    security: str = "sandbox"
    flags_used: tuple[str, ...] = ()

    # The heredoc when the whole command is one (`RUN <<EOF`), as BuildKit's
    # MustParseHeredoc(CmdLine[0]) finds it: its body is run as the command (or as a file,
    # with a shebang) instead of being part of a reconstituted script.
    single_heredoc: InlineFile | None = None

    # A property over the base class attribute, which is a plain class value so that the
    # instructions without references read it without a call.
    @property
    def from_refs(self) -> tuple[str, ...]:  # type: ignore[override]  # see above
        return tuple(m.from_ for m in self.mounts if m.from_) if self.mounts else ()


@dataclass(kw_only=True, repr=False, eq=False)
class CmdCommand(Instruction):
    """CMD: `cmd_line` is one raw string (shell form, `prepend_shell`) or the JSON items."""

    keyword: ClassVar[str] = "cmd"
    cmd_line: tuple[str, ...]
    prepend_shell: bool


@dataclass(kw_only=True, repr=False, eq=False)
class EntrypointCommand(Instruction):
    """ENTRYPOINT: like CMD; an empty `cmd_line` (`ENTRYPOINT []`) clears the entrypoint."""

    keyword: ClassVar[str] = "entrypoint"
    cmd_line: tuple[str, ...]
    prepend_shell: bool


@dataclass(kw_only=True, repr=False, eq=False)
class _CopyLike(Instruction):
    sources: tuple[str, ...]
    dest: str
    heredoc_sources: tuple[HeredocSource, ...] = ()
    chown: str = ""
    chmod: str = ""
    link: bool = False
    exclude: tuple[str, ...] = ()


@dataclass(kw_only=True, repr=False, eq=False)
class CopyCommand(_CopyLike):
    """COPY. `sources` (paths), `dest`, `from_`, `chown`, `chmod`, `exclude` are raw words;
    heredoc sources are in `heredoc_sources` (in their own order, after the paths)."""

    keyword: ClassVar[str] = "copy"
    from_: str = ""
    parents: bool = False

    # A property over the base class attribute, which is a plain class value so that the
    # instructions without references read it without a call.
    @property
    def from_refs(self) -> tuple[str, ...]:  # type: ignore[override]  # see above
        return (self.from_,) if self.from_ else ()


@dataclass(kw_only=True, repr=False, eq=False)
class AddCommand(_CopyLike):
    """ADD. Like COPY plus `checksum` (raw), `keep_git_dir` and `unpack` (None when the flag
    was not given, so the conversion step can apply the source-dependent default)."""

    keyword: ClassVar[str] = "add"
    checksum: str = ""
    keep_git_dir: bool | None = None
    unpack: bool | None = None


@dataclass(kw_only=True, repr=False, eq=False)
class EnvCommand(Instruction):
    """ENV: ordered raw (key, value) pairs; `legacy` when the `ENV k v` form was used."""

    keyword: ClassVar[str] = "env"
    env: tuple[tuple[str, str], ...]
    legacy: bool = False


@dataclass(kw_only=True, repr=False, eq=False)
class LabelCommand(Instruction):
    """LABEL: ordered raw (key, value) pairs; `legacy` for the `LABEL k v` form."""

    keyword: ClassVar[str] = "label"
    labels: tuple[tuple[str, str], ...]
    legacy: bool = False


@dataclass(kw_only=True, repr=False, eq=False)
class ArgCommand(Instruction):
    """ARG: raw (name, default) pairs; default None when the ARG has no `=`. `comments`
    holds the doc comment (`# NAME text`) found for each name, or ""."""

    keyword: ClassVar[str] = "arg"
    args: tuple[tuple[str, str | None], ...]
    comments: tuple[str, ...] = ()


@dataclass(kw_only=True, repr=False, eq=False)
class WorkdirCommand(Instruction):
    """WORKDIR: `path` is a raw word."""

    keyword: ClassVar[str] = "workdir"
    path: str


@dataclass(kw_only=True, repr=False, eq=False)
class UserCommand(Instruction):
    """USER: `user` is a raw word (`name[:group]`)."""

    keyword: ClassVar[str] = "user"
    user: str


@dataclass(kw_only=True, repr=False, eq=False)
class ShellCommand(Instruction):
    """SHELL: the JSON array items (never expanded)."""

    keyword: ClassVar[str] = "shell"
    shell: tuple[str, ...]


@dataclass(kw_only=True, repr=False, eq=False)
class ExposeCommand(Instruction):
    """EXPOSE: raw port words (`80`, `53/udp`, `8000-8010`), expanded later."""

    keyword: ClassVar[str] = "expose"
    ports: tuple[str, ...]


@dataclass(kw_only=True, repr=False, eq=False)
class VolumeCommand(Instruction):
    """VOLUME: raw path words (surrounding white space trimmed)."""

    keyword: ClassVar[str] = "volume"
    volumes: tuple[str, ...]


@dataclass(kw_only=True, repr=False, eq=False)
class StopSignalCommand(Instruction):
    """STOPSIGNAL: `signal` is a raw word (name or number)."""

    keyword: ClassVar[str] = "stopsignal"
    signal: str


@dataclass(kw_only=True, repr=False, eq=False)
class HealthcheckCommand(Instruction):
    """HEALTHCHECK. `test` is the image-config form, never expanded: ("NONE",),
    ("CMD", *exec_args) or ("CMD-SHELL", command). Durations are nanoseconds, 0 = inherit."""

    keyword: ClassVar[str] = "healthcheck"
    test: tuple[str, ...]
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass(kw_only=True, repr=False, eq=False)
class OnbuildCommand(Instruction):
    """ONBUILD: `expression` is the trigger as stored in the image config (the text after
    ONBUILD, heredoc bodies appended); `trigger` is its upper-cased instruction word."""

    keyword: ClassVar[str] = "onbuild"
    expression: str
    trigger: str = ""


@dataclass(kw_only=True, repr=False, eq=False)
class MaintainerCommand(Instruction):
    """MAINTAINER (deprecated): `maintainer` is the raw text."""

    keyword: ClassVar[str] = "maintainer"
    maintainer: str
