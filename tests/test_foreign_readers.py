"""A cache folder is a Parquet dataset for other tools, and caches with the old names still work.

What is not data (``_manifest.json``, ``_tokenizer/``) starts with ``_``, which pyarrow.dataset, pandas and
DuckDB skip by their own convention. Caches written before the rename (``manifest.json``, ``tokenizer/``)
still open, verify, train (the tokenizer is found) and resume, keeping their names; ``--overwrite`` moves
them to the new names.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from kdcache import __version__
from kdcache.cache import MANIFEST_NAME, TOKENIZER_DIR, open_cache, read_manifest, verify_cache
from kdcache.cache.manifest import LEGACY_MANIFEST_NAME, LEGACY_TOKENIZER_DIR
from kdcache.errors import CacheFormatError
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate


def cfg(teacher, out, data, **kw) -> GenerateConfig:
    return GenerateConfig(teacher=str(teacher), out=str(out), device="cpu", top_k=4, shard_tokens=300, row_group_tokens=100,
                          data=DataConfig(source=str(data), max_length=32, **kw))


def test_pyarrow_dataset_and_pandas_read_the_cache_folder(tiny_cache):
    m = read_manifest(tiny_cache)
    assert len(m.shards) > 1 and (tiny_cache / MANIFEST_NAME).is_file() and (tiny_cache / TOKENIZER_DIR).is_dir()
    table = pads.dataset(str(tiny_cache)).to_table()
    assert table.num_rows == m.num_rows == 64
    assert table.column("example_id").to_pylist() == [ex["example_id"] for ex in open_cache(tiny_cache)]
    import pandas as pd

    df = pd.read_parquet(tiny_cache)
    assert len(df) == m.num_rows and list(df["num_loss_tokens"]) == list(table.column("num_loss_tokens").to_pylist())


def test_duckdb_reads_the_shards_if_installed(tiny_cache):
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.sql(f"select count(*) from read_parquet('{tiny_cache}/*.parquet')").fetchone()[0]
    assert n == read_manifest(tiny_cache).num_rows


def test_the_manifest_records_the_kdcache_version_outside_the_settings(tiny_cache):
    data = json.loads((tiny_cache / MANIFEST_NAME).read_text())
    assert data["kdcache_version"] == __version__ and "kdcache_version" not in json.dumps(data["settings"])
    del data["kdcache_version"]  # a manifest written before the field existed
    from kdcache.cache.manifest import Manifest

    old = Manifest.from_json(json.dumps(data))
    assert old.kdcache_version == "" and old.settings_hash == read_manifest(tiny_cache).settings_hash


def to_old_layout(path: Path) -> None:
    """What a cache written before the rename looks like (and its manifest had no kdcache_version)."""
    data = json.loads((path / MANIFEST_NAME).read_text())
    del data["kdcache_version"]
    (path / LEGACY_MANIFEST_NAME).write_text(json.dumps(data))
    (path / MANIFEST_NAME).unlink()
    (path / TOKENIZER_DIR).rename(path / LEGACY_TOKENIZER_DIR)


def test_an_old_layout_cache_opens_verifies_resumes_and_keeps_its_names(tiny_teacher, text_jsonl, tmp_path):
    whole = tmp_path / "whole"
    generate(cfg(tiny_teacher, whole, text_jsonl, max_rows=40), progress=False)
    old = tmp_path / "old"
    generate(cfg(tiny_teacher, old, text_jsonl, max_rows=20), progress=False)
    # An unfinished old cache: its manifest says in progress after 20 input rows (as a run killed there leaves it).
    to_old_layout(old)
    data = json.loads((old / LEGACY_MANIFEST_NAME).read_text())
    data["status"] = "in_progress"
    data["settings"]["dataset"]["max_rows"] = 40
    (old / LEGACY_MANIFEST_NAME).write_text(json.dumps(data))
    (old / ".manifest.json.4242-0badcafe.tmp").write_text("{")  # an old run's leftover

    cache = open_cache(old)
    assert len(cache) == 20 and cache.tokenizer_dir == old / LEGACY_TOKENIZER_DIR and cache.manifest_path == old / LEGACY_MANIFEST_NAME
    report = verify_cache(old, deep=True)
    assert report.ok and report.rows == 20, report.lines()

    m = generate(cfg(tiny_teacher, old, text_jsonl, max_rows=40), progress=False)  # resumes after row 20
    assert m.status == "complete" and m.num_rows == 40 and m.kdcache_version == __version__
    names = {p.name for p in old.iterdir()}
    assert LEGACY_MANIFEST_NAME in names and LEGACY_TOKENIZER_DIR in names
    assert not names & {MANIFEST_NAME, TOKENIZER_DIR, ".manifest.json.4242-0badcafe.tmp"}  # one manifest, one tokenizer
    assert [ex["example_id"] for ex in open_cache(old)] == [ex["example_id"] for ex in open_cache(whole)]
    for a, b in zip(open_cache(old), open_cache(whole)):
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
    assert verify_cache(old, deep=True).ok

    # --overwrite regenerates it under the new names: the old manifest and tokenizer are gone.
    generate(dataclasses.replace(cfg(tiny_teacher, old, text_jsonl, max_rows=10), overwrite=True), progress=False)
    names = {p.name for p in old.iterdir()}
    assert {MANIFEST_NAME, TOKENIZER_DIR} <= names and not names & {LEGACY_MANIFEST_NAME, LEGACY_TOKENIZER_DIR}, names
    assert len(open_cache(old)) == 10 and pads.dataset(str(old)).count_rows() == 10


def test_a_folder_with_both_manifests_is_refused(tiny_cache, tmp_path):
    copy = tmp_path / "both"
    shutil.copytree(tiny_cache, copy)
    shutil.copy(copy / MANIFEST_NAME, copy / LEGACY_MANIFEST_NAME)
    with pytest.raises(CacheFormatError, match="holds two manifests"):
        open_cache(copy)
