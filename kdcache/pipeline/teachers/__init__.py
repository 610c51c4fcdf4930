"""Teacher backends, by name. Add one by decorating a factory with ``@register_backend("name")``."""

from kdcache.pipeline.teachers import encoder_backend, module_backend, transformers_backend, media_backend, vllm_backend  # noqa: F401  (register the backends)
from kdcache.pipeline.teachers.base import (
    BACKENDS,
    GenerateRequest,
    Request,
    ScoreRequest,
    Teacher,
    build_teacher,
    register_backend,
    resolve_blocks,
    resolve_layers,
)

__all__ = ["BACKENDS", "GenerateRequest", "Request", "ScoreRequest", "Teacher", "build_teacher", "register_backend", "resolve_blocks", "resolve_layers"]
