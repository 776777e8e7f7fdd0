"""The ``dockbuild`` command's entry point (also ``python -m dockbuild``).

``--version`` is answered here, before the CLI (argparse, its parsers) is loaded: scripts
and CI call it often, and it should cost no more than the interpreter.
"""

import gc
import sys


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-v"]):
        from dockbuild import __version__

        print(f"dockbuild {__version__}")
        return
    # Start-up allocates hundreds of thousands of long-lived objects (modules, classes,
    # the typed instructions) and hardly any cycles: collecting them is wasted work
    # (about 15% of a cached build's CPU). Collect rarely, and never the start-up heap.
    gc.set_threshold(50_000, 20, 100)
    from dockbuild.cli import main as cli_main

    gc.freeze()

    cli_main()


if __name__ == "__main__":
    main()
