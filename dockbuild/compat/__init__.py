"""Command-line front ends for CI pipelines written for other builders (kaniko, buildctl)."""
