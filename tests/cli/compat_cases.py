"""Command lines CI pipelines give kaniko and buildctl-daemonless.sh, for the front ends'
tests on the host (test_compat_*.py) and inside the dockbuild image (``docker run``).

Placeholders: ``{registry}`` (HOST:PORT of a registry that holds
``library/busybox:latest``), ``{context}`` (a directory holding :data:`FILES`), ``{out}``
(a directory for files the build writes). The kaniko ones are spelled as GitLab's CI
templates and docs write them; the buildctl ones as BuildKit's README does.
"""

from __future__ import annotations

from dataclasses import dataclass

DOCKERFILE = """\
FROM {registry}/library/busybox:latest
ARG GREETING=hello
RUN echo "$GREETING from RUN" > /greeting.txt
COPY payload.txt /payload.txt
"""


def files(registry: str) -> dict[str, str]:
    """The build context of every case."""
    return {"Dockerfile": DOCKERFILE.format(registry=registry), "payload.txt": "payload\n"}


@dataclass(frozen=True)
class Case:
    name: str
    tool: str  # "kaniko" (/kaniko/executor) or "buildctl" (buildctl-daemonless.sh)
    args: tuple[str, ...]
    image: str = ""  # the image it pushes (placeholders filled), "" for none

    def argv(self, **values: str) -> list[str]:
        return [a.format(**values) for a in self.args]

    def pushed(self, **values: str) -> str:
        return self.image.format(**values)


# GitLab's "Use kaniko to build Docker images": the credentials are in
# /kaniko/.docker/config.json ($DOCKER_CONFIG), written by the job's script.
KANIKO_PUSH = Case(
    "kaniko-push",
    "kaniko",
    (
        "--context", "{context}",
        "--dockerfile", "{context}/Dockerfile",
        "--destination", "{registry}/group/project:v1.0.0",
        "--destination", "{registry}/group/project:latest",
        "--build-arg", "GREETING=hi",
        "--digest-file", "{out}/digest",
    ),
    image="{registry}/group/project:v1.0.0",
)  # fmt: skip

# GitLab's template with its cache switched on: layers in a cache repository.
KANIKO_CACHE = Case(
    "kaniko-cache",
    "kaniko",
    (
        "--context", "dir://{context}",
        "--dockerfile", "Dockerfile",
        "--destination", "{registry}/group/cached:main",
        "--cache=true",
        "--cache-repo", "{registry}/group/cached/cache",
        "--cache-ttl", "24h",
        "--snapshot-mode=redo",
        "--use-new-run",
        "--cleanup",
    ),
    image="{registry}/group/cached:main",
)  # fmt: skip

# A merge-request job: build, keep a tarball and the digests, push nothing.
KANIKO_TAR = Case(
    "kaniko-tar",
    "kaniko",
    (
        "--context", "{context}",
        "--dockerfile", "{context}/Dockerfile",
        "--destination", "{registry}/group/project:mr-1",
        "--no-push",
        "--tar-path", "{out}/image.tar",
        "--digest-file", "{out}/digest",
        "--image-name-with-digest-file", "{out}/image-name",
        "--image-name-tag-with-digest-file", "{out}/image-name-tag",
        "--verbosity", "info",
    ),
)  # fmt: skip

# BuildKit's README, "Image/Registry" (buildctl-daemonless.sh takes buildctl's arguments).
BUILDCTL_PUSH = Case(
    "buildctl-push",
    "buildctl",
    (
        "build",
        "--frontend", "dockerfile.v0",
        "--local", "context={context}",
        "--local", "dockerfile={context}",
        "--opt", "build-arg:GREETING=bonjour",
        "--output", "type=image,name={registry}/bk/app:1,push=true",
    ),
    image="{registry}/bk/app:1",
)  # fmt: skip

# BuildKit's README, "Registry (push image and cache separately)".
BUILDCTL_CACHE = Case(
    "buildctl-cache",
    "buildctl",
    (
        "build",
        "--frontend=dockerfile.v0",
        "--local", "context={context}",
        "--local", "dockerfile={context}",
        "--output", "type=image,name={registry}/bk/myrepo:image,push=true",
        "--export-cache", "type=registry,ref={registry}/bk/myrepo:buildcache",
        "--import-cache", "type=registry,ref={registry}/bk/myrepo:buildcache",
    ),
    image="{registry}/bk/myrepo:image",
)  # fmt: skip

# BuildKit's README, "Local directory" output.
BUILDCTL_LOCAL = Case(
    "buildctl-local",
    "buildctl",
    (
        "build",
        "--frontend", "dockerfile.v0",
        "--local", "context={context}",
        "--local", "dockerfile={context}",
        "--opt", "filename=Dockerfile",
        "--output", "type=local,dest={out}/rootfs",
    ),
)  # fmt: skip

# The installed console scripts: the image links /kaniko/executor, buildctl and
# buildctl-daemonless.sh to them.
SCRIPTS = {"kaniko": "dockbuild-kaniko", "buildctl": "dockbuild-buildctl"}

KANIKO_CASES = (KANIKO_PUSH, KANIKO_CACHE, KANIKO_TAR)
BUILDCTL_CASES = (BUILDCTL_PUSH, BUILDCTL_CACHE, BUILDCTL_LOCAL)
