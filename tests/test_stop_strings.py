"""Stop strings on the transformers backend: a continuation ends at the token completing one, or at
max_new_tokens; matched on the text without special tokens (as vLLM does)."""

from __future__ import annotations

import numpy as np
from conftest import WORDS

from kdcache.cache import open_cache
from kdcache.pipeline.config import DataConfig, GenerateConfig, GenerationConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.teachers.transformers_backend import load_tokenizer


def test_transformers_continuations_stop_at_stop_strings(tiny_teacher, text_jsonl, tmp_path):
    stops = list(WORDS[:12])
    gen = GenerationConfig(enabled=True, max_new_tokens=6, num_samples=2, do_sample=True, stop=stops)
    generate(GenerateConfig(teacher=str(tiny_teacher), out=str(tmp_path / "c"), top_k=4, generation=gen, seed=3,
                            data=DataConfig(source=str(text_jsonl), max_length=64, max_rows=12)), progress=False)
    tok = load_tokenizer(str(tiny_teacher))
    stopped = 0
    for ex in open_cache(tmp_path / "c").stream():
        cont = np.asarray(ex["input_ids"])[ex["prompt_length"] :]
        hits = [any(w in tok.decode(cont[:n], skip_special_tokens=True) for w in stops) for n in range(1, len(cont) + 1)]
        assert not any(hits[:-1])
        stopped += hits[-1] and len(cont) < 6
    assert stopped > 0
