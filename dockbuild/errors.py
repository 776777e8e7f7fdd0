"""The errors dockbuild reports to its user: a message, an optional hint and location."""

from __future__ import annotations

from typing import NamedTuple


class Location(NamedTuple):
    """A range of lines in a Dockerfile (1-based, inclusive)."""

    filename: str
    start_line: int
    end_line: int = 0

    def __str__(self) -> str:
        return f"{self.filename}:{self.start_line}"


class DockbuildError(Exception):
    """An error the CLI prints without a traceback; it exits with ``exit_status``."""

    exit_status = 1  # a build failure: a step failed, a Dockerfile error, bad input

    def __init__(
        self, message: str, *, hint: str | None = None, location: Location | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.location = location


class UsageError(DockbuildError):
    """The command line asks for something impossible (a malformed -o or --cache-to spec)."""

    exit_status = 2


class DockerfileError(DockbuildError):
    """The Dockerfile cannot be parsed or means nothing BuildKit would accept."""


class ExecError(DockbuildError):
    """A RUN step exited non-zero."""

    def __init__(
        self,
        command: str,
        exit_code: int,
        log_tail: list[str],
        *,
        location: Location | None = None,
    ) -> None:
        super().__init__(
            f"process {command!r} did not complete successfully: exit code: {exit_code}",
            location=location,
        )
        self.command = command
        self.exit_code = exit_code
        self.log_tail = log_tail


class RegistryError(DockbuildError):
    """A registry could not be reached, refused a request or the credentials, or answered
    something unusable: exit status 3, so that a script can tell it from a failed build."""

    exit_status = 3


class RegistryUnreachableError(RegistryError):
    """No registry answered: a connection that failed or timed out (DNS, refused, TLS)."""


class DigestMismatchError(RegistryError):
    """Content did not hash to the digest that named it."""


class SecurityError(DockbuildError):
    """Input tried to do something unsafe (a path escaping a rootfs, ...)."""


class ExecutorError(DockbuildError):
    """No way to run a container here, or the container could not start."""
