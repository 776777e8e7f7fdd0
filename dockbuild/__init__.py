"""dockbuild: a daemonless, Dockerfile-first container image builder."""

__version__ = "0.1.0"
