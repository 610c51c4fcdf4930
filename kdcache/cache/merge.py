"""``kdcache merge``: the parts of a job array joined into one cache by writing a manifest; no data is copied.

``kdcache generate --num-shards N --shard-index I --out OUT`` writes part I, the input rows whose index modulo N is
I, into ``OUT/part-IIIII-of-NNNNN/``: a cache of its own, resumed by rerunning its task, readable and verifiable on
its own. Once every part is complete, merging writes ``OUT/_manifest.json``, which lists each part's shards as
``part-IIIII-of-NNNNN/part-SSSSS.parquet`` (one level down, the one form besides a plain shard name that a manifest
may list: :func:`kdcache.cache.manifest.listed_name_ok`), and ``OUT/_tokenizer`` (a copy of part 0's, a few MB). OUT
is then a cache whose shards are the parts' own files: readers, ``verify``, ``inspect`` and training open it like
any other, and its examples (ids, tokens, every signal) are those of one process run over the whole dataset.

Refused in one line, with nothing written: a part missing or given twice, a part not complete, parts whose settings
(apart from their part index), signals or tokenizer differ, a shard a part lists that is not on disk with its
size, anything in OUT that is not one of the parts (a merged cache is OUT itself), and an OUT that already holds
another cache. Rerunning a merge that is done changes nothing. OUT's lock and every part's are held while merging,
so no ``generate`` writes a part meanwhile. Sizes are checked here, the bytes (sha256) by readers and
``kdcache verify``.
"""

from __future__ import annotations

import contextlib
import filecmp
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdcache.cache.filesystem import as_path, is_remote
from kdcache.cache.lock import LOCK_NAME, CacheLock
from kdcache.cache.manifest import (
    MANIFEST_NAME,
    PART_DIR_RE,
    SHARD_RE,
    TOKENIZER_DIR,
    Manifest,
    ShardInfo,
    part_dir_name,
    read_manifest,
    require_same_tokenizer,
    tokenizer_path,
    write_atomic,
)
from kdcache.cache.writer import install_tokenizer, is_temp_name
from kdcache.config import plural
from kdcache.errors import CacheFormatError, CacheMismatchError, ConfigError

log = logging.getLogger(__name__)

JOB_ARRAY = "job_array"
"""The settings key of a part (and of a merged cache); absent from a cache written by one process."""
SPLIT_RULE = "input_row % num_shards == shard_index"
"""Which input rows a part holds: input rows counted from 0 in the dataset's order, after ``data.where``."""
CREATED_BY = "kdcache merge"


def part_settings(num_shards: int, shard_index: int) -> dict:
    """What a part adds to its settings (so every part has its own settings hash)."""
    return {"num_shards": num_shards, "shard_index": shard_index, "rule": SPLIT_RULE}


def shared_settings(settings: dict) -> dict:
    """A part's settings without its part: the same for every part of one split."""
    return {k: v for k, v in settings.items() if k != JOB_ARRAY}


def part_folders(out: Path) -> list[Path]:
    """The part folders directly inside ``out``, by name."""
    return sorted(p for p in out.iterdir() if PART_DIR_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def merge_parts(out: str | Path, parts: list[str | Path] | None = None) -> Manifest:
    """Join the complete parts in ``out`` (``parts``: exactly these folders of ``out``; default: every part
    folder there) into the cache ``out``; returns its manifest."""
    out = as_path(out)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a folder; merge joins the parts that `kdcache generate --num-shards N --out {out}` "
                          f"wrote into {out}/part-IIIII-of-NNNNN")
    folders = _chosen(out, parts)
    with contextlib.ExitStack() as locks:  # OUT's first: one merge at a time; then each part's: no generate meanwhile
        for folder in (out, *folders):
            locks.enter_context(CacheLock(folder, command=f"{CREATED_BY} {out}"))
        manifests = [_read_part(f) for f in folders]
        merged = _merged(out, folders, manifests)
        if (out / MANIFEST_NAME).exists():
            return _already(out, merged)
        source = tokenizer_path(folders[0])
        if source.is_dir():
            target = out / TOKENIZER_DIR
            if target.exists() and not _same_tree(source, target):
                raise CacheMismatchError(f"{target} is not a copy of {source} (an earlier merge's would be); remove it and merge again")
            install_tokenizer(out, lambda tmp: copy_tree(source, tmp))  # nothing when it is there already
        write_atomic(out / MANIFEST_NAME, merged.to_json().encode())  # last: the commit marker
    log.info("merged %s into %s: %s, %s (no data copied)", plural(len(folders), "part"), out,
             plural(merged.num_rows, "row"), plural(len(merged.shards), "shard"))
    return merged


def _chosen(out: Path, parts: list[str | Path] | None) -> list[Path]:
    """The part folders to merge, checked to be folders of ``out`` and alone there."""
    if parts:
        folders: list[Path] = []
        for given in map(as_path, parts):
            if not (given.is_dir() and PART_DIR_RE.fullmatch(given.name)) or given.is_symlink() or given.resolve().parent != out.resolve():
                raise ConfigError(
                    f"{given} is not a part folder of {out} (part-IIIII-of-NNNNN directly inside it, as `kdcache generate "
                    f"--num-shards N --out {out}` writes them); a merged cache lists its parts' shards in place, so the parts "
                    f"must lie in {out}: move the folder there (mv on one file system copies nothing)")
            if any(given.resolve() == f.resolve() for f in folders):
                raise ConfigError(f"part {given} is given twice; give each part once")
            folders.append(out / given.name)
        folders.sort(key=lambda f: f.name)
    else:
        folders = part_folders(out)
        if not folders:
            raise ConfigError(f"{out} holds no part folders (part-IIIII-of-NNNNN); run `kdcache generate --num-shards N "
                              f"--shard-index I --out {out}` for I = 0..N-1 first")
    splits = sorted({f.name for f in folders}, key=lambda name: PART_DIR_RE.fullmatch(name).group(2))
    if len({PART_DIR_RE.fullmatch(name).group(2) for name in splits}) > 1:
        raise CacheMismatchError(f"{out} holds the parts of more than one split ({splits[0]} and {splits[-1]}); a merged cache is one "
                                 "split: move the other split's parts elsewhere and merge again")
    names = {f.name for f in folders}
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in names and p.name not in (LOCK_NAME, MANIFEST_NAME, TOKENIZER_DIR) and not is_temp_name(p.name))
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise CacheMismatchError(
            f"{out} holds {others[0]!r}{more} besides the parts to merge; the merged cache is {out} itself and holds only "
            "its parts: move that elsewhere (another split's parts included) and merge again")
    return folders


def _read_part(folder: Path) -> Manifest:
    try:
        m = read_manifest(folder)
    except CacheFormatError as exc:
        raise CacheFormatError(f"part {folder} cannot be read ({exc}); rerun its `kdcache generate` task") from None
    if m.status != "complete":
        end = m.shards[-1].input_rows_end if m.shards else 0
        raise CacheMismatchError(
            f"part {folder} is not complete (status {m.status}; {plural(m.num_rows, 'row')} committed up to input row {end}); "
            "rerun its task (the same `kdcache generate` command) until it finishes, then merge")
    split = m.settings.get(JOB_ARRAY)
    if not isinstance(split, dict) or split.get("shard_index") is None or split.get("rule") != SPLIT_RULE:
        raise CacheMismatchError(f"{folder} is not a part of a job array (its settings have no {JOB_ARRAY} split by "
                                 f"{SPLIT_RULE!r}); only caches written by `kdcache generate --num-shards N` merge")
    if part_dir_name(split["shard_index"], split["num_shards"]) != folder.name:
        raise CacheMismatchError(
            f"folder {folder} holds part {split['shard_index']} of {split['num_shards']} (its manifest says so), not the part its "
            f"name says: a part folder was renamed or copied; give it back its name "
            f"{part_dir_name(split['shard_index'], split['num_shards'])} or rerun the missing task")
    for s in m.shards:
        if not SHARD_RE.fullmatch(s.name):
            raise CacheMismatchError(f"part {folder} lists shard {s.name!r}, not a plain shard name: it is itself a merged cache")
        try:
            size = (folder / s.name).stat().st_size
        except OSError:
            size = None
        if size != s.bytes:
            what = "is missing" if size is None else f"holds {size:,} bytes, its manifest records {s.bytes:,}"
            raise CacheFormatError(f"part {folder}: shard {s.name} {what}; regenerate that part (its `kdcache generate` task "
                                   "with --overwrite), then merge")
    return m


def _merged(out: Path, folders: list[Path], manifests: list[Manifest]) -> Manifest:
    """The merged manifest, once the parts are known to be one whole split of one set of settings."""
    first, first_folder = manifests[0], folders[0]
    n = first.settings[JOB_ARRAY]["num_shards"]
    for folder, m in zip(folders, manifests):
        if m.settings[JOB_ARRAY]["num_shards"] != n:
            raise CacheMismatchError(f"parts of different splits: {first_folder.name} is one of {n} parts, {folder.name} one of "
                                     f"{m.settings[JOB_ARRAY]['num_shards']}; merge the parts of one split")
    have = {m.settings[JOB_ARRAY]["shard_index"] for m in manifests}
    missing = [i for i in range(n) if i not in have]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CacheMismatchError(
            f"{out}: {plural(len(missing), 'part')} of {n} missing ({shown}; e.g. {out / part_dir_name(missing[0], n)}); "
            f"run those tasks (--shard-index {missing[0]}, or sbatch --array={','.join(map(str, missing[:8]))}) and merge again")
    for folder, m in zip(folders[1:], manifests[1:]):
        require_same_tokenizer(first, m, str(first_folder), str(folder), "a merged cache")
        changed = _differing(shared_settings(first.settings), shared_settings(m.settings)) + _differing(first.signals, m.signals, "signals.")
        if changed or m.format_version != first.format_version:
            raise CacheMismatchError(
                f"parts {first_folder.name} and {folder.name} were generated with different settings "
                f"({', '.join(changed[:4]) or 'format_version'} differ); rerun the odd part's task with the others' command and --overwrite")
    stats: dict[str, Any] = {}
    for m in manifests:
        for key, value in m.stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                stats[key] = stats.get(key, 0) + value
    shards = [ShardInfo(**{**asdict(s), "name": f"{folder.name}/{s.name}"}) for folder, m in zip(folders, manifests) for s in m.shards]
    settings = {**shared_settings(first.settings),
                JOB_ARRAY: {"num_shards": n, "rule": SPLIT_RULE, "parts": [m.settings_hash for m in manifests]}}
    return Manifest(format_version=first.format_version, settings=settings, signals=first.signals, shards=shards,
                    status="complete", stats=stats, created_by=CREATED_BY)


def _already(out: Path, merged: Manifest) -> Manifest:
    """OUT holds a manifest: the same merge done before (nothing to do), else another cache (refused)."""
    old = read_manifest(out)
    same = old.created_by == CREATED_BY and old.settings_hash == merged.settings_hash and \
        [(s.name, s.sha256) for s in old.shards] == [(s.name, s.sha256) for s in merged.shards]
    if not same:
        what = "another merge of these parts" if old.created_by == CREATED_BY else f"a cache written by {old.created_by or 'kdcache'}"
        raise CacheMismatchError(f"{out} already holds {what} ({out / MANIFEST_NAME}); remove {MANIFEST_NAME} and {TOKENIZER_DIR} "
                                 "there (the parts stay) to merge again, or merge into a folder of its own")
    log.info("%s is already merged from these parts; nothing to do", out)
    return old


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _differing(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def copy_tree(source, tmp: Path) -> None:
    """A (local or remote) folder copied into the new local folder ``tmp``."""
    if is_remote(source):
        source.download_tree(tmp)
    else:
        shutil.copytree(source, tmp)


def _same_tree(a: Path, b: Path) -> bool:
    """Two folders hold the same files with the same bytes."""
    if is_remote(a) or is_remote(b):  # object stores: the same names with the same bytes
        names = a.tree_sizes() if is_remote(a) else {p.relative_to(a).as_posix(): p.stat().st_size for p in a.rglob("*") if p.is_file()}
        other = b.tree_sizes() if is_remote(b) else {p.relative_to(b).as_posix(): p.stat().st_size for p in b.rglob("*") if p.is_file()}
        return names == other and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in cmp.common_dirs)
