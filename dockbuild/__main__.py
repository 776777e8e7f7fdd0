"""The ``dockbuild`` command's entry point (also ``python -m dockbuild``).

``--version`` is answered here, before the CLI and its typer/click imports are loaded:
scripts and CI call it often, and it should cost no more than the interpreter.
"""

import sys


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-v"]):
        from dockbuild import __version__

        print(f"dockbuild {__version__}")
        return
    from dockbuild.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
