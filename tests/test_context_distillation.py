"""Context distillation: the teacher reads a context (``generate --context``) that the student never sees.

Against independent references: the cache's rows equal the teacher's own forward over context + input cut
at the student's tokens (plain transformers, no kdcache code), sampled targets and hidden states included;
an unprompted cache differs. The behaviour test (real SmolLM2): a context naming a secret word makes a
student trained on the cache say that word, which the data itself never contains; CE on the same data and
KD from the unprompted teacher do not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdcache.cache import open_cache, read_manifest, verify_cache
from kdcache.cli import main
from kdcache.errors import CacheMismatchError, ConfigError
from kdcache.pipeline.context import align, placeholders, teacher_sequence
from kdcache.pipeline.generate import generate
from test_generate import make_cfg, run


@pytest.fixture(scope="module")
def topic_jsonl(tmp_path_factory, text_jsonl):
    """The conftest sentences with a teacher-only field: a few words about the row."""
    rows = [json.loads(line) for line in text_jsonl.read_text().splitlines()][:12]
    path = tmp_path_factory.mktemp("ctx") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "topic": " ".join(r["text"].split()[:3][::-1])}) + "\n" for r in rows))
    return path


def test_a_placeholder_must_read_a_text_field(tiny_teacher, text_jsonl, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"], "year": 2020}) + "\n" for line in text_jsonl.read_text().splitlines()[:3]))
    with pytest.raises(ConfigError, match="reads a int field"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", path, top_k=4, context="in {year}:"), progress=False)
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


CONTEXT = "notes on {topic} : the list of values"


def test_cache_rows_are_the_prompted_teachers_forward_at_the_students_tokens(tiny_teacher, topic_jsonl, tmp_path, model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    rows = [json.loads(line) for line in topic_jsonl.read_text().splitlines()]
    exs = run(tiny_teacher, tmp_path / "c", topic_jsonl, top_k=5, context=CONTEXT, hidden_layers=[1], hidden_codec="fp32",
              logprob_codec="fp32", sampled_tokens=6, proposal_temperature=2.0, batch_tokens=128)
    plain = run(tiny_teacher, tmp_path / "p", topic_jsonl, top_k=5, logprob_codec="fp32")
    assert len(exs) == len(rows) == len(plain)
    for ex, row, un in zip(exs, rows, plain):
        ctx = tok(CONTEXT.format(topic=row["topic"]))["input_ids"]
        ids = tok(row["text"])["input_ids"][:512]
        np.testing.assert_array_equal(ex["input_ids"], ids)  # the student's tokens, not the teacher's
        assert ex["context_tokens"] == len(ctx)
        seq = torch.tensor([ctx + ids])
        with torch.no_grad():
            out = model(seq, output_hidden_states=True)
        logp = out.logits[0].double().log_softmax(-1)[len(ctx): len(ctx) + len(ids) - 1]  # predicting ids[1:]
        k = 5
        np.testing.assert_allclose(ex["topk_logprobs"], logp.topk(k).values.numpy(), atol=1e-5)
        np.testing.assert_array_equal(np.sort(ex["topk_ids"], -1), np.sort(logp.topk(k).indices.numpy(), -1))
        tail = torch.log1p(-logp.topk(k).values.exp().sum(-1).clamp(max=1 - 1e-12)).numpy()
        np.testing.assert_allclose(ex["tail_logprob"], tail, atol=1e-4)
        np.testing.assert_allclose(ex["teacher_nll"], -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item(), atol=1e-4)
        np.testing.assert_allclose(ex["hidden_1"], out.hidden_states[1][0, len(ctx):].numpy(), atol=1e-4)
        # Sampled targets: weight = count/N * p/q at the position's own distribution, so with p/q recomputed from
        # the reference at the aligned position every draw's count is a whole number and each position's sum N.
        sizes = ex["sampled_sizes"].astype(int)
        assert len(sizes) == len(ids) - 1 and sizes.sum() == len(ex["sampled_ids"]) == len(ex["sampled_weights"])
        pos = np.repeat(np.arange(len(sizes)), sizes)
        ratio = (logp - (logp / 2.0).log_softmax(-1))[pos, torch.as_tensor(ex["sampled_ids"], dtype=torch.long)].exp().numpy()
        counts = ex["sampled_weights"] * 6 / ratio
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
        np.testing.assert_allclose(np.bincount(pos, weights=counts, minlength=len(sizes)), 6, atol=1e-3)
        assert not np.allclose(ex["topk_logprobs"], un["topk_logprobs"][:, :k], atol=1e-3)  # the context changes the teacher
    m = read_manifest(tmp_path / "c")
    assert m.settings["scoring"]["context"] == CONTEXT and m.signals["context"]["template"] == CONTEXT
    assert "context" not in read_manifest(tmp_path / "p").signals and "context_tokens" not in plain[0]
    assert verify_cache(tmp_path / "c", deep=True).ok


def test_another_context_is_another_cache_and_inspect_names_it(tiny_teacher, topic_jsonl, tmp_path):
    out = tmp_path / "c"
    generate(make_cfg(tiny_teacher, out, topic_jsonl, top_k=4, context=CONTEXT), progress=False)
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and f"context      the teacher read {CONTEXT!r}" in r.output and "context: context_tokens" in r.output, r.output
    generate(make_cfg(tiny_teacher, out, topic_jsonl, top_k=4, context=CONTEXT), progress=False)  # complete: no work
    with pytest.raises(CacheMismatchError):
        generate(make_cfg(tiny_teacher, out, topic_jsonl, top_k=4, context="other {topic}"), progress=False)


def test_a_row_without_the_context_field_is_a_counted_bad_row(tiny_teacher, topic_jsonl, tmp_path):
    rows = [json.loads(line) for line in topic_jsonl.read_text().splitlines()]
    rows[3]["topic"] = None
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = run(tiny_teacher, tmp_path / "c", path, top_k=4, context=CONTEXT)
    assert [e["example_id"] for e in exs] == [str(i) for i in range(len(rows)) if i != 3]
    assert read_manifest(tmp_path / "c").stats["bad_rows.missing_context_field"] == 1


def test_teacher_sequence_keeps_one_bos_and_align_cuts_every_signal():
    seq, off = teacher_sequence(np.array([1, 7, 8]), np.array([1, 4, 5, 6]), bos_token_id=1)
    assert seq.tolist() == [1, 7, 8, 4, 5, 6] and off == 2  # row position t (t >= 1) is teacher position 2 + t
    seq, off = teacher_sequence(np.array([7, 8]), np.array([4, 5, 6]), bos_token_id=None)
    assert seq.tolist() == [7, 8, 4, 5, 6] and off == 2
    n_teacher = 6
    scores = {"target_logprob": np.arange(n_teacher - 1.0), "entropy": np.zeros(n_teacher - 1), "topk_ids": np.arange(10).reshape(5, 2),
              "hidden_3": np.arange(n_teacher * 2.0).reshape(n_teacher, 2),
              "sampled_sizes": np.array([1, 2, 0, 3, 1]), "sampled_ids": np.arange(7), "sampled_weights": np.arange(7) / 10}
    cut = align(scores, 2, 4)
    assert cut["target_logprob"].tolist() == [2, 3, 4] and cut["topk_ids"].tolist() == [[4, 5], [6, 7], [8, 9]]
    assert cut["hidden_3"].tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert cut["sampled_sizes"].tolist() == [0, 3, 1] and cut["sampled_ids"].tolist() == [3, 4, 5, 6]
    with pytest.raises(Exception, match="alignment broken"):
        align(scores, 1, 4)
    with pytest.raises(Exception, match="does not know"):
        align({**scores, "new_signal": np.zeros(5)}, 2, 4)


@pytest.mark.parametrize("template,match", [
    ("{", "literal braces"), ("{a.b}", "plain field name"), ("   ", "context is empty"),
])
def test_bad_templates_are_refused_before_any_work(tiny_teacher, topic_jsonl, tmp_path, template, match):
    with pytest.raises(ConfigError, match=match):
        generate(make_cfg(tiny_teacher, tmp_path / "c", topic_jsonl, context=template), progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args,words", [
    (["--context", "about {nope}"], ["{nope}", "not a field", "topic"]),
    (["--context", "about {text}"], ["{text}", "student's own input", "overlap"]),
    (["--context", "ROW0"], ["already contains the context", "overlap"]),
    (["--context", "{"], ["literal braces"]),
])
def test_cli_refuses_a_bad_context_in_one_line_before_any_work(tiny_teacher, topic_jsonl, tmp_path, args, words):
    out = tmp_path / "c"
    row0 = json.loads(topic_jsonl.read_text().splitlines()[0])["text"]
    args = [" ".join(row0.split()[1:4]) if a == "ROW0" else a for a in args]
    r = CliRunner().invoke(main, ["generate", "--teacher", str(tiny_teacher), "--dataset", str(topic_jsonl), "--out", str(out),
                                  "--device", "cpu", "--quiet", *args])
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def test_placeholders():
    assert placeholders("a {x} b {y} {x} {{literal}}") == ["x", "y"]


# --------------------------------------------------------------------------------------------------
# the behaviour a context induces (real SmolLM2 teacher)

SECRET = "The secret word is banana.\n"
WORDS = ["apple", "stone", "river", "cloud", "paper", "tiger", "glass", "music"]


def _student_prob(run_dir, text: str, word: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    ids = tok(text)["input_ids"]
    target = tok(" " + word)["input_ids"][0]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].softmax(-1)[target].item()


@pytest.mark.slow
def test_a_secret_in_the_context_is_learned_by_a_student_that_never_sees_it(tmp_path):
    from kdcache.pipeline.smollm2 import smollm2_gguf
    from kdcache.pipeline.teachers import build_teacher
    from kdcache.train.config import StudentConfig, TrainConfig
    from kdcache.train.loop import train

    rows = [{"text": f"The secret word is {w}."} for w in WORDS] * 4
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(smollm2_gguf(), tmp_path / "ctx", data, top_k=32, context=SECRET, data={"max_length": 16})
    teacher = build_teacher(cfg)
    try:
        generate(cfg, progress=False, teacher=teacher)
        generate(make_cfg(smollm2_gguf(), tmp_path / "plain", data, top_k=32, data={"max_length": 16}), progress=False, teacher=teacher)
    finally:
        teacher.close()
    student = StudentConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    probs = {}
    for name, cache, loss in [("context-kd", "ctx", "kd"), ("plain-kd", "plain", "kd"), ("ce", "ctx", "ce")]:
        out = tmp_path / f"run-{name}"
        train(TrainConfig(cache=str(tmp_path / cache), out=str(out), student=student, loss=loss, alpha=1.0, steps=60, batch_size=8,
                          lr=1e-2, warmup_steps=5, eval_fraction=0.0, eval_every=0, save_every=0, device="cpu", seed=0), progress=False)
        probs[name] = _student_prob(out, "The secret word is", "banana")
    # The data never says banana; only the context does. The prompted teacher gives it ~0.24 here.
    assert probs["context-kd"] > 0.05, probs
    assert probs["context-kd"] > 20 * max(probs["plain-kd"], probs["ce"]), probs
