"""The ``kdcache`` command line and the demo: the layer above both stages (imports pipeline, train, cache)."""

from kdcache.cli.main import main

__all__ = ["main"]
