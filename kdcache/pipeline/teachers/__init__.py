"""Teacher backends, by name. Add one by decorating a factory with ``@register_backend("name")``."""

from kdcache.pipeline.teachers import transformers_backend  # noqa: F401  (registers "transformers")
from kdcache.pipeline.teachers.base import BACKENDS, Teacher, build_teacher, register_backend, resolve_layers

__all__ = ["BACKENDS", "Teacher", "build_teacher", "register_backend", "resolve_layers"]
