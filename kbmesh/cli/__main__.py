"""`python -m kbmesh.cli`: the same as the `kbmesh` console script."""

from kbmesh.cli.main import run

run()
