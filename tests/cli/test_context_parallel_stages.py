"""Independent stages are solved at the same time, up to ``[worker.oci] max-parallelism``
(config file) steps at once, through the real CLI. Two stages meet through a shared cache
mount: each waits (up to 3 s) for the other to have started."""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context

WAIT = "i=0; until [ -e /c/{other} ] || [ $i -ge 30 ]; do sleep 0.1; i=$((i+1)); done"
DOCKERFILE = "".join(
    f"FROM busybox AS {me}\n"
    f"RUN --mount=type=cache,target=/c,id=meet touch /c/{me} && {WAIT.format(other=other)} "
    f"&& ls /c > /seen-{me}\n"
    for me, other in (("a", "b"), ("b", "a"))
) + "FROM busybox\nCOPY --from=a /seen-a /\nCOPY --from=b /seen-b /\n"


@pytest.mark.parametrize("limit", [None, 1])
def test_independent_stages_run_together_up_to_the_limit(
    dockbuild: DockbuildCLI, tmp_path: Path, limit: int | None
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": DOCKERFILE})
    config = tmp_path / "config.toml"
    config.write_text(f"[worker.oci]\nmax-parallelism = {limit}\n" if limit else "")
    out = tmp_path / "out"
    dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={out}", str(ctx),
              env={"DOCKBUILD_CONFIG": str(config)})
    seen = [(out / f"seen-{s}").read_text().split() for s in "ab"]
    if limit is None:
        assert seen == [["a", "b"], ["a", "b"]]  # each saw the other running
    else:
        assert sorted(map(len, seen)) == [1, 2]  # one ran alone, the other after it


def test_the_first_failure_stops_the_build_and_is_the_error_reported(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    import time

    ctx = write_context(tmp_path / "ctx", {"Dockerfile": (
        "FROM busybox AS fails\nRUN sleep 0.3; exit 7\n"
        "FROM busybox AS slow\nRUN sleep 60\n"
        "FROM busybox\nCOPY --from=slow /etc/passwd /slow\nCOPY --from=fails /etc/passwd /fails\n"
    )})
    start = time.monotonic()
    run = dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={tmp_path / 'o'}",
                    str(ctx), check=False)
    assert run.returncode == 1
    assert time.monotonic() - start < 30  # the 60 s step was stopped, not waited for
    assert "exit code: 7" in run.stderr.splitlines()[-1]
    assert "Dockerfile:2" in run.stderr and "Traceback" not in run.stderr
