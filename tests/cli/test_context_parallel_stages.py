"""Independent stages are solved at the same time, up to ``[worker.oci] max-parallelism``
(config file) steps at once, through the real CLI. Two stages meet through a shared cache
mount: each waits for the other to have started, for as long as it may take when the two
run together, and only a moment when they cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context


def _wait_for(path: str, tenths: int) -> str:
    """Shell: wait until ``path`` exists, ``tenths`` tenths of a second at most."""
    return f"i=0; until [ -e {path} ] || [ $i -ge {tenths} ]; do sleep 0.1; i=$((i+1)); done"


def _meeting_stages(wait_tenths: int) -> str:
    return "".join(
        f"FROM busybox AS {me}\n"
        f"RUN --mount=type=cache,target=/c,id=meet touch /c/{me} && {_wait_for(f'/c/{other}', wait_tenths)} "
        f"&& ls /c > /seen-{me}\n"
        for me, other in (("a", "b"), ("b", "a"))
    ) + "FROM busybox\nCOPY --from=a /seen-a /\nCOPY --from=b /seen-b /\n"


# The limit is set explicitly: the default is the machine's CPU count.
@pytest.mark.parametrize(("limit", "wait_tenths"), [(2, 1200), (1, 10)])
def test_independent_stages_run_together_up_to_the_limit(
    dockbuild: DockbuildCLI, tmp_path: Path, limit: int, wait_tenths: int
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": _meeting_stages(wait_tenths)})
    config = tmp_path / "config.toml"
    config.write_text(f"[worker.oci]\nmax-parallelism = {limit}\n")
    out = tmp_path / "out"
    dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={out}", str(ctx),
              env={"DOCKBUILD_CONFIG": str(config)})
    seen = [(out / f"seen-{s}").read_text().split() for s in "ab"]
    if limit == 2:
        assert seen == [["a", "b"], ["a", "b"]]  # each saw the other running
    else:
        assert sorted(map(len, seen)) == [1, 2]  # one ran alone, the other after it


def test_the_first_failure_stops_the_build_and_is_the_error_reported(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # The failing step fails only once the slow one runs, so the slow one is running then.
    meet = "RUN --mount=type=cache,target=/c,id=meet"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": (
        f"FROM busybox AS fails\n{meet} {_wait_for('/c/slow', 1200)}; exit 7\n"
        f"FROM busybox AS slow\n{meet} touch /c/slow && sleep 600\n"
        "FROM busybox\nCOPY --from=slow /etc/passwd /slow\nCOPY --from=fails /etc/passwd /fails\n"
    )})
    config = tmp_path / "config.toml"
    config.write_text("[worker.oci]\nmax-parallelism = 2\n")
    run = dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={tmp_path / 'o'}",
                    str(ctx), check=False, env={"DOCKBUILD_CONFIG": str(config)})
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    (slow,) = [line.split()[0] for line in lines if line.startswith("#") and line.endswith("sleep 600")]
    assert f"{slow} ERROR: the RUN step was cancelled" in lines  # stopped, not waited for
    assert f"{slow} DONE" not in run.stderr
    assert "exit code: 7" in [line for line in lines if line.startswith("ERROR:")][-1]
    assert "Dockerfile:2" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()
