"""Loading weights safely, for teachers (pipeline) and students (train) alike.

Pickle files (``pytorch_model.bin`` and kin) can run code when loaded, so a folder that has only those
is refused unless the user says they trust it; safetensors and GGUF cannot run code.
"""

from __future__ import annotations

from pathlib import Path

from kdcache.errors import ConfigError, KDCacheError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_only(folder: str | Path, what: str, flag: str) -> None:
    """A local model folder whose weights exist only as pickle files (``pytorch_model.bin``) is refused:
    unpickling can run code. safetensors (and GGUF) cannot; ``flag`` lets a user who trusts the file in."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if pickled:
        raise ConfigError(
            f"{what} {folder} has only pickle weights ({', '.join(pickled[:2])}), which can run code when loaded; "
            f"save it with safetensors (save_pretrained(..., safe_serialization=True)), or set {flag}=true if you trust the file"
        )


def load_error(what: str, model: str, exc: BaseException, allow_pickle: bool, flag: str) -> KDCacheError:
    """One line for a failed from_pretrained; a hub model without safetensors names the flag."""
    line = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    missing = "no file named" in str(exc) or "does not appear to have a file named" in str(exc)
    if not allow_pickle and missing and "safetensors" in str(exc):
        return KDCacheError(f"cannot load {what} weights from {model} as safetensors ({line}); "
                            f"only pickle weights may exist: set {flag}=true if you trust them")
    return KDCacheError(f"cannot load {what} weights from {model}: {line}")
