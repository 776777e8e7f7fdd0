from dockbuild.engine.sources.local import LocalDir
from dockbuild.frontend.dockerignore import parse_dockerignore


def test_comments_blank_lines_and_leading_slash_are_dropped():
    data = b"\xef\xbb\xbf# comment\n\n/build\n  *.log  \n!keep.log\n ./a/../b \n"
    assert parse_dockerignore(data) == ["build", "*.log", "!keep.log", "b"]


def test_last_match_wins_and_parent_dirs_exclude_their_contents(tmp_path):
    for rel in ["build/out.o", "src/a.log", "src/keep.log", "src/main.c", "deep/x/y/z.tmp"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)
    local = LocalDir(
        tmp_path, tuple(parse_dockerignore(b"build\n**/*.log\n!src/keep.log\n**/*.tmp\n"))
    )
    visible = set(local.walk())
    assert "build" not in visible and "build/out.o" not in visible
    assert "src/a.log" not in visible
    assert "src/keep.log" in visible
    assert "src/main.c" in visible
    assert "deep/x/y/z.tmp" not in visible
