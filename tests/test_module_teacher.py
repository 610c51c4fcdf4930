"""A local torch module as the teacher (`--backend torch-module`): safetensors weights plus an entry point the
user names; its cache rows equal the module's own forward, and what it cannot do is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import build_tiny_tokenizer
from kdcache.cache import open_cache, read_manifest, verify_cache
from kdcache.errors import ConfigError, KDCacheError
from kdcache.pipeline.config import TorchModuleConfig
from kdcache.pipeline.generate import generate
from module_teacher import build
from test_generate import make_cfg

ENTRY = "module_teacher:build"


@pytest.fixture(scope="module")
def gru_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("gru")
    tok = build_tiny_tokenizer(path)
    torch.manual_seed(0)
    model = build(vocab=len(tok), width=16)
    save_file(model.state_dict(), str(path / "model.safetensors"))
    return path, len(tok)


def _cfg(teacher, out, source, vocab, **kw):
    return make_cfg(teacher, out, source, backend="torch-module", module=TorchModuleConfig(ENTRY, {"vocab": vocab, "width": 16}), **kw)


def test_rows_are_the_modules_own_forward(gru_teacher, text_jsonl, tmp_path):
    path, vocab = gru_teacher
    generate(_cfg(path, tmp_path / "c", text_jsonl, vocab, top_k=5, logprob_codec="fp32", pooled_layers=[-1], data={"max_rows": 8}),
             progress=False)
    model = build(vocab=vocab, width=16)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")))
    m = read_manifest(tmp_path / "c")
    assert m.teacher["backend"] == "torch-module" and m.teacher["architecture"] == ENTRY and m.signals["topk"]["vocab_size"] == vocab
    for ex in open_cache(tmp_path / "c"):
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        logp = out["logits"][0, :-1].double().log_softmax(-1)
        np.testing.assert_allclose(ex["topk_logprobs"], logp.topk(5).values.numpy(), atol=1e-5)
        np.testing.assert_allclose(ex["pooled_1"], out["hidden_states"][1][0].double().mean(0).numpy(), rtol=1e-4, atol=1e-5)
        assert ex["teacher_nll"] == pytest.approx(float(-logp.gather(1, ids[0, 1:, None]).mean()), abs=1e-4)
    assert verify_cache(tmp_path / "c", deep=True).ok


@pytest.mark.parametrize("entry,words", [
    ("", ["needs the function", "module.entry_point"]),
    ("module_teacher.build", ["must be 'package.module:function'"]),
    ("no_such_pkg:build", ["cannot import 'no_such_pkg'"]),
    ("module_teacher:nope", ["has no 'nope'"]),
])
def test_a_bad_entry_point_is_one_line_before_any_work(gru_teacher, text_jsonl, tmp_path, entry, words):
    path, vocab = gru_teacher
    cfg = make_cfg(path, tmp_path / "c", text_jsonl, backend="torch-module", module=TorchModuleConfig(entry, {"vocab": vocab}))
    with pytest.raises(ConfigError) as err:
        generate(cfg, progress=False)
    assert all(w in str(err.value) for w in words), err.value
    assert not (tmp_path / "c").exists()


def test_weights_must_be_safetensors_that_fit(gru_teacher, text_jsonl, tmp_path):
    path, vocab = gru_teacher
    pickle_only = tmp_path / "pt"
    pickle_only.mkdir()
    (pickle_only / "model.pt").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        generate(_cfg(pickle_only, tmp_path / "c", text_jsonl, vocab), progress=False)
    with pytest.raises(KDCacheError, match="does not fit the module"):  # other kwargs: another shape
        generate(make_cfg(path, tmp_path / "c2", text_jsonl, backend="torch-module", module=TorchModuleConfig(ENTRY, {"vocab": vocab, "width": 8})),
                 progress=False)
