"""Rows that are already token ids (format tokens): the cache equals the one made from the text they encode."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from kdcache.cli import main
from test_generate import run


def test_token_id_rows_cache_as_the_text_they_encode(tiny_teacher, text_jsonl, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()][:10]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"ids": tok(t)["input_ids"]}) + "\n" for t in texts))
    from_text = run(tiny_teacher, tmp_path / "a", text_jsonl, top_k=4, logprob_codec="fp32", data={"max_rows": 10})
    from_ids = run(tiny_teacher, tmp_path / "b", path, top_k=4, logprob_codec="fp32", data={"field": "ids"})  # auto: tokens
    assert len(from_text) == len(from_ids) == 10
    for a, b in zip(from_text, from_ids):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-6)


def test_out_of_range_or_non_integer_token_rows_are_counted_bad_rows(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"ids": ids}) + "\n" for ids in ([5, 6, 7], [5, vocab], [-1, 2], [4, 5, 6, 7])))
    r = CliRunner().invoke(main, ["generate", "--teacher", str(tiny_teacher), "--dataset", str(path), "--field", "ids", "--format", "tokens",
                                  "--top-k", "2", "--out", str(tmp_path / "c"), "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "_manifest.json").read_text())
    assert m["stats"]["bad_rows.token_out_of_range"] == 2 and sum(s["rows"] for s in m["shards"]) == 2
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"ids": "5 6 7"}) + "\n")
    r = CliRunner().invoke(main, ["generate", "--teacher", str(tiny_teacher), "--dataset", str(text), "--field", "ids", "--format", "tokens",
                                  "--top-k", "2", "--out", str(tmp_path / "t"), "--device", "cpu", "--quiet"])
    assert r.exit_code != 0 and "wrong_type" in r.output and not (tmp_path / "t").exists(), r.output
    r = CliRunner().invoke(main, ["generate", "--teacher", str(tiny_teacher), "--dataset", str(path), "--field", "ids", "--format", "tokens",
                                  "--top-k", "2", "--out", str(tmp_path / "d"), "--device", "cpu", "--quiet", "--strict"])
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code != 0 and len(lines) == 1 and "outside the teacher's tokenizer" in lines[0], r.output
