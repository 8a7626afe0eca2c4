"""The `kbmesh` command line (see docs/cli.md)."""

from kbmesh.cli.main import main

__all__ = ["main"]
