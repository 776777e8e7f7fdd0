"""Run the fork server: ``python -I -S forkserver/__main__.py FD SANDBOX``."""

import os
import sys

# -I leaves the script's own directory off sys.path: put the package's parent there, so
# the package imports as ``forkserver`` without importing dockbuild (or anything else).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (mypy knows the package by its dockbuild name only.)
from forkserver.server import main  # type: ignore[import-not-found]  # noqa: E402 (needs the path above)

main(sys.argv)
