"""A training run's directory: created or resumed, never mixed with another run's config.

Shared by every trainer (``train``, ``classify``): the same config resumes from the latest checkpoint, a
different one is refused unless ``--resume`` (continue with the new config) or ``--overwrite`` (remove what
a run writes, and nothing else of the folder), and ``config.yaml`` records the config and the kdcache version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

import kdcache
from kdcache.config import to_dict
from kdcache.errors import CacheMismatchError, ConfigError
from kdcache.cache.manifest import fsync_dir
from kdcache.train.checkpoint import checkpoint_step, fsync_tree, latest_checkpoint, link_tree

log = logging.getLogger(__name__)

# Everything a run writes into its directory.
RUN_FILES = ("checkpoints", "final", ".final.tmp", "config.yaml", "metrics.jsonl", "final_metrics.json", "tensorboard")

# Fields that may change between a run and its resumption without changing what is being trained.
RESUME_NEUTRAL = ("resume", "overwrite", "steps", "eval_every", "log_every", "save_every", "keep_checkpoints", "device", "eval_max_examples", "eval_cache",
                  "prefetch", "distributed", "report_to")

# config.yaml's first line: the kdcache version that wrote it. A YAML comment, so the file stays a config that
# `--config` accepts (unknown keys are refused) and the resume check, which compares the parsed configs, ignores it.
VERSION_LINE = re.compile(r"# written by kdcache (\S+)")


def prepare_run_dir(cfg: Any, comparable: Callable[[dict], dict] = lambda d: d) -> tuple[Path, Path | None]:
    """Create ``cfg.out``; return it and the checkpoint to resume from (None: start). ``comparable`` maps a config
    dict (the saved one and the new one alike) to what the resume check compares."""
    out = Path(cfg.out)
    if cfg.overwrite and out.is_dir():
        for name in RUN_FILES:  # only what a run writes: --out may be a folder with other things in it
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-probe").write_bytes(b"")
        (out / ".write-probe").unlink()
    except OSError as exc:
        raise ConfigError(f"run directory {out} is not writable ({exc.strerror or exc}); choose another --out") from None
    ckpt = latest_checkpoint(out)
    saved = out / "config.yaml"
    if ckpt is not None and not cfg.resume and saved.is_file():
        old = comparable(yaml.safe_load(saved.read_text()) or {})
        new = comparable(to_dict(cfg))
        changed = sorted(k for k in set(old) | set(new) if k not in RESUME_NEUTRAL and old.get(k) != new.get(k))
        if changed:
            raise CacheMismatchError(
                f"{out} holds a run with a different config ({', '.join(changed[:4])} differ); "
                "pass --resume to continue it with the new config, --overwrite to start over, or another --out"
            )
    if cfg.resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", out)
    if ckpt is not None and saved.is_file():
        written_by = run_version(saved)
        if written_by != kdcache.__version__:
            log.info("resuming a run written by kdcache %s with kdcache %s", written_by or "(unknown version)", kdcache.__version__)
    saved.write_text(f"# written by kdcache {kdcache.__version__}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out, ckpt


def write_final(out: Path, saved: Path | None, step: int, model: Any, tokenizer: Any, extras: dict[str, Any] | None = None) -> Path:
    """``out/final``: the last checkpoint's model files as hard links when ``saved`` is the checkpoint of ``step``
    (else saved from memory), plus each extra model under its name, every file and folder fsynced before the
    folder is renamed into place (a power loss never leaves ``final/`` naming empty weights)."""
    final_dir, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if saved is not None and checkpoint_step(saved) == step:
        link_tree(saved / "model", tmp)  # the same weights and tokenizer: hard links, not a second copy
    else:  # every run ends with a checkpoint of its last step; should a folder's name disagree, save from memory
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:  # an image student has none
            tokenizer.save_pretrained(tmp)
    for name, m in (extras or {}).items():
        m.save_pretrained(tmp / name, safe_serialization=True)
        tokenizer.save_pretrained(tmp / name)
    fsync_tree(tmp)
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp.rename(final_dir)
    fsync_dir(out)
    return final_dir


def run_version(config_yaml: Path) -> str | None:
    """The kdcache version recorded in a run's config.yaml (None for one written before versions were recorded)."""
    with open(config_yaml) as f:
        m = VERSION_LINE.match(f.readline())
    return m.group(1) if m else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from, so the log has each step once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash we are recovering from
        if row.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


@contextlib.contextmanager
def transformers_bars(progress: bool):
    """progress=False also hides transformers' own bars (save_pretrained's "Writing model shards")."""
    from transformers.utils import logging as hf_logging

    turn_off = not progress and hf_logging.is_progress_bar_enabled()
    if turn_off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turn_off:
            hf_logging.enable_progress_bar()
