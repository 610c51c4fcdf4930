"""kdcache: run a teacher once into a durable cache, distil many students from it.

Subpackages: ``kdcache.cache`` (the on-disk contract), ``kdcache.pipeline`` (teachers, the generate
stage), ``kdcache.train`` (the streaming trainer) and ``kdcache.cli`` (the command line and the demo,
above both stages). Dependencies point ``cli -> {pipeline, train} -> cache``: ``train`` never imports
the pipeline, ``pipeline`` never imports ``train``, and ``cache`` knows nothing of models.
"""

__version__ = "0.1.0"  # the one place: pyproject reads it (tool.setuptools.dynamic), `kdcache --version` prints it
