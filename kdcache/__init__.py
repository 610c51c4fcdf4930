"""kdcache: run a teacher once into a durable cache, distil many students from it.

Subpackages: ``kdcache.cache`` (the on-disk contract), ``kdcache.pipeline`` (teachers, the generate
stage, the CLI) and ``kdcache.train`` (the streaming trainer). ``train`` never imports teacher
backends and ``cache`` knows nothing of models.
"""

__version__ = "0.1.0"
