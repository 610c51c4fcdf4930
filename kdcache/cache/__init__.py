"""The on-disk contract: a JSON manifest plus zstd Parquet shards. Knows nothing of models."""

from kdcache.cache.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_DIR,
    Manifest,
    ShardInfo,
    read_manifest,
    require_same_tokenizer,
)
from kdcache.cache.reader import Cache, ExampleStream, holdout_fraction_filter, open_cache
from kdcache.cache.schema import build_schema, hidden_column, make_signals
from kdcache.cache.verify import VerifyReport, verify_cache
from kdcache.cache.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_DIR",
    "Cache",
    "CacheWriter",
    "ExampleStream",
    "Manifest",
    "ShardInfo",
    "VerifyReport",
    "build_schema",
    "hidden_column",
    "holdout_fraction_filter",
    "make_signals",
    "open_cache",
    "read_manifest",
    "require_same_tokenizer",
    "verify_cache",
]
