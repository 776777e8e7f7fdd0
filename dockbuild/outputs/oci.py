"""The ``type=oci`` exporter: an OCI image layout as a tar stream, a tar file or a directory.

The tar is written the way containerd's archive exporter (which BuildKit uses) writes it:
entries sorted by name, ``blobs/`` and ``blobs/sha256/`` directories (0755), blobs and
``oci-layout`` read-only (0444), ``index.json`` 0644, owner 0:0 without names, mtime 0.
The docker exporter writes the same layout plus ``manifest.json``.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dockbuild.atomic import atomic_dir, output_dir, output_file
from dockbuild.engine.archive import CountingWriter
from dockbuild.errors import DockbuildError
from dockbuild.outputs.exporter import destination
from dockbuild.outputs.image import OCI_LAYOUT, ImageBlobs, IndexBlobs, layout_index

if TYPE_CHECKING:
    from dockbuild.outputs.exporter import ExportRun
    from dockbuild.outputs.spec import OutputSpec
    from dockbuild.progress import Vertex

_CHUNK = 1 << 20


def _blob_files(image: ImageBlobs) -> dict[str, bytes | Path]:
    """Every blob of the image by its layout path, checked against its descriptor."""
    files: dict[str, bytes | Path] = {
        f"blobs/sha256/{image.manifest_digest.split(':', 1)[1]}": image.manifest,
        f"blobs/sha256/{image.config_digest.split(':', 1)[1]}": image.config,
    }
    for layer in image.layers:
        path = image.blobs.get(layer.digest)
        if path is None:
            raise DockbuildError(f"layer blob {layer.digest} is missing from the export")
        size = os.stat(path).st_size
        if size != layer.size:
            raise DockbuildError(
                f"layer blob {layer.digest} at {path} has {size} bytes, "
                f"its descriptor says {layer.size}",
                hint="the cache may be damaged: `dockbuild prune` and build again",
            )
        files[f"blobs/sha256/{layer.hex}"] = path
    return files


def layout_files(
    image: ImageBlobs | IndexBlobs,
    names: Sequence[str] = (),
    *,
    created: str | None = None,
    extra: Mapping[str, bytes] | None = None,
    descriptor_annotations: Mapping[str, str] | None = None,
) -> dict[str, bytes | Path]:
    """The files of an OCI layout for ``image`` (contents as bytes or a path to copy);
    for an index, its blob and every platform's image."""
    files: dict[str, bytes | Path] = {
        "oci-layout": OCI_LAYOUT,
        "index.json": layout_index(
            image,
            names,
            created=created,
            descriptor_annotations=descriptor_annotations,
        ),
    }
    if isinstance(image, IndexBlobs):
        files[f"blobs/sha256/{image.manifest_digest.split(':', 1)[1]}"] = image.manifest
        for each in image.images:
            files.update(_blob_files(each))
    else:
        files.update(_blob_files(image))
    files.update(extra or {})
    return files


def _mode(name: str) -> int:
    return 0o444 if name.startswith("blobs/") or name == "oci-layout" else 0o644


def write_layout_tar(files: Mapping[str, bytes | Path], out: BinaryIO) -> None:
    """Write layout files as a deterministic tar stream to ``out``."""
    entries: dict[str, bytes | Path | None] = dict(files)
    for name in files:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries["/".join(parts[:i]) + "/"] = None

    # Mode "w" on a position-counting wrapper: pipes cannot tell(), and "w|" re-buffers.
    position = CountingWriter(out)
    # CountingWriter is a write-only file object; typeshed wants a full IO for fileobj.
    tar = tarfile.open(fileobj=position, mode="w", format=tarfile.PAX_FORMAT)  # type: ignore[call-overload]  # noqa: SIM115
    out_fd = _fileno(out)
    tar.copybufsize = _CHUNK
    for name in sorted(entries, key=lambda n: n.encode()):
        content = entries[name]
        ti = tarfile.TarInfo(name.rstrip("/"))
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        if content is None:
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tar.addfile(ti)
        elif isinstance(content, bytes):
            ti.mode = _mode(name)
            ti.size = len(content)
            tar.addfile(ti, _BytesReader(content))
        else:
            ti.mode = _mode(name)
            with open(content, "rb") as f:
                ti.size = os.fstat(f.fileno()).st_size
                if out_fd is None or ti.size == 0:
                    tar.addfile(ti, f)
                    continue
                # Header through tarfile, data by sendfile(2): no copy through Python.
                tar.addfile(ti)
                out.flush()
                _sendfile(out_fd, f, ti.size)
                position.pos += ti.size
                padding = -ti.size % tarfile.BLOCKSIZE
                if padding:
                    position.write(b"\0" * padding)
                tar.offset += ti.size + padding
    # Only a complete archive gets its end marker: an exception above skips this, so a
    # cut-off stream is recognisably truncated.
    tar.close()
    out.flush()


def _fileno(out: BinaryIO) -> int | None:
    try:
        return out.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # BytesIO and friends: plain copies


def _sendfile(out_fd: int, src: BinaryIO, size: int) -> None:
    """Copy ``size`` bytes of ``src`` to ``out_fd`` in the kernel, or by read/write."""
    offset = 0
    try:
        while offset < size:
            sent = os.sendfile(out_fd, src.fileno(), offset, size - offset)
            if sent == 0:
                raise DockbuildError(f"{src.name}: the blob is shorter than {size} bytes")
            offset += sent
    except OSError as e:
        if offset or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        src.seek(0)
        while offset < size:
            chunk = src.read(min(_CHUNK, size - offset))
            if not chunk:
                raise DockbuildError(f"{src.name}: the blob is shorter than {size} bytes") from e
            view = memoryview(chunk)
            while view:  # raw fd (the caller flushed its buffer); pipes take part of it
                view = view[os.write(out_fd, view) :]
            offset += len(chunk)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else self.pos + n
        chunk = self.view[self.pos : end].tobytes()
        self.pos += len(chunk)
        return chunk


def write_layout_dir(files: Mapping[str, bytes | Path], dest: Path) -> None:
    """Write layout files as a directory, replacing ``dest`` atomically (a symlink to a
    directory is followed; see :func:`output_dir`).

    Blob files (the cache's, immutable) are hard-linked where ``dest`` is on the cache's
    filesystem, so no byte is copied; elsewhere they are copied.
    """
    with atomic_dir(output_dir(dest), durable=False) as tmp:
        for name in sorted(files):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            content = files[name]
            if isinstance(content, bytes):
                target.write_bytes(content)
            elif _link(content, target):
                continue  # a link keeps the cache file's mode: never chmod the cache
            else:
                shutil.copyfile(content, target)
            os.chmod(target, 0o644)


def _link(src: Path, target: Path) -> bool:
    """Hard-link ``src`` to ``target``; False where that cannot be done (so: copy)."""
    try:
        os.link(src, target)
    except OSError as e:
        # EXDEV: another filesystem; EPERM/EACCES: protected_hardlinks or a filesystem
        # without links; EMLINK: too many links to the one inode.
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.EOPNOTSUPP):
            return False
        raise
    return True


def deliver_tar(
    files: Mapping[str, bytes | Path], *, out: BinaryIO | None, dest: Path | None
) -> None:
    """Write a layout tar to ``out`` (e.g. stdout) or to ``dest`` (:func:`output_file`)."""
    if (out is None) == (dest is None):
        raise ValueError("give exactly one of out and dest")
    if out is not None:
        write_layout_tar(files, out)
        return
    assert dest is not None  # exactly one of them, checked above
    # Atomic, not synced (docs/outputs.md): the copy is in the page cache, and waiting
    # for the disk would cost more than all the rest of the export.
    with output_file(Path(dest), durable=False) as f:
        write_layout_tar(files, f)


def export_oci(
    image: ImageBlobs | IndexBlobs,
    *,
    names: Sequence[str] = (),
    out: BinaryIO | None = None,
    dest: Path | None = None,
    tar: bool = True,
    created: str | None = None,
    descriptor_annotations: Mapping[str, str] | None = None,
) -> None:
    """Export ``image`` as an OCI image layout.

    With ``tar`` (the default) the layout is a tar written to ``out`` or to the file
    ``dest``; with ``tar=False`` it is the directory ``dest``. ``names`` are image
    references recorded in index.json; ``created`` (RFC 3339) becomes the
    ``org.opencontainers.image.created`` annotation BuildKit adds.
    """
    files = layout_files(
        image,
        names,
        created=created,
        descriptor_annotations=descriptor_annotations,
    )
    if tar:
        deliver_tar(files, out=out, dest=dest)
        return
    if dest is None or out is not None:
        raise ValueError("an OCI layout directory (tar=false) needs dest and no out")
    write_layout_dir(files, Path(dest))


def exporting(run: ExportRun, what: str, image: ImageBlobs | IndexBlobs) -> Vertex:
    """The progress vertex of an image archive export, with BuildKit's first lines."""
    vertex = run.progress.vertex(f"exporting to {what}")
    for each in image.images if isinstance(image, IndexBlobs) else (image,):
        vertex.log("stdout", f"exporting manifest {each.manifest_digest} done\n".encode())
        vertex.log("stdout", f"exporting config {each.config_digest} done\n".encode())
    if isinstance(image, IndexBlobs):
        vertex.log("stdout", f"exporting manifest list {image.manifest_digest} done\n".encode())
    return vertex


class OciExporter:
    """``type=oci``: an OCI image layout, as a tar (``dest`` or stdout) or a directory."""

    def export(self, run: ExportRun, spec: OutputSpec) -> None:
        from dockbuild.outputs.blobs import export_image, export_index

        blobs: ImageBlobs | IndexBlobs
        if run.multi_platform:
            index = export_index(run, spec)
            blobs, names, notes = index.blobs, index.names, index.descriptor_annotations
            created = index.blobs.images[0].config_doc.get("created")
        else:
            image = export_image(run, spec)
            blobs, names, notes = image.blobs, image.names, image.notes["manifest-descriptor"]
            created = blobs.config_doc.get("created")
        vertex = exporting(run, "oci image format", blobs)
        if not spec.flag("tar", True):
            if spec.dest is None or spec.dest == "-":
                raise DockbuildError("type=oci,tar=false needs dest=DIRECTORY")
            export_oci(
                blobs,
                names=names,
                created=created,
                descriptor_annotations=notes,
                dest=Path(spec.dest),
                tar=False,
            )
        else:
            export_oci(
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
