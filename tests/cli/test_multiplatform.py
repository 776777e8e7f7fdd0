"""Multi-platform builds through the real CLI, with no foreign binary run: cross-compile
stages (`FROM --platform=$BUILDPLATFORM`), scratch stages per platform, an image index
read by skopeo and umoci, pushed to a real registry, and used as a base again."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context
from registry_fixture import Registry, require_binary

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# tools: no TARGET* use, built once; build: a file per TARGETARCH, on the build platform.
CROSS = """\
FROM --platform=$BUILDPLATFORM busybox AS tools
RUN echo tool > /tool

FROM --platform=$BUILDPLATFORM busybox AS build
ARG TARGETARCH
ARG TARGETPLATFORM
RUN mkdir /out && echo "$TARGETPLATFORM built on $(uname -m)" > /out/app-$TARGETARCH

FROM scratch
ARG TARGETARCH
COPY arch-$TARGETARCH /arch
COPY --from=tools /tool /tool
COPY --from=build /out/app-$TARGETARCH /app
"""


@pytest.fixture
def cross(tmp_path: Path) -> Path:
    return write_context(
        tmp_path / "cross",
        {"Dockerfile": CROSS, "arch-amd64": "amd\n", "arch-arm64": "arm\n", "arch-arm": "arm32\n"},
    )


def _skopeo(*args: str) -> str:
    done = subprocess.run(
        [require_binary("skopeo", "skopeo"), *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _layout(tar: Path, dest: Path) -> Path:
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="tar")
    return dest


def _blob(layout: Path, digest: str) -> dict:
    return json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())


def _files_of(layout: Path, manifest: dict) -> dict[str, str]:
    """The regular files the image's layers hold (later layers win)."""
    out: dict[str, str] = {}
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs" / "sha256" / layer["digest"].split(":")[1]) as t:
            for member in t.getmembers():
                if member.isfile():
                    out[member.name] = t.extractfile(member).read().decode()  # type: ignore[union-attr]
    return out


def test_two_platforms_make_an_index_with_a_manifest_per_platform(
    dockbuild: DockbuildCLI, cross: Path, tmp_path: Path
) -> None:
    out, meta = tmp_path / "out.tar", tmp_path / "meta.json"
    notes = "annotation-index.org.example.i=idx,annotation-index-descriptor.org.example.d=desc"
    run = dockbuild.build(
        cross, "--platform", "linux/amd64,aarch64", "-o", f"type=oci,dest={out},{notes}",
        "--metadata-file", str(meta), "--iidfile", str(tmp_path / "iid"),
    )  # fmt: skip
    index = json.loads(_skopeo("inspect", "--raw", f"oci-archive:{out}"))
    assert index["mediaType"] == OCI_INDEX
    assert index["annotations"] == {"org.example.i": "idx"}
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]
    layout = _layout(out, tmp_path / "layout")
    top = json.loads((layout / "index.json").read_text())["manifests"]
    digest = json.loads(meta.read_text())["containerimage.digest"]
    assert [(m["mediaType"], m["digest"]) for m in top] == [(OCI_INDEX, digest)]
    assert top[0]["annotations"]["org.example.d"] == "desc"
    assert (tmp_path / "iid").read_text() == digest  # as buildx: the index's digest
    for entry, arch, marker in zip(index["manifests"], ("amd64", "arm64"), ("amd", "arm"), strict=True):
        manifest = _blob(layout, entry["digest"])
        assert entry["mediaType"] == manifest["mediaType"] == OCI_MANIFEST
        config = _blob(layout, manifest["config"]["digest"])
        assert (config["os"], config["architecture"]) == ("linux", arch)
        assert len(manifest["layers"]) == 3
        assert _files_of(layout, manifest) == {
            "arch": f"{marker}\n",
            "tool": "tool\n",
            "app": f"linux/{arch} built on x86_64\n",
        }
        # skopeo picks the platform's manifest from the index
        picked = json.loads(_skopeo("--override-arch", arch, "inspect", "--config", f"oci-archive:{out}"))
        assert picked["architecture"] == arch
    # The target-independent stage ran once; each step names its platform, as BuildKit.
    log = run.stderr
    assert log.count("RUN echo tool > /tool\n") == 1
    assert "[linux/amd64->arm64 build 2/2] RUN mkdir /out" in log
    assert "[linux/amd64 build 2/2] RUN mkdir /out" in log
    assert "[linux/arm64 stage-2 1/3] COPY arch-$TARGETARCH /arch" in log


def test_each_platform_of_the_index_unpacks_with_umoci(
    dockbuild: DockbuildCLI, cross: Path, tmp_path: Path
) -> None:
    umoci = require_binary("umoci", "umoci")
    out = tmp_path / "dir"
    dockbuild.build(cross, "--platform", "linux/arm64,linux/arm/v7", "-t", "multi:1", "-o", f"type=oci,dest={out},tar=false")
    assert subprocess.run([umoci, "ls", "--layout", str(out)], capture_output=True, text=True).stdout.split() == ["1"]
    index = _blob(out, json.loads((out / "index.json").read_text())["manifests"][0]["digest"])
    assert [m["platform"].get("variant") for m in index["manifests"]] == [None, "v7"]
    for entry, marker in zip(index["manifests"], ("arm", "arm32"), strict=True):
        # umoci 0.4 refuses a tag with several platforms: one layout per platform's manifest
        single = tmp_path / f"single-{marker}"
        shutil.copytree(out, single)
        ref = dict(entry, annotations={"org.opencontainers.image.ref.name": "p"})
        (single / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [ref]}))
        bundle = tmp_path / f"bundle-{marker}"
        done = subprocess.run(
            [umoci, "unpack", "--rootless", "--image", f"{single}:p", str(bundle)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (bundle / "rootfs" / "arch").read_text() == f"{marker}\n"


def test_the_cache_never_serves_one_platforms_layer_for_another(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM scratch\nARG TARGETARCH\nCOPY arch-$TARGETARCH /arch\n", "arch-amd64": "amd\n", "arch-arm64": "arm\n"},
    )
    for platform, marker in (("linux/arm64", "arm"), ("linux/amd64", "amd"), ("linux/arm64", "arm")):
        dest = tmp_path / f"out-{marker}"
        dockbuild.build(ctx, "--platform", platform, "-o", f"type=local,dest={dest}")
        assert (dest / "arch").read_text() == f"{marker}\n"


def test_a_single_foreign_platform_makes_an_image_manifest_not_an_index(
    dockbuild: DockbuildCLI, cross: Path, tmp_path: Path
) -> None:
    out = tmp_path / "arm.tar"
    run = dockbuild.build(cross, "--platform", "arm64", "-o", f"type=oci,dest={out}")
    manifest = json.loads(_skopeo("inspect", "--raw", f"oci-archive:{out}"))
    assert manifest["mediaType"] == OCI_MANIFEST
    config = json.loads(_skopeo("inspect", "--config", f"oci-archive:{out}"))
    assert (config["os"], config["architecture"]) == ("linux", "arm64")
    assert "[stage-2 1/3] COPY arch-$TARGETARCH /arch" in run.stderr  # no platform prefix


def test_two_platform_builds_are_reproducible_with_source_date_epoch(
    dockbuild: DockbuildCLI, cross: Path, tmp_path: Path
) -> None:
    digests = []
    for n in range(2):
        meta = tmp_path / f"meta{n}.json"
        dockbuild.build(
            cross, "--platform", "linux/amd64,linux/arm64", "-o", f"type=oci,rewrite-timestamp=true,dest={tmp_path / f'o{n}.tar'}",
            "--metadata-file", str(meta),
            env={"SOURCE_DATE_EPOCH": "1700000000", "DOCKBUILD_ROOT": str(tmp_path / f"root{n}")},
        )  # fmt: skip
        digests.append(json.loads(meta.read_text())["containerimage.digest"])
    assert digests[0] == digests[1]
    assert (tmp_path / "o0.tar").read_bytes() == (tmp_path / "o1.tar").read_bytes()


def test_docker_media_types_make_a_manifest_list(dockbuild: DockbuildCLI, cross: Path, tmp_path: Path) -> None:
    out = tmp_path / "list.tar"
    dockbuild.build(cross, "--platform", "linux/amd64,linux/arm64", "-o", f"type=oci,dest={out},oci-mediatypes=false")
    index = json.loads(_skopeo("inspect", "--raw", f"oci-archive:{out}"))
    assert index["mediaType"] == DOCKER_LIST
    assert {m["mediaType"] for m in index["manifests"]} == {"application/vnd.docker.distribution.manifest.v2+json"}


def test_docker_outputs_and_load_refuse_several_platforms(
    dockbuild: DockbuildCLI, cross: Path, tmp_path: Path
) -> None:
    for args in (["-o", f"type=docker,dest={tmp_path / 'd.tar'}"], ["--load"]):
        run = dockbuild.build(cross, "--platform", "linux/amd64,linux/arm64", *args, check=False)
        assert run.returncode == 2
        assert "cannot export several platforms (linux/amd64, linux/arm64)" in run.stderr
        assert "type=oci" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "d.tar").exists()
    bad = dockbuild.build(cross, "--platform", "linux/", check=False)
    assert bad.returncode == 2 and "--platform: invalid platform 'linux/'" in bad.stderr


def test_local_and_tar_outputs_split_per_platform_or_merge(
    dockbuild: DockbuildCLI, cross: Path, tmp_path: Path
) -> None:
    both = ("--platform", "linux/amd64,linux/arm/v7")
    dockbuild.build(cross, *both, "-o", f"type=local,dest={tmp_path / 'split'}")
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["linux_amd64", "linux_arm_v7"]
    assert (tmp_path / "split" / "linux_arm_v7" / "arch").read_text() == "arm32\n"
    dockbuild.build(cross, *both, "-o", f"type=local,dest={tmp_path / 'merged'},platform-split=false")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["app", "arch", "tool"]
    assert (tmp_path / "merged" / "arch").read_text() == "arm32\n"  # the later platform's

    dockbuild.build(cross, *both, "-o", f"type=tar,dest={tmp_path / 'split.tar'}")
    with tarfile.open(tmp_path / "split.tar") as t:
        assert t.getnames() == [
            "linux_amd64", "linux_amd64/app", "linux_amd64/arch", "linux_amd64/tool",
            "linux_arm_v7", "linux_arm_v7/app", "linux_arm_v7/arch", "linux_arm_v7/tool",
        ]  # fmt: skip
        assert t.extractfile("linux_amd64/arch").read() == b"amd\n"  # type: ignore[union-attr]
    dockbuild.build(cross, *both, "-o", f"type=tar,dest={tmp_path / 'merged.tar'},platform-split=false")
    with tarfile.open(tmp_path / "merged.tar") as t:
        assert t.getnames() == ["app", "arch", "tool"]
        assert t.extractfile("arch").read() == b"arm32\n"  # type: ignore[union-attr]


def test_a_pushed_index_is_a_multi_platform_base_and_a_missing_platform_is_named(
    dockbuild: DockbuildCLI, registry: Registry, cross: Path, tmp_path: Path
) -> None:
    name = f"{registry.host}/multi/cross:1"
    meta = tmp_path / "meta.json"
    dockbuild.build(cross, "--platform", "linux/amd64,linux/arm64", "-t", name, "--push", "--metadata-file", str(meta))
    raw = json.loads(_skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{name}"))
    assert raw["mediaType"] == OCI_INDEX
    assert [m["platform"]["architecture"] for m in raw["manifests"]] == ["amd64", "arm64"]
    pushed = json.loads(meta.read_text())
    assert pushed["containerimage.digest"] == "sha256:" + __import__("hashlib").sha256(
        _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{name}").encode()
    ).hexdigest()
    arm = json.loads(_skopeo("--override-arch", "arm64", "inspect", "--tls-verify=false", f"docker://{name}"))
    assert arm["Architecture"] == "arm64" and len(arm["Layers"]) == 3

    # A base from the registry's index, and from an OCI layout holding it, per platform.
    layout = tmp_path / "layout"
    _skopeo("copy", "--all", "--src-tls-verify=false", f"docker://{name}", f"oci:{layout}:1")
    child = write_context(tmp_path / "child", {"Dockerfile": f"FROM {name}\nCOPY --from=lay /arch /from-layout\n"})
    dest = tmp_path / "child-out"
    dockbuild(
        "build", "--progress=plain", "--build-context", f"lay=oci-layout://{layout}:1",
        "--platform", "linux/arm64,linux/amd64", "-o", f"type=local,dest={dest}", str(child),
    )  # fmt: skip
    for platform, marker in (("linux_arm64", "arm"), ("linux_amd64", "amd")):
        assert (dest / platform / "arch").read_text() == f"{marker}\n"
        assert (dest / platform / "from-layout").read_text() == f"{marker}\n"

    missing = dockbuild(
        "build", "--build-context", f"lay=oci-layout://{layout}:1",
        "--platform", "linux/amd64,linux/riscv64", str(child), check=False,
    )  # fmt: skip
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "no image for platform linux/riscv64 (available: linux/amd64, linux/arm64)" in missing.stderr
    assert f"FROM {name}" in missing.stderr


def test_a_single_platform_base_of_another_architecture_is_a_warning_as_in_buildkit(
    dockbuild: DockbuildCLI, registry: Registry, cross: Path, tmp_path: Path
) -> None:
    name = f"{registry.host}/multi/armonly:1"
    dockbuild.build(cross, "--platform", "linux/arm64", "-t", name, "--push")
    child = write_context(tmp_path / "child", {"Dockerfile": f"FROM {name}\nENV foo=bar\n"})
    out = tmp_path / "implicit.tar"
    run = dockbuild.build(child, "-o", f"type=oci,dest={out}")
    assert (
        f'InvalidBaseImagePlatform: Base image {name} was pulled with platform "linux/arm64", '
        'expected "linux/amd64" for current build (line 1)'
    ) in run.stderr
    # Without --platform the image keeps its base's platform; with it, the one asked for.
    config = json.loads(_skopeo("inspect", "--config", f"oci-archive:{out}"))
    assert (config["architecture"], config["config"]["Env"][-1]) == ("arm64", "foo=bar")
    dockbuild.build(child, "--platform", "linux/amd64", "-o", f"type=oci,dest={out}")
    assert json.loads(_skopeo("inspect", "--config", f"oci-archive:{out}"))["architecture"] == "amd64"
    checked = dockbuild("build", "--check", str(child), check=False)
    assert "InvalidBaseImagePlatform" in checked.out + checked.stderr
    skipped = dockbuild.build(child, "--build-arg", "BUILDKIT_DOCKERFILE_CHECK=skip=InvalidBaseImagePlatform")
    assert "InvalidBaseImagePlatform" not in skipped.stderr


def test_cache_to_exports_every_platforms_steps_in_one_cache_manifest(
    dockbuild: DockbuildCLI, registry: Registry, cross: Path, tmp_path: Path
) -> None:
    import re

    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    local, ref = tmp_path / "exported-cache", f"{registry.host}/multi/cache:build"
    both = ("--platform", "linux/amd64,linux/arm64")
    dockbuild.build(
        cross, *both, "-o", f"type=oci,dest={tmp_path / 'a.tar'}", "--cache-to", f"type=local,dest={local},mode=max",
        "--cache-to", f"type=registry,ref={ref},mode=max", env=epoch,
    )  # fmt: skip
    index = json.loads((local / "index.json").read_text())
    assert len(index["manifests"]) == 1  # one cache manifest, not one per platform
    for source in (f"type=local,src={local}", f"type=registry,ref={ref}"):
        shutil.rmtree(dockbuild.root)  # a fresh CI runner
        out = tmp_path / f"b-{source[5:10]}.tar"
        again = dockbuild.build(cross, *both, "-o", f"type=oci,dest={out}", "--cache-from", source, env=epoch)
        names = dict(re.findall(r"^#(\d+) (\[.*\] (?:RUN|COPY) .*)$", again.stderr, re.M))
        ends = dict(re.findall(r"^#(\d+) (CACHED|DONE)", again.stderr, re.M))
        steps = {name: ends.get(n) for n, name in names.items()}
        assert any("linux/arm64" in n for n in steps) and any("linux/amd64 stage-2" in n for n in steps)
        assert set(steps.values()) == {"CACHED"}, again.stderr
        assert _skopeo("inspect", "--raw", f"oci-archive:{out}") == _skopeo(
            "inspect", "--raw", f"oci-archive:{tmp_path / 'a.tar'}"
        )


def test_a_no_op_multi_platform_rebuild_is_served_from_the_result_records(
    dockbuild: DockbuildCLI, cross: Path, tmp_path: Path
) -> None:
    import sys

    def build(platforms: str, name: str) -> tuple[bytes, bool, str]:
        out = tmp_path / name
        cmd = [
            sys.executable, "-X", "importtime", "-m", "dockbuild", "--progress=plain", *dockbuild.base_context,
            "--platform", platforms, "-o", f"type=oci,dest={out}", str(cross),
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=dockbuild.env({"SOURCE_DATE_EPOCH": "1700000000"}), capture_output=True, timeout=300)
        err = proc.stderr.decode()
        assert proc.returncode == 0, err
        return out.read_bytes(), "dockbuild.frontend.convert" not in err, err

    first, served, _ = build("linux/amd64,linux/arm64", "a.tar")
    assert not served
    again, served, log = build("linux/amd64,linux/arm64", "b.tar")
    assert served and again == first  # the frontend never loaded, the same index
    assert "[linux/amd64->arm64 build 2/2] RUN mkdir /out" in log and "CACHED" in log
    # Another platform list is another request: its own records.
    _, served, _ = build("linux/arm64,linux/amd64", "c.tar")
    assert not served
    _, served, _ = build("linux/amd64", "d.tar")
    assert not served
    (cross / "arch-arm64").write_text("changed\n")  # a context file one platform reads
    changed, served, _ = build("linux/amd64,linux/arm64", "e.tar")
    assert not served and changed != first


def test_debug_llb_prints_each_platforms_graph(dockbuild: DockbuildCLI, cross: Path) -> None:
    one = json.loads(dockbuild("debug", "llb", *dockbuild.base_context, "--platform", "arm64", str(cross)).out)
    assert one["config"]["architecture"] == "arm64"
    both = json.loads(
        dockbuild("debug", "llb", *dockbuild.base_context, "--platform", "linux/amd64,arm64", str(cross)).out
    )
    graphs = both["platforms"]
    assert list(graphs) == ["linux/amd64", "linux/arm64"]
    assert [graphs[p]["config"]["architecture"] for p in graphs] == ["amd64", "arm64"]
    names = {p: {op["name"]: op["digest"] for op in g["llb"]["ops"] if op.get("name")} for p, g in graphs.items()}
    tool = "[linux/amd64 tools 2/2] RUN echo tool > /tool"
    assert names["linux/amd64"][tool] == names["linux/arm64"][tool]  # shared, solved once
    assert any(n.startswith("[linux/arm64 stage-2") for n in names["linux/arm64"])
