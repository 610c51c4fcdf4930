"""The signal registry keeps every manifest and schema byte-for-byte: make_signals(...) (as JSON, key order included)
and str(build_schema(...)) for 116 settings combinations equal what the code before the registry produced
(tests/fixtures/signals-compat/expected.json, recorded by record.py beside it at commit 7b31ae6)."""

import json
from pathlib import Path

import pytest

from kdcache.cache.schema import build_schema, make_signals

EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "signals-compat" / "expected.json").read_text())


def test_enough_cases():
    assert len(EXPECTED) >= 50


@pytest.mark.parametrize("case", EXPECTED, ids=[str(i) for i in range(len(EXPECTED))])
def test_same_signals_and_schema(case):
    signals = make_signals(**case["kwargs"])
    assert json.dumps(signals) == case["signals_json"]
    schema = build_schema(signals)
    assert str(schema) == case["schema"]
    assert {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()} == case["schema_metadata"]
    # the schema is a function of the manifest's signals alone (what a reader has): also after a JSON round trip
    assert str(build_schema(json.loads(case["signals_json"]))) == case["schema"]
