"""Generation as a job array: which input rows a task scores, where its part goes, and the scheduler's defaults.

The split: input row r (counted from 0 in the dataset's fixed order, after ``data.where`` and ``data.max_rows``)
belongs to part ``r % num_shards``. It needs no row count (a streamed hub dataset has none before it is read to
the end), spreads long and short rows, and sorted data, evenly over the parts, and keeps every example id the
global row index, so a merged cache has the ids, the content and the held-out split (a hash of the id) of one
process run over the whole dataset. Each task reads every row and tokenises and scores its own. Part I of N is a
cache of its own in ``OUT/part-IIIII-of-NNNNN`` (resumed by rerunning its task); ``kdcache merge OUT`` joins them.

Defaults from the environment (:func:`from_environment`, used by ``kdcache generate`` only: a library call, the
demo or born-again never split by themselves):

- the part: ``SLURM_ARRAY_TASK_ID`` (a Slurm array task), else ``JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job);
- the number of parts: ``KDCACHE_NUM_SHARDS``, else ``SLURM_ARRAY_TASK_COUNT``, else ``SLURM_ARRAY_TASK_MAX + 1``
  (where the count is not set). A Kubernetes Job does not tell its pods its completions: pass ``--num-shards``
  or set ``KDCACHE_NUM_SHARDS`` there, or the task is refused.

Slurm array ids are the part indices themselves, so an array must be numbered from 0 (``--array=0-9``, any
``%`` throttle); rerunning some tasks (``sbatch --array=3,7``) then redoes exactly parts 3 and 7, given the whole
split's ``--num-shards`` (Slurm counts only the rerun's tasks). A task whose array holds an id at or above the
number of parts (``--array=1-10`` for 10 parts, or a rerun without ``--num-shards``) is refused before anything
runs, naming the fix. ``--num-shards 1`` runs unsplit in any array (a sweep of several caches).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Mapping

from kdcache.cache.filesystem import as_path
from kdcache.cache.manifest import MANIFEST_NAME, PART_DIR_RE, part_dir_name, read_manifest
from kdcache.cache.merge import CREATED_BY, JOB_ARRAY, part_settings
from kdcache.errors import CacheMismatchError, ConfigError
from kdcache.pipeline.config import GenerateConfig

log = logging.getLogger(__name__)

COUNT_VAR = "KDCACHE_NUM_SHARDS"


def owner(index: int, num_shards: int) -> int:
    """The part that holds input row ``index``."""
    return index % num_shards


def parts(cfg: GenerateConfig) -> tuple[int, int]:
    """(num_shards, shard_index) of a config; unset fields are 1 and 0 (no split)."""
    n = 1 if cfg.num_shards is None else cfg.num_shards
    i = 0 if cfg.shard_index is None else cfg.shard_index
    if i >= n:
        raise ConfigError(f"shard_index {i} must be below num_shards {n} (parts are numbered 0 to {n - 1}); "
                          "pass the number of parts with --num-shards")
    return n, i


def is_part(cfg: GenerateConfig) -> bool:
    """Whether ``cfg`` writes one part of a split (num_shards > 1)."""
    return parts(cfg)[0] > 1


def job_array_settings(cfg: GenerateConfig) -> dict:
    """The settings a part adds (under ``job_array``); nothing without a split, so one process's cache keeps its hash."""
    n, i = parts(cfg)
    return {JOB_ARRAY: part_settings(n, i)} if n > 1 else {}


def keeps(cfg: GenerateConfig) -> Callable[[int], bool]:
    """Whether this task scores input row ``index``."""
    n, i = parts(cfg)
    return (lambda index: True) if n == 1 else (lambda index: owner(index, n) == i)


def cache_dir(cfg: GenerateConfig) -> Path:
    """Where the cache of ``cfg`` goes: ``out``, or the part's folder in it."""
    n, i = parts(cfg)
    return as_path(cfg.out) / part_dir_name(i, n) if n > 1 else as_path(cfg.out)


def part_config(cfg: GenerateConfig) -> GenerateConfig:
    """``cfg`` with ``out`` set to this task's part folder (unchanged without a split), once OUT is known to hold
    nothing else: another split's parts, a cache of its own, or a merged cache that ``--overwrite`` would break."""
    n, i = parts(cfg)
    out = as_path(cfg.out)
    others = sorted(p.name for p in out.iterdir() if PART_DIR_RE.fullmatch(p.name)) if out.is_dir() else []
    if n == 1:
        if others and not (out / MANIFEST_NAME).exists():
            raise CacheMismatchError(
                f"{out} holds the parts of a job array ({others[0]}, ...), and this run is not one of them (one part); pass "
                f"--num-shards N --shard-index I to write a part, `kdcache merge {out}` to join them, or another --out")
        return cfg
    other_splits = sorted({name for name in others if not name.endswith(f"-of-{n:05d}")})
    if other_splits:
        raise CacheMismatchError(
            f"{out} holds parts of another split ({other_splits[0]}), and this is part {i} of {n}: pass that split's "
            f"--num-shards (rerunning some Slurm tasks counts only those: give the whole split's), or use another --out")
    if (out / MANIFEST_NAME).exists():
        merged = read_manifest(out)
        if merged.created_by != CREATED_BY or (merged.settings.get(JOB_ARRAY) or {}).get("num_shards") != n:
            raise CacheMismatchError(f"{out} is a cache itself; the parts of a job array go into part folders of a folder "
                                     "of their own: choose another --out")
        if cfg.overwrite:
            raise CacheMismatchError(
                f"{out} is the merged cache of these parts and lists this part's shards; --overwrite would remove them "
                f"from under it: remove {out / MANIFEST_NAME} first (the parts stay), then regenerate and merge again")
    part = cache_dir(cfg)
    log.info("job array: part %d of %d (input rows r with r %% %d == %d) into %s", i, n, n, i, part)
    return dataclasses.replace(cfg, out=str(part))


def from_environment(cfg: GenerateConfig, env: Mapping[str, str] | None = None) -> GenerateConfig:
    """``cfg`` with an unset ``num_shards``/``shard_index`` taken from a job scheduler's environment (see the
    module's docstring); given values are kept. Raises ConfigError, naming the fix, where they do not add up."""
    env = os.environ if env is None else env
    n, i = cfg.num_shards, cfg.shard_index
    slurm, k8s = "SLURM_ARRAY_TASK_ID" in env, "JOB_COMPLETION_INDEX" in env
    count_from = "--num-shards"
    if n is None:
        if COUNT_VAR in env:
            n, count_from = _int(env, COUNT_VAR), COUNT_VAR
        elif slurm and "SLURM_ARRAY_TASK_COUNT" in env:
            n, count_from = _int(env, "SLURM_ARRAY_TASK_COUNT"), "SLURM_ARRAY_TASK_COUNT"
        elif slurm and "SLURM_ARRAY_TASK_MAX" in env:
            n, count_from = _int(env, "SLURM_ARRAY_TASK_MAX") + 1, "SLURM_ARRAY_TASK_MAX + 1"
        elif i is None and (slurm or k8s):
            what = (f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']} (a Slurm array task without SLURM_ARRAY_TASK_COUNT or _MAX)"
                    if slurm else f"JOB_COMPLETION_INDEX={env['JOB_COMPLETION_INDEX']} (a Kubernetes Indexed Job)")
            raise ConfigError(f"{what} names this task's part, not how many parts there are: pass --num-shards N "
                              f"(the job's size) or set {COUNT_VAR}=N, or --num-shards 1 to write one whole cache")
        else:
            n, count_from = 1, "the default"
    if n < 1:
        raise ConfigError(f"{count_from} is {n}; the number of parts must be positive")
    # An explicit single part (--num-shards 1, KDCACHE_NUM_SHARDS=1) ignores the array: a sweep of whole caches.
    from_slurm = i is None and slurm and (n > 1 or count_from.startswith("SLURM"))
    if from_slurm:
        i = _int(env, "SLURM_ARRAY_TASK_ID")
        top = max(i, _int(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else i)
        if top >= n:
            raise ConfigError(
                f"this Slurm array's task ids go up to {top}, but there are {n} parts (from {count_from}) and a task's id is its "
                f"part, 0 to {n - 1}: number the array from 0 (sbatch --array=0-{n - 1}), and when rerunning some tasks pass "
                "the whole split's --num-shards (Slurm counts only the rerun's tasks)")
    elif i is None and n > 1:
        if not k8s:
            raise ConfigError(f"{n} parts (from {count_from}) but no part given, and no job array in the environment "
                              "(SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX): pass --shard-index I")
        i = _int(env, "JOB_COMPLETION_INDEX")
        if i >= n:
            raise ConfigError(f"JOB_COMPLETION_INDEX={i} is not below the {n} parts (from {count_from}): pass the Job's "
                              "completions as --num-shards")
    elif i is None:
        i = 0
    elif i >= n:
        raise ConfigError(f"shard_index {i} must be below num_shards {n} (from {count_from}); parts are numbered 0 to {n - 1}")
    if n > 1 and (cfg.num_shards is None or cfg.shard_index is None):
        log.info("job array from the environment: part %d of %d", i, n)
    return dataclasses.replace(cfg, num_shards=n, shard_index=i)


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        value = int(env[name])
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not a whole number; fix the job's environment or pass "
                          "--num-shards and --shard-index") from None
    if value < 0:
        raise ConfigError(f"{name}={value} is negative; fix the job's environment or pass --num-shards and --shard-index")
    return value
