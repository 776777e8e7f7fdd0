"""`python -m dockbuild` runs the CLI."""

from dockbuild.cli import main

main()
