"""Exporters: turn a solved result into a directory, a tarball or an image."""
