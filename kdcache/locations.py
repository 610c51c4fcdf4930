"""Is a name a local path or a hub id? Answered before anything slow runs.

A teacher, student or dataset can be a local path or a Hugging Face hub id. Handing a mistyped local path
to the hub costs tens of seconds of retries offline and ends in a message about the network, never the
missing file; so a name that can only be a path (``./x``, ``data.jsonl``, ``a/b/c``) is refused at once,
and a name that could be a hub id is refused at once when the hub is unreachable and the local hub cache
does not hold it (the libraries would fail there anyway, after their retries).
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from kdcache.errors import ConfigError, DataError

# File suffixes that a hub id never ends with, but a local model or data file does.
_FILE_SUFFIXES = {".gguf", ".safetensors", ".bin", ".pt", ".jsonl", ".json", ".parquet", ".csv", ".txt", ".gz", ".zst", ".arrow", ".yaml", ".yml"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_path(name: str) -> bool:
    """True when ``name`` cannot be a hub id (``owner/name`` or ``name``), so it must be a local path."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return True
    if Path(name).suffix.lower() in _FILE_SUFFIXES:
        return True
    return not _HUB_ID.fullmatch(name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host name resolves (in a thread: resolution has no timeout of its own). Offline
    mode (``HF_HUB_OFFLINE``) counts as unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def in_hub_cache(name: str, kind: str) -> bool:
    """Whether the local hub cache holds ``name`` (so the libraries can load it offline)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", home / "hub")))
    return (cache / f"{kind}s--{name.replace('/', '--')}").is_dir()


def check_location(name: str, what: str, flag: str, kind: str = "model") -> None:
    """Raise one line if ``name`` is neither an existing local path nor a usable hub id.

    ``what``: what the name is for ("teacher", "student", "dataset"); ``flag``: where the user set it
    (``--teacher``); ``kind``: ``model`` or ``dataset`` (where the hub cache keeps it)."""
    if Path(name).expanduser().exists():
        return
    where = "at that path" if Path(name).expanduser().is_absolute() else f"by that name in {Path.cwd()}"
    missing = f"{what} {name!r} not found: no file or folder {where}"
    if looks_like_path(name):
        raise ConfigError(f"{missing}; pass an existing path to {flag}")
    if not in_hub_cache(name, kind) and not hub_reachable():
        raise ConfigError(
            f"{missing}, and the hub is unreachable from here, so it cannot be a hub id either; "
            f"pass an existing path to {flag} (or connect, or fill the hub cache first)"
        )


def check_model_folder(path: str, what: str, flag: str) -> None:
    """:func:`check_location` for a model, plus a folder that is not a model: a training run names its
    student (RUN/final)."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        if (p / "final" / "config.json").is_file():
            raise ConfigError(f"{path} is a training run, not a model folder; its {what} is {p / 'final'}: pass {flag} {p / 'final'}")
        if not any(p.glob("*.gguf")):
            raise ConfigError(f"{path} holds no config.json, so it is not a save_pretrained model folder; pass one to {flag} (a run's student is RUN/final)")
    check_location(path, what, flag)


def path_inside(root: str | Path, value: object, setting: str, what: str = "path") -> Path:
    """The file a row names (``value``, relative to ``root``), refused unless it is a relative path that stays
    inside ``root``: paths read from data never reach other files. ``setting`` names the root in the message."""
    base = Path(root or ".").expanduser().resolve()
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        raise DataError(f"{what} {value!r} must be a relative path inside {setting} ({base})")
    path = (base / value).resolve()
    if base not in path.parents:
        raise DataError(f"{what} {value!r} leaves {setting} {base}; paths must stay inside it")
    return path
