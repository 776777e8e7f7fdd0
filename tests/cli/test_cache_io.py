"""--cache-to / --cache-from through the real CLI: a CI runner with an empty cache root
gets every step from an exported cache (a local directory or a real registry)."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from clitools import DockbuildCLI, read_oci, write_context

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}

APP = """\
FROM {base} AS deps
RUN echo "deps installed" > /deps.txt
FROM deps
WORKDIR /app
COPY src/ ./src/
RUN cat ./src/main.txt > ./built.txt
"""


def manifest_digest(path: Path) -> str:
    with tarfile.open(path) as tf:
        return json.loads(tf.extractfile("index.json").read())["manifests"][0]["digest"]  # type: ignore[union-attr]


def step_lines(stderr: str) -> dict[str, str]:
    """Step name -> CACHED / DONE, from plain progress."""
    names = dict(re.findall(r"^#(\d+) (\[.*)$", stderr, re.M))
    ends = dict(re.findall(r"^#(\d+) (CACHED|DONE)", stderr, re.M))
    return {name: ends.get(n, "?") for n, name in names.items()}


def test_cache_roundtrip_through_a_registry_gives_every_step_cached_and_the_same_image(
    dockbuild: DockbuildCLI, tmp_path: Path, registry, busybox_ref: str  # type: ignore[no-untyped-def]
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": APP.format(base=busybox_ref), "src/main.txt": "v1\n"})
    cache_ref = f"{registry.host}/cache/app:buildcache"
    first = dockbuild(
        "--progress=plain", "-o", f"type=oci,dest={tmp_path / 'a.tar'}",
        "--cache-to", f"type=registry,ref={cache_ref},mode=max", str(ctx), env=EPOCH,
    )
    assert "exporting cache to type=registry" in first.stderr
    shutil.rmtree(dockbuild.root)  # a fresh CI runner
    second = dockbuild(
        "--progress=plain", "-o", f"type=oci,dest={tmp_path / 'b.tar'}",
        "--cache-from", f"type=registry,ref={cache_ref}", str(ctx), env=EPOCH,
    )
    steps = {name: state for name, state in step_lines(second.stderr).items() if re.match(r"\[\S* ?\d", name)}
    assert steps and all(state == "CACHED" for state in steps.values()), second.stderr
    assert manifest_digest(tmp_path / "a.tar") == manifest_digest(tmp_path / "b.tar")
    # Every step cached and an image export: the layers came as blobs, none was unpacked.
    assert not any((dockbuild.root / "snapshots").iterdir())
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"
    # A changed source file: the cached dependency step is still reused, and the steps
    # that run again get its files (unpacked now).
    (ctx / "src" / "main.txt").write_text("v2\n")
    shutil.rmtree(dockbuild.root)
    third = dockbuild("--progress=plain", "--cache-from", cache_ref, "-o", f"type=local,dest={tmp_path / 'c'}", str(ctx))
    lines = step_lines(third.stderr)
    assert [s for n, s in lines.items() if "RUN echo" in n] == ["CACHED"], third.stderr
    assert [s for n, s in lines.items() if "COPY src/" in n] == ["DONE"], third.stderr
    assert (tmp_path / "c" / "app" / "built.txt").read_text() == "v2\n"


def test_local_cache_export_min_mode_and_tags_and_a_missing_cache_is_not_an_error(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": APP.format(base="busybox"), "src/main.txt": "v1\n"})
    cache = tmp_path / "cache-dir"
    missing = dockbuild.build(ctx, "--cache-from", f"type=local,src={cache}", "-o", f"type=local,dest={tmp_path / 'o0'}")
    assert "cache not imported" in missing.stderr
    shutil.rmtree(dockbuild.root)
    dockbuild.build(
        ctx, "--cache-to", f"type=local,dest={cache},tag=v1", "-o", f"type=oci,dest={tmp_path / 'a.tar'}", env=EPOCH
    )
    index = json.loads((cache / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["v1"]
    shutil.rmtree(dockbuild.root)
    again = dockbuild.build(
        ctx, "--cache-from", f"type=local,src={cache},tag=v1", "-o", f"type=oci,dest={tmp_path / 'b.tar'}", env=EPOCH
    )
    assert manifest_digest(tmp_path / "a.tar") == manifest_digest(tmp_path / "b.tar")
    assert all(s == "CACHED" for n, s in step_lines(again.stderr).items() if re.match(r"\[\S* ?\d", n)), again.stderr
    bad = dockbuild.build(ctx, "--cache-to", "type=gha", check=False)
    assert bad.returncode == 2 and "cache type 'gha' is not supported" in bad.stderr
    nodest = dockbuild.build(ctx, "--cache-to", "type=local", check=False)
    assert nodest.returncode == 2 and "needs dest=DIRECTORY" in nodest.stderr
    ignored = dockbuild.build(
        ctx, "--cache-to", "type=local,dest=/proc/no-such-place,ignore-error=true",
        "-o", f"type=local,dest={tmp_path / 'o2'}",
    )
    assert "ignored:" in ignored.stderr


def test_a_cache_naming_paths_outside_the_store_is_refused_and_the_build_goes_on(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    import hashlib

    ctx = write_context(tmp_path / "ctx", {"Dockerfile": APP.format(base="busybox"), "src/main.txt": "v1\n"})
    cache = tmp_path / "cache-dir"
    dockbuild.build(ctx, "--cache-to", f"type=local,dest={cache}", "-o", f"type=local,dest={tmp_path / 'a'}")
    blobs = cache / "blobs" / "sha256"

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    # A tampered export: a layer id that climbs out of snapshots/.
    escape = "../../../escaped"
    index = json.loads((cache / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
    data = config["dockbuild.cache.v1"]
    victim = data["records"][-1]["layers"][-1]
    for layer in data["layers"]:
        layer["id"] = escape if layer["id"] == victim else layer["id"]
    for record in data["records"]:
        record["layers"] = [escape if lid == victim else lid for lid in record["layers"]]
    config_bytes = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": put(config_bytes), "size": len(config_bytes)}
    manifest_bytes = json.dumps(manifest).encode()
    index["manifests"][0].update(digest=put(manifest_bytes), size=len(manifest_bytes))
    (cache / "index.json").write_text(json.dumps(index))

    shutil.rmtree(dockbuild.root)
    run = dockbuild.build(ctx, "--cache-from", f"type=local,src={cache}", "-o", f"type=local,dest={tmp_path / 'b'}")
    assert "cache not imported: type=local" in run.stderr and "invalid record" in run.stderr, run.stderr
    assert (tmp_path / "b" / "app" / "built.txt").read_text() == "v1\n"  # built without it
    assert not (dockbuild.root / "snapshots" / escape).resolve().exists()


def test_cache_mounts_travel_with_the_cache_when_asked(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nARG RUN_ID=1\n"
            "RUN --mount=type=cache,target=/var/cache/pkgs echo run-$RUN_ID >> /var/cache/pkgs/log"
            " && cp /var/cache/pkgs/log /seen\n",
        },
    )
    cache = tmp_path / "ci-cache"
    dockbuild.build(ctx, "--cache-to", f"type=local,dest={cache},cache-mounts=true", "-o", f"type=local,dest={tmp_path / 'a'}")
    assert (tmp_path / "a" / "seen").read_text() == "run-1\n"
    listed = dockbuild("du", "--filter", "type==exec.cachemount").out
    assert re.search(r"exec\.cachemount\s+\S+\s+.*cache mount /var/cache/pkgs", listed), listed
    shutil.rmtree(dockbuild.root)  # the next ephemeral runner
    run = dockbuild.build(
        ctx, "--build-arg", "RUN_ID=2", "--cache-from", f"type=local,src={cache}", "-o", f"type=local,dest={tmp_path / 'b'}"
    )
    assert "restored 1 cache mount(s)" in run.stderr
    assert (tmp_path / "b" / "seen").read_text() == "run-1\nrun-2\n"  # the mount kept its contents
    shutil.rmtree(dockbuild.root)
    dockbuild.build(ctx, "--cache-to", f"type=local,dest={cache}", "-o", f"type=local,dest={tmp_path / 'c'}")
    shutil.rmtree(dockbuild.root)
    plain = dockbuild.build(
        ctx, "--build-arg", "RUN_ID=3", "--cache-from", f"type=local,src={cache}", "-o", f"type=local,dest={tmp_path / 'd'}"
    )
    assert "restored" not in plain.stderr  # without cache-mounts=true, BuildKit's behaviour
    assert (tmp_path / "d" / "seen").read_text() == "run-3\n"


def test_inline_cache_in_a_pushed_image_is_enough_for_a_fresh_runner(
    dockbuild: DockbuildCLI, tmp_path: Path, registry, busybox_ref: str  # type: ignore[no-untyped-def]
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": APP.format(base=busybox_ref), "src/main.txt": "v1\n"})
    image = f"{registry.host}/inline/app:1"
    meta = tmp_path / "meta.json"
    dockbuild("--progress=plain", "-t", image, "--push", "--cache-to", "type=inline",
              "--metadata-file", str(meta), str(ctx), env=EPOCH)  # fmt: skip
    pushed = json.loads(meta.read_text())["containerimage.digest"]
    shutil.rmtree(dockbuild.root)
    meta2 = tmp_path / "meta2.json"
    again = dockbuild("--progress=plain", "-t", image, "--push", "--cache-to", "type=inline",
                      "--cache-from", image, "--metadata-file", str(meta2), str(ctx), env=EPOCH)  # fmt: skip
    steps = {n: st for n, st in step_lines(again.stderr).items() if re.match(r"\[\S* ?\d", n)}
    assert steps and all(st == "CACHED" for st in steps.values()), again.stderr
    assert json.loads(meta2.read_text())["containerimage.digest"] == pushed
    bad = dockbuild("--cache-from", "type=inline", str(ctx), check=False)
    assert bad.returncode == 2 and "type=registry,ref=IMAGE" in bad.stderr


def test_a_fresh_runner_building_from_an_inline_cache_pushes_the_exporters_image_digest(
    dockbuild: DockbuildCLI, tmp_path: Path, registry, busybox_ref: str  # type: ignore[no-untyped-def]
) -> None:
    # No SOURCE_DATE_EPOCH: the history times are when each layer was made; the image's
    # own history carries them to the next runner. ENV and a RUN that changes nothing
    # add history entries without a layer.
    dockerfile = APP.format(base=busybox_ref).replace("WORKDIR /app\n", "ENV MODE=prod\nWORKDIR /app\nRUN true\n")
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": dockerfile, "src/main.txt": "v1\n"})
    image = f"{registry.host}/inline/times:1"
    dockbuild("--progress=plain", "-t", image, "--push", "--cache-to", "type=inline",
              "--metadata-file", str(tmp_path / "a.json"), str(ctx))  # fmt: skip
    pushed = json.loads((tmp_path / "a.json").read_text())["containerimage.digest"]
    exported = _pushed_config(registry, "inline/times", pushed)
    assert any(h.get("empty_layer") for h in exported["history"])
    shutil.rmtree(dockbuild.root)  # a fresh CI runner, a moment later
    again = dockbuild("--progress=plain", "-t", f"{registry.host}/inline/times:2", "--push", "--cache-to",
                      "type=inline", "--cache-from", image, "--metadata-file", str(tmp_path / "b.json"), str(ctx))  # fmt: skip
    steps = {n: s for n, s in step_lines(again.stderr).items() if re.match(r"\[\S* ?\d", n)}
    assert steps and all(s == "CACHED" for s in steps.values()), again.stderr
    rebuilt = json.loads((tmp_path / "b.json").read_text())["containerimage.digest"]
    history = _pushed_config(registry, "inline/times", rebuilt)["history"]
    assert [h.get("created") for h in history] == [h.get("created") for h in exported["history"]]
    assert rebuilt == pushed
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"


def _pushed_config(registry, repository: str, digest: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """The config of an image in the test registry."""
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    got = registry.session.get(f"{registry.url}/v2/{repository}/manifests/{digest}", headers={"Accept": accept}, timeout=30)
    got.raise_for_status()
    config = got.json()["config"]["digest"]
    blob = registry.session.get(f"{registry.url}/v2/{repository}/blobs/{config}", timeout=30)
    blob.raise_for_status()
    return blob.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("kind", "mode"), [("local", "min"), ("local", "max"), ("registry", "min"), ("registry", "max")])
def test_a_fresh_runner_importing_the_cache_gets_the_exporters_image_digest(
    dockbuild: DockbuildCLI, tmp_path: Path, request: pytest.FixtureRequest, kind: str, mode: str
) -> None:
    # No SOURCE_DATE_EPOCH: the history times are when each layer was made, and the
    # cache carries them to the next runner.
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": APP.format(base="busybox"), "src/main.txt": "v1\n"})
    if kind == "local":
        to, source = f"type=local,dest={tmp_path / 'exported'},mode={mode}", f"type=local,src={tmp_path / 'exported'}"
    else:
        ref = f"{request.getfixturevalue('registry').host}/cache/times-{mode}:1"
        to, source = f"type=registry,ref={ref},mode={mode}", f"type=registry,ref={ref}"
    dockbuild.build(ctx, "--cache-to", to, "-o", f"type=oci,dest={tmp_path / 'a.tar'}")
    shutil.rmtree(dockbuild.root)  # a fresh CI runner, a moment later
    again = dockbuild.build(ctx, "--cache-from", source, "-o", f"type=oci,dest={tmp_path / 'b.tar'}")
    steps = {n: s for n, s in step_lines(again.stderr).items() if re.match(r"\[\S* ?\d", n)}
    assert steps and all(s == "CACHED" for s in steps.values()), again.stderr
    a, b = read_oci(tmp_path / "a.tar"), read_oci(tmp_path / "b.tar")
    assert [h.get("created") for h in b.history] == [h.get("created") for h in a.history]
    assert manifest_digest(tmp_path / "a.tar") == manifest_digest(tmp_path / "b.tar")


def test_a_cache_exported_without_times_still_imports(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": APP.format(base="busybox"), "src/main.txt": "v1\n"})
    cache = tmp_path / "exported"
    dockbuild.build(ctx, "--cache-to", f"type=local,dest={cache}", "-o", f"type=oci,dest={tmp_path / 'a.tar'}")
    _strip_times(cache)  # as an older dockbuild wrote it
    shutil.rmtree(dockbuild.root)
    again = dockbuild.build(ctx, "--cache-from", f"type=local,src={cache}", "-o", f"type=oci,dest={tmp_path / 'b.tar'}")
    steps = {n: s for n, s in step_lines(again.stderr).items() if re.match(r"\[\S* ?\d", n)}
    assert steps and all(s == "CACHED" for s in steps.values()), again.stderr
    a, b = read_oci(tmp_path / "a.tar"), read_oci(tmp_path / "b.tar")
    assert b.manifest["layers"] == a.manifest["layers"]
    # Without the times, the imported layers are dated by the import.
    assert b.history[-1]["created"] != a.history[-1]["created"]
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"


def _strip_times(layout: Path) -> None:
    """Rewrite a local cache export without its records' and layers' ``created``."""
    import hashlib

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        return "sha256:" + digest

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    data = config["dockbuild.cache.v1"]
    assert all("created" in r for r in data["records"]) and all("created" in x for x in data["layers"])
    for entry in [*data["records"], *data["layers"]]:
        del entry["created"]
    config_bytes = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": put(config_bytes), "size": len(config_bytes)}
    manifest_bytes = json.dumps(manifest).encode()
    index["manifests"][0] = {**index["manifests"][0], "digest": put(manifest_bytes), "size": len(manifest_bytes)}
    (layout / "index.json").write_text(json.dumps(index))
