"""Build checks (lint rules) with BuildKit's names, messages and `# check=` handling.

The rule names are BuildKit's (`frontend/dockerfile/linter/ruleset.go`), so a
`# check=skip=JSONArgsRecommended` line or a `BUILDKIT_DOCKERFILE_CHECK` build arg written
for docker buildx works unchanged here. Rules that need only the parsed instructions live
in this module; rules that need the conversion state (ARG scope, SHELL, WORKDIR) are run
by the converter through `Linter.run`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dockbuild import platforms
from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend.directives import CheckConfig, parse_check
from dockbuild.frontend.instructions import EnvCommand, LabelCommand, MaintainerCommand
from dockbuild.frontend.shell import Lex, ShellError
from dockbuild.frontend.suggest import suggest

if TYPE_CHECKING:
    from dockbuild.frontend.parser import ParseResult
    from dockbuild.frontend.stages import Stage

_URL = "https://docs.docker.com/go/dockerfile/rule/"


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    slug: str = ""
    experimental: bool = False

    @property
    def url(self) -> str:
        return _URL + self.slug + "/" if self.slug else ""


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("StageNameCasing", "Stage names should be lowercase", "stage-name-casing"),
        Rule(
            "FromAsCasing",
            "The 'as' keyword should match the case of the 'from' keyword",
            "from-as-casing",
        ),
        Rule(
            "NoEmptyContinuation",
            "Empty continuation lines will become errors in a future release",
            "no-empty-continuation",
        ),
        Rule(
            "ConsistentInstructionCasing",
            "All commands within the Dockerfile should use the same casing (either upper or lower)",
            "consistent-instruction-casing",
        ),
        Rule("DuplicateStageName", "Stage names should be unique", "duplicate-stage-name"),
        Rule(
            "ReservedStageName",
            "Reserved words should not be used as stage names",
            "reserved-stage-name",
        ),
        Rule(
            "JSONArgsRecommended",
            "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior "
            "related to OS signals",
            "json-args-recommended",
        ),
        Rule(
            "MaintainerDeprecated",
            "The MAINTAINER instruction is deprecated, use a label instead to define an image "
            "author",
            "maintainer-deprecated",
        ),
        Rule("UndefinedArgInFrom", "FROM command must use declared ARGs", "undefined-arg-in-from"),
        Rule(
            "WorkdirRelativePath",
            "Relative workdir without an absolute workdir declared within the build can have "
            "unexpected results if the base image changes",
            "workdir-relative-path",
        ),
        Rule("UndefinedVar", "Variables should be defined before their use", "undefined-var"),
        Rule(
            "MultipleInstructionsDisallowed",
            "Multiple instructions of the same type should not be used in the same stage",
            "multiple-instructions-disallowed",
        ),
        Rule(
            "LegacyKeyValueFormat",
            "Legacy key/value format with whitespace separator should not be used",
            "legacy-key-value-format",
        ),
        Rule(
            "RedundantTargetPlatform",
            "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the "
            "default behavior",
            "redundant-target-platform",
        ),
        Rule(
            "SecretsUsedInArgOrEnv",
            "Sensitive data should not be used in the ARG or ENV commands",
            "secrets-used-in-arg-or-env",
        ),
        Rule(
            "InvalidDefaultArgInFrom",
            "Default value for global ARG results in an empty or invalid base image name",
            "invalid-default-arg-in-from",
        ),
        Rule(
            "FromPlatformFlagConstDisallowed",
            "FROM --platform flag should not use a constant value",
            "from-platform-flag-const-disallowed",
        ),
        # BuildKit gives this rule no documentation page (linter/generate.go skips it).
        Rule(
            "InvalidBaseImagePlatform",
            "Base image platform does not match expected target platform",
        ),
        Rule(
            "CopyIgnoredFile",
            "Attempting to Copy file that is excluded by .dockerignore",
            "copy-ignored-file",
            experimental=True,
        ),
        Rule(
            "InvalidDefinitionDescription",
            "Comment for build stage or argument should follow the format: "
            "`# <arg/stage name> <description>`. If this is not intended to be a description "
            "comment, add an empty line or comment between the instruction and the comment.",
            "invalid-definition-description",
            experimental=True,
        ),
        Rule(
            "ExposeProtoCasing",
            "Protocol in EXPOSE instruction should be lowercase",
            "expose-proto-casing",
        ),
        Rule(
            "ExposeInvalidFormat",
            "IP address and host-port mapping should not be used in EXPOSE instruction. This "
            "will become an error in a future release",
            "expose-invalid-format",
        ),
    )
}


@dataclass(frozen=True)
class CheckWarning:
    """One rule violation: the rule, the message and the Dockerfile lines."""

    rule: str
    message: str
    location: Location | None

    @property
    def url(self) -> str:
        return RULES[self.rule].url

    @property
    def description(self) -> str:
        return RULES[self.rule].description

    def short(self) -> str:
        """BuildKit's one-line form: `Rule: message (line N)`."""
        text = f"{self.rule}: {self.message}"
        if self.location is not None and self.location.start_line > 0:
            text += f" (line {self.location.start_line})"
        return text


@dataclass
class Linter:
    """Collects the warnings of one conversion, honouring `# check=` (skip, error,
    experimental)."""

    config: CheckConfig = field(default_factory=CheckConfig)
    warnings: list[CheckWarning] = field(default_factory=list)
    _seen: set[CheckWarning] = field(default_factory=set, repr=False)

    def enabled(self, rule: str) -> bool:
        if self.config.skip_all or rule in self.config.skip:
            return False
        if RULES[rule].experimental:
            return self.config.experimental_all or rule in self.config.experimental
        return True

    def run(self, rule: str, message: str, location: Location | None) -> None:
        if not self.enabled(rule):
            return
        warning = CheckWarning(rule, message, location)
        if warning not in self._seen:
            self._seen.add(warning)
            self.warnings.append(warning)

    def error(self) -> DockerfileError | None:
        """With `error=true`, the error that fails the build when any rule fired."""
        if not self.config.error or not self.warnings:
            return None
        rules = ", ".join(dict.fromkeys(w.rule for w in self.warnings))
        first = self.warnings[0].location
        return DockerfileError(f"lint violation found for rules: {rules}", location=first)


def check_config(
    directive: str | None, build_arg: str | None, filename: str, line: int
) -> CheckConfig:
    """The effective check config: the BUILDKIT_DOCKERFILE_CHECK build arg wins over the
    `# check=` directive, as in BuildKit."""
    if build_arg is not None:
        try:
            return parse_check(build_arg, filename=filename, line=0)
        except DockerfileError as err:
            raise DockerfileError(
                f"BUILDKIT_DOCKERFILE_CHECK: {err.message}", hint="same syntax as # check="
            ) from None
    if directive is not None:
        return parse_check(directive, filename=filename, line=line)
    return CheckConfig()


# -- rules that need only the instructions -------------------------------------------------

RESERVED_STAGE_NAMES = ("context", "scratch")


def keyword(original: str) -> str:
    """The instruction word as written (its case kept)."""
    words = original.split(None, 1)
    return words[0] if words else ""


def check_casing(words: list[tuple[str, Location]], linter: Linter) -> None:
    """ConsistentInstructionCasing over every instruction word of every stage."""
    # Instruction words are letters only, so islower/isupper are `word.lower() == word`.
    names = [word for word, _ in words]
    lower = sum(map(str.islower, names))
    upper = sum(map(str.isupper, names))
    if lower == len(words) or upper == len(words):
        return  # consistent already (the common case)
    majority_lower = lower > upper
    for word, location in words:
        wanted = ""
        if majority_lower and word.lower() != word:
            wanted = "lowercase"
        elif not majority_lower and word.upper() != word:
            wanted = "uppercase"
        if wanted:
            linter.run(
                "ConsistentInstructionCasing",
                f"Command '{word}' should match the case of the command majority ({wanted})",
                location,
            )


def check_from(original: str, location: Location, linter: Linter) -> None:
    """StageNameCasing and FromAsCasing for one FROM line."""
    words = original.split()
    words = [w for w in words if not w.startswith("--")]
    if len(words) != 4 or words[2].lower() != "as":
        return
    from_word, as_word, name = words[0], words[2], words[3]
    if name != name.lower():
        linter.run("StageNameCasing", f"Stage name '{name}' should be lowercase", location)
    from_upper = from_word.upper() == from_word
    if (from_upper and as_word.upper() != as_word) or (
        not from_upper and as_word.lower() != as_word
    ):
        linter.run(
            "FromAsCasing", f"'{as_word}' and '{from_word}' keywords' casing do not match", location
        )


def check_stage_names(names: list[tuple[str, Location]], linter: Linter) -> None:
    """ReservedStageName and DuplicateStageName."""
    seen: set[str] = set()
    for name, location in names:
        if not name:
            continue
        if name in RESERVED_STAGE_NAMES:
            linter.run(
                "ReservedStageName",
                f'Stage name should not use the same name as reserved stage "{name}"',
                location,
            )
        if name in seen:
            linter.run(
                "DuplicateStageName",
                f'Duplicate stage name "{name}", stage names should be unique',
                location,
            )
        seen.add(name)


def check_definition_description(
    instruction: str, keys: list[str], comments: list[str], location: Location, linter: Linter
) -> None:
    """InvalidDefinitionDescription (experimental): the comment right above a named FROM or
    an ARG should start with the name it documents (BuildKit's validateDefinitionDescription)."""
    if not comments or not keys or comments[-1].split(" ")[0] in keys:
        return
    name = keys[0] if len(keys) == 1 else "<arg_key>"
    linter.run(
        "InvalidDefinitionDescription",
        f"Comment for {instruction} should follow the format: `# {name} <description>`",
        location,
    )


# BuildKit's validateNoSecretKey: a name made of `_`-separated words, one of which is a
# secret-like word, unless an allowed word also appears.
_SECRET_WORDS = re.compile(
    r"(?i)(?:_|^)(?:apikey|auth|credential|credentials|key|password|pword|passwd|secret|token)(?:_|$)"
)
_ALLOWED_WORDS = re.compile(r"(?i)(?:_|^)(?:public|file|version)(?:_|$)")  # allowTokens


def check_secret_name(instruction: str, name: str, location: Location, linter: Linter) -> None:
    if _SECRET_WORDS.search(name) and not _ALLOWED_WORDS.search(name):
        linter.run(
            "SecretsUsedInArgOrEnv",
            f'Do not use ARG or ENV instructions for sensitive data ({instruction} "{name}")',
            location,
        )


def check_config_of(result: ParseResult, text: bytes | str, build_arg: str | None) -> CheckConfig:
    """`check_config` for a parsed Dockerfile: the `# check=` line is found for errors."""
    line = 0
    if "check" in result.directives:
        raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        for number, item in enumerate(raw.splitlines(), start=1):
            if re.match(r"\ufeff?#\s*check\s*=", item, re.IGNORECASE):
                line = number
                break
    return check_config(result.directives.get("check"), build_arg, result.filename, line)


_KEY_VALUE_COMMANDS = (EnvCommand, LabelCommand)


def check_instructions(stages: list[Stage], result: ParseResult, linter: Linter) -> None:
    """The rules that read the instructions alone, over every stage, used or not."""
    words: list[tuple[str, Location]] = []
    names: list[tuple[str, Location]] = []
    for spec in stages:
        words.append((keyword(spec.original), spec.location))
        names.append((spec.name, spec.location))
        check_from(spec.original, spec.location, linter)
        for cmd in spec.commands:
            words.append((keyword(cmd.original), cmd.location))
            if isinstance(cmd, MaintainerCommand):
                linter.run(
                    "MaintainerDeprecated",
                    "Maintainer instruction is deprecated in favor of using label",
                    cmd.location,
                )
            elif isinstance(cmd, _KEY_VALUE_COMMANDS) and cmd.legacy:
                word = keyword(cmd.original)
                linter.run(
                    "LegacyKeyValueFormat",
                    f'"{word} key=value" should be used instead of legacy "{word} key value" format',
                    cmd.location,
                )
    check_casing(words, linter)
    check_stage_names(names, linter)
    if linter.enabled("InvalidDefinitionDescription"):
        for node in result.children:
            if node.value == "from" and len(node.args) == 3 and node.args[1].lower() == "as":
                word, keys = "FROM", [node.args[2].lower()]
            elif node.value == "arg":
                word, keys = "ARG", [arg.partition("=")[0] for arg in node.args]
            else:
                continue
            location = Location(result.filename, node.start_line, node.end_line)
            check_definition_description(word, keys, node.prev_comment, location, linter)


def check_from_args(
    stages: list[Stage],
    defaults: dict[str, str | None],
    declared_names: set[str],
    lex: Lex,
    linter: Linter,
) -> None:
    """UndefinedArgInFrom, InvalidDefaultArgInFrom and the FROM --platform rules, from the
    meta ARGs' defaults alone."""
    scope = {k: v for k, v in defaults.items() if v is not None}
    declared = sorted(set(defaults) | declared_names)
    for spec in stages:
        for word in (spec.base_name, spec.platform):
            if not word:
                continue
            try:
                _, _, unmatched = lex.process_word_with_matches(word, scope)
            except ShellError:
                continue
            for name in sorted(unmatched):
                if name in declared:
                    continue
                match = suggest(name, declared)
                message = f"FROM argument '{name}' is not declared"
                if match:
                    message += f" (did you mean {match}?)"
                linter.run("UndefinedArgInFrom", message, spec.location)
        try:
            base = lex.process_word(spec.base_name, scope)
        except ShellError:
            continue
        if "$" in spec.base_name and not valid_reference(base):
            linter.run(
                "InvalidDefaultArgInFrom",
                f"Default value for ARG {spec.base_name} results in empty or invalid base "
                "image name",
                spec.location,
            )
        if spec.platform:
            _check_platform(spec, scope, lex, linter)


def _check_platform(spec: Stage, scope: dict[str, str], lex: Lex, linter: Linter) -> None:
    try:
        _, matched, _ = lex.process_word_with_matches(spec.platform, scope)
    except ShellError:
        return
    if spec.platform in ("$TARGETPLATFORM", "${TARGETPLATFORM}"):
        linter.run(
            "RedundantTargetPlatform",
            f"Setting platform to predefined {spec.platform} in FROM is redundant as this is "
            "the default behavior",
            spec.location,
        )
    if not matched and "$" not in spec.platform:
        # A stage named after its platform (`AS build-arm64`) is allowed a constant.
        os_, _, rest = spec.platform.partition("/")
        arch = rest.partition("/")[0]
        if not (spec.name and ((arch and arch in spec.name) or (os_ and os_ in spec.name))):
            linter.run(
                "FromPlatformFlagConstDisallowed",
                f'FROM --platform flag should not use constant value "{spec.platform}"',
                spec.location,
            )


_REFERENCE_RE = re.compile(
    r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


def check_base_platform(
    name: str, expected: str, config: dict[str, Any] | None, location: Location, linter: Linter
) -> None:
    """BuildKit's validateBaseImagePlatform: a registry base whose config names another OS
    or architecture than the stage's platform is a warning, not an error. As there, the
    config's fields are compared as written (the variant not at all) and both platforms
    are named as containerd normalises them."""
    if not config or not config.get("os") or not config.get("architecture"):
        return
    actual = platforms.normalize_parts(
        str(config["os"]),
        str(config["architecture"]),
        str(config.get("variant") or ""),
        str(config.get("os.version") or ""),
        tuple(str(f) for f in config.get("os.features") or ()),
    )
    want_os, want_arch, _ = platforms.split(expected)
    if (config["os"], config["architecture"]) != (want_os, want_arch):
        linter.run(
            "InvalidBaseImagePlatform",
            f'Base image {name} was pulled with platform "{actual}", expected "{expected}" '
            "for current build",
            location,
        )


def valid_reference(name: str) -> bool:
    """Whether `name` reads as an image reference (or is scratch)."""
    return name == "scratch" or _REFERENCE_RE.fullmatch(name) is not None
