"""Turn a teacher that only transformers can read (a .gguf file) into a ``save_pretrained`` folder.

vLLM loads model folders; transformers dequantises GGUF files on load but refuses to save such a
model ("quantized with gguf ... not serializable"), so the weights are moved into a fresh model of the
same architecture without the quantization config and saved from there. Save in float32 when the
caches of both backends must agree to 1e-4 (bf16 rounding alone moves log-probabilities by ~1e-2).

The folder's files are written under a temporary name, fsynced and moved into place; ``OUT/.kdcache-convert``
lists them, so ``--overwrite`` removes exactly what an earlier convert wrote and nothing else of the user's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath

import torch

from kdcache.cache.manifest import fsync_dir, fsync_file, temp_suffix, write_atomic
from kdcache.errors import ConfigError
from kdcache.pipeline.teachers.transformers_backend import _DTYPES, load_tokenizer, locate_model
from kdcache.weights import load_error, refuse_pickle_only
from kdcache.locations import check_model_folder

log = logging.getLogger(__name__)

MARKER = ".kdcache-convert"
"""JSON ``{"files": [...]}``: the relative names of the files convert wrote into OUT (no .json suffix, so the
teacher weights fingerprint, which covers *.json, does not see it)."""


def convert_model(src: str, out: str | Path, dtype: str = "float32", overwrite: bool = False,
                  allow_pickle_weights: bool = False) -> Path:
    """Write ``src`` (a .gguf file, model folder or hub id) as a safetensors model folder at ``out``."""
    check_model_folder(src, "model", "SRC")
    from transformers import AutoModelForCausalLM

    out = Path(out)
    previous: list[str] = []  # what an earlier convert wrote into out: all --overwrite may remove
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            if (out / "config.json").is_file():
                log.info("%s already holds a model; nothing to do (pass --overwrite to redo it)", out)
                return out
            raise ConfigError(f"{out} exists and is not empty; pass another directory")
        previous = _previous_files(out)
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    folder, gguf, is_local = locate_model(src)
    if is_local and not gguf and not allow_pickle_weights:  # GGUF is not pickle
        refuse_pickle_only(folder, "model", "allow_pickle_weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf, dtype=_DTYPES[dtype], use_safetensors=None if gguf or allow_pickle_weights else True
        )
    except (OSError, ValueError) as exc:
        raise load_error("model", src, exc, allow_pickle_weights, "allow_pickle_weights") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    fresh.load_state_dict(model.state_dict(), assign=True, strict=False)
    fresh.tie_weights()
    # This run's own temporary folder (pid + random token): another convert into the same OUT has its own,
    # and only this one is ever removed.
    tmp = out.with_name(f".{out.name}.tmp.{temp_suffix()}")
    try:
        fresh.save_pretrained(tmp)
        load_tokenizer(src).save_pretrained(tmp)
        written = sorted(str(p.relative_to(tmp).as_posix()) for p in tmp.rglob("*") if p.is_file())
        _install(tmp, out, written, previous)
    finally:
        if tmp.exists():  # moved into place as OUT, or emptied into it, on success
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _previous_files(out: Path) -> list[str]:
    """The files an earlier convert wrote into the non-empty folder ``out``, from its list. A folder
    without the list is someone else's (or an older kdcache's): --overwrite refuses to touch it."""
    marker = out / MARKER
    if not marker.is_file():
        raise ConfigError(
            f"{out} holds files kdcache convert did not write (no {MARKER} list), and --overwrite removes only a "
            "convert's own files; pass an empty or new directory (or empty this one yourself)"
        )
    try:
        files = json.loads(marker.read_text())["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) and _plain_relative(f) for f in files):
            raise ValueError("not a list of relative file names")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{marker} is not a kdcache convert list ({exc}); remove the folder {out} yourself or pass another OUT") from None
    return files


def _plain_relative(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def _install(tmp: Path, out: Path, written: list[str], previous: list[str]) -> None:
    """Make ``out`` hold ``written`` (from ``tmp``), removing only ``previous`` (what an earlier convert wrote)."""
    _fsync_files(tmp, written)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        (tmp / MARKER).write_text(json.dumps({"files": written}, indent=1))
        _fsync_files(tmp, [MARKER])
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    ours = set(previous)
    clash = sorted(f for f in written if (out / f).exists() and f not in ours)
    if clash:  # the caller removes tmp
        raise ConfigError(f"{out / clash[0]} was not written by kdcache convert and would be replaced; move it away or pass another OUT")
    # The list names old and new files while they change places, so a crash leaves nothing unaccounted for.
    write_atomic(out / MARKER, json.dumps({"files": sorted(ours | set(written))}, indent=1).encode())
    for name in sorted(ours - set(written)):
        (out / name).unlink(missing_ok=True)
    for name in written:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, out / name)
    fsync_dir(out)
    write_atomic(out / MARKER, json.dumps({"files": written}, indent=1).encode())


def _fsync_files(root: Path, names: list[str]) -> None:
    for name in names:
        fsync_file(root / name)
    fsync_dir(root)
