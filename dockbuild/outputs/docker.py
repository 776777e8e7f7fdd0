"""The ``type=docker`` exporter: a tarball for ``docker load`` (and ``podman load``).

It is the modern combined layout that BuildKit writes through containerd's archive
exporter and ``docker save`` writes since Engine 25: a complete OCI image layout plus the
legacy ``manifest.json`` index that older loaders read::

    [{"Config":"blobs/sha256/<config>","RepoTags":["hello:1"],"Layers":["blobs/sha256/<l>"]}]

``RepoTags`` hold the familiar names (containerd familiarises ``docker.io/library/hello:1``
to ``hello:1``; ``null`` without names), while index.json carries the full name in
``io.containerd.image.name``.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dockbuild.outputs.exporter import destination
from dockbuild.outputs.image import ImageBlobs, familiar_name, go_json
from dockbuild.outputs.oci import deliver_tar, exporting, layout_files

if TYPE_CHECKING:
    from dockbuild.outputs.exporter import ExportRun
    from dockbuild.outputs.spec import OutputSpec


def docker_manifest_json(image: ImageBlobs, names: Sequence[str] = ()) -> bytes:
    """The legacy ``manifest.json`` of a docker tarball (Go struct order, compact)."""
    entry = {
        "Config": f"blobs/sha256/{image.config_digest.split(':', 1)[1]}",
        "RepoTags": [familiar_name(n) for n in names] or None,
        "Layers": [f"blobs/sha256/{layer.hex}" for layer in image.layers],
    }
    return go_json([entry])


def export_docker(
    image: ImageBlobs,
    *,
    names: Sequence[str] = (),
    out: BinaryIO | None = None,
    dest: Path | None = None,
    created: str | None = None,
    descriptor_annotations: Mapping[str, str] | None = None,
) -> None:
    """Write the docker-load tarball of ``image`` to ``out`` or atomically to ``dest``."""
    files = layout_files(
        image,
        names,
        created=created,
        extra={"manifest.json": docker_manifest_json(image, names)},
        descriptor_annotations=descriptor_annotations,
    )
    deliver_tar(files, out=out, dest=dest)


def load_into_docker(image: ImageBlobs, *, names: Sequence[str] = (), **layout: object) -> None:
    """``--load``: stream the tarball into ``docker load`` (the docker CLI and its context)."""
    import shutil

    from dockbuild.errors import DockbuildError

    docker = shutil.which("docker")
    if docker is None:
        raise DockbuildError(
            "--load needs the docker CLI, which is not installed",
            hint="write a tarball instead: -o type=docker,dest=image.tar",
        )
    with subprocess.Popen(
        [docker, "load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None
        try:
            export_docker(image, names=names, out=proc.stdin, **layout)  # type: ignore[arg-type]  # layout: export_docker's own keywords, passed through
        except BrokenPipeError:
            pass  # docker load gave up: its own message says why
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        proc.wait()
    if proc.returncode != 0:
        tail = (stderr or stdout).decode(errors="replace").strip().splitlines()[-5:]
        raise DockbuildError(
            f"docker load failed (exit code {proc.returncode}): " + " / ".join(tail)
        )


class DockerExporter:
    """``type=docker``: a ``docker load`` tarball to ``dest`` or stdout, or, for
    ``--load``, into ``docker load`` itself."""

    def export(self, run: ExportRun, spec: OutputSpec) -> None:
        from dockbuild.outputs.blobs import export_image

        image = export_image(run, spec)
        blobs = image.blobs
        what = "docker image (docker load)" if spec.load else "docker image format"
        vertex = exporting(run, what, blobs)
        names = [n for n in image.names if "@" not in n]
        created = blobs.config_doc.get("created")
        notes = image.notes["manifest-descriptor"]
        if spec.load:
            load_into_docker(blobs, names=names, created=created, descriptor_annotations=notes)
            vertex.log("stdout", b"loading image to docker done\n")
        else:
            export_docker(
                blobs,
                names=names,
                created=created,
                descriptor_annotations=notes,
                **destination(spec),
            )
            vertex.log("stdout", b"sending tarball done\n")
        vertex.done()

    def close(self) -> None:
        pass
