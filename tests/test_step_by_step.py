"""Distilling step-by-step: rationales written by the teacher after a few-shot context the student never sees,
answers given and scored, two tasks told apart by a prefix, answers checked without a rationale.

References are independent of kdcache: the word problems' answers are recomputed from the question text; the
cache's continued rows equal plain transformers greedy generation after the context and the teacher's own forward
over context + row; answered rows equal a plain scoring cache of the same rows.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdcache.cache import open_cache
from kdcache.cli import main
from kdcache.errors import ConfigError, DataError
from kdcache.pipeline.config import DataConfig, GenerationConfig
from kdcache.pipeline.data import iter_rows
from kdcache.pipeline.generate import generate
from kdcache.pipeline.word_problems import ANSWER_PATTERN
from test_generate import make_cfg, run


def _solve(question: str) -> int:
    m = re.fullmatch(r"(\w+) has (\d+) (\w+) and (gets|gives away) (\d+)(?: more)?\. How many \3 does \1 have now\?", question)
    assert m, question
    a, b = int(m.group(2)), int(m.group(5))
    return a + b if m.group(4) == "gets" else a - b


def test_word_problems_are_checkable_two_tasks_each_and_the_test_set_is_held_out():
    rows = list(iter_rows(DataConfig(source="embedded:word-problems")))
    test = list(iter_rows(DataConfig(source="embedded:word-problems-test")))
    assert rows == list(iter_rows(DataConfig(source="embedded:word-problems")))  # the same on every call
    assert [r["task"] for r in rows[:4]] == ["rationale", "answer", "rationale", "answer"]
    for r in rows + test:
        assert int(r["answer"]) == _solve(r["question"]) >= 0
        assert r["prompt"].startswith(f"[{r['task']}] Question: {r['question']}")
        if r["task"] == "answer":
            assert re.search(ANSWER_PATTERN, r["response"]).group(1) == r["answer"]
        else:
            assert r["response"] == ""
    assert not {r["question"] for r in rows} & {r["question"] for r in test}
    assert {r["task"] for r in test} == {"answer"}


def test_where_keeps_only_matching_rows():
    rows = list(iter_rows(DataConfig(source="embedded:word-problems", where={"task": "answer"}, max_rows=5)))
    assert len(rows) == 5 and {r["task"] for r in rows} == {"answer"}


@pytest.fixture(scope="module")
def qa_jsonl(tmp_path_factory, text_jsonl):
    """Prompt/response rows, every other one unanswered, with a teacher-only topic field."""
    texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()][:8]
    rows = [{"prompt": " ".join(t.split()[:5]), "response": "" if i % 2 == 0 else " ".join(t.split()[5:9]) or "and so on",
             "topic": t.split()[-1]} for i, t in enumerate(texts)]
    path = tmp_path_factory.mktemp("qa") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


CONTEXT = "notes on {topic} :"
DATA = {"format": "prompt_response", "chat_template": False}


def test_unanswered_rows_are_continued_after_the_context_and_answered_rows_scored_as_given(tiny_teacher, qa_jsonl, tmp_path, model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    rows = [json.loads(line) for line in qa_jsonl.read_text().splitlines()]
    gen = {"enabled": True, "rows": "unanswered", "max_new_tokens": 6}
    exs = run(tiny_teacher, tmp_path / "c", qa_jsonl, top_k=5, logprob_codec="fp32", context=CONTEXT, data=DATA, generation=gen)
    assert [e["example_id"] for e in exs] == [f"{i}#g0" if i % 2 == 0 else str(i) for i in range(len(rows))]
    for ex, row in zip(exs, rows):
        ctx = tok(CONTEXT.format(topic=row["topic"]))["input_ids"]
        prompt = tok(row["prompt"])["input_ids"]
        if row["response"]:  # scored with its own response (+ EOS), never continued
            ids = prompt + tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        else:  # the teacher's own greedy continuation of context + prompt
            with torch.no_grad():
                out = model.generate(torch.tensor([ctx + prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            ids = prompt + out[0, len(ctx) + len(prompt):].tolist()
        np.testing.assert_array_equal(ex["input_ids"], ids)
        assert ex["prompt_length"] == len(prompt) and ex["context_tokens"] == len(ctx)
        assert not ex["loss_mask"][: len(prompt) - 1].any() and ex["loss_mask"][len(prompt) - 1:].all()
        with torch.no_grad():
            logp = model(torch.tensor([ctx + ids])).logits[0].double().log_softmax(-1)[len(ctx): len(ctx) + len(ids) - 1]
        np.testing.assert_allclose(ex["topk_logprobs"], logp.topk(5).values.numpy(), atol=1e-5)
        np.testing.assert_array_equal(np.sort(ex["topk_ids"], -1), np.sort(logp.topk(5).indices.numpy(), -1))


def test_a_continuation_is_cut_at_max_length_after_the_context(tiny_teacher, qa_jsonl, tmp_path):
    gen = {"enabled": True, "max_new_tokens": 12}
    long = run(tiny_teacher, tmp_path / "a", qa_jsonl, top_k=3, logprob_codec="fp32", context=CONTEXT, data=DATA, generation=gen)
    cut = run(tiny_teacher, tmp_path / "b", qa_jsonl, top_k=3, logprob_codec="fp32", context=CONTEXT,
              data={**DATA, "max_length": 9}, generation=gen)
    for a, b in zip(long, cut):
        n = len(b["input_ids"])
        assert n <= 9 and a["example_id"] == b["example_id"]
        np.testing.assert_array_equal(b["input_ids"], a["input_ids"][:n])
        np.testing.assert_allclose(b["topk_logprobs"], a["topk_logprobs"][: n - 1], atol=1e-5)  # other padding, other rounding


def test_unanswered_needs_prompt_response_rows_and_generation(tiny_teacher, text_jsonl, tmp_path):
    with pytest.raises(ConfigError, match="rows are text"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, generation={"enabled": True, "rows": "unanswered"}), progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="generation.enabled=true"):
        make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, generation={"rows": "unanswered"})


def test_where_matching_nothing_is_one_line_before_any_work(tiny_teacher, qa_jsonl, tmp_path):
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["generate", "--teacher", str(tiny_teacher), "--dataset", str(qa_jsonl), "--out", str(out),
                                  "--device", "cpu", "--quiet", "--set", "data.where={topic: nope}"])
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code != 0 and len(lines) == 1 and "data.where" in lines[0] and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_eval_answers_refuses_a_pattern_without_a_group(tiny_teacher):
    r = CliRunner().invoke(main, ["eval-answers", "--model", str(tiny_teacher), "--pattern", "answer", "--max-rows", "2"])
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code != 0 and len(lines) == 1 and "no group" in lines[0], r.output


# --------------------------------------------------------------------------------------------------
# the mechanism: two tasks told apart by their prefix, answers without a rationale at inference (real SmolLM2)

def _written(model_dir, examples: list[dict]) -> float:
    """Fraction of each cached continuation's tokens the model writes greedily after the row's prompt."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits = []
    for ex in examples:
        p = int(ex["prompt_length"])
        prompt, target = torch.tensor([ex["input_ids"][:p].tolist()]), ex["input_ids"][p:]
        with torch.no_grad():
            out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(target), do_sample=False,
                              pad_token_id=0)[0, p:].numpy()
        hits.append(np.mean([a == b for a, b in zip(out, target)]) * min(len(out), len(target)) / len(target))
    return float(np.mean(hits))


@pytest.mark.slow
def test_the_student_learns_both_tasks_by_prefix_and_answers_without_a_rationale(tmp_path):
    from kdcache.config import build_config
    from kdcache.pipeline.config import GenerateConfig
    from kdcache.pipeline.recipes import recipe_path
    from kdcache.pipeline.smollm2 import smollm2_gguf
    from kdcache.pipeline.teachers import build_teacher
    from kdcache.train.config import StudentConfig, TrainConfig
    from kdcache.train.loop import train

    def cfg(out: str, **values):
        return build_config(GenerateConfig, recipe_path("step-by-step"), {"teacher": str(smollm2_gguf()), "out": str(tmp_path / out),
                            "device": "cpu", "top_k": 16, **values}, section="generate")

    both_cfg = cfg("both", **{"data.max_rows": 12})
    answers_cfg = cfg("answers", **{"data.max_rows": 6, "data.where": {"task": "answer"}})
    teacher = build_teacher(both_cfg)
    try:
        generate(both_cfg, progress=False, teacher=teacher)  # 6 problems: 6 teacher-written rationales, 6 scored answers
        generate(answers_cfg, progress=False, teacher=teacher)  # the same 6 answer rows alone
    finally:
        teacher.close()
    rows = list(open_cache(tmp_path / "both").stream(columns=["input_ids", "prompt_length", "task"]))
    rationales = [r for r in rows if r["task"] == "rationale"]
    answers = [r for r in rows if r["task"] == "answer"]
    assert len(rationales) == len(answers) == 6
    student = StudentConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    written = {}
    for name in ("both", "answers"):
        out = tmp_path / f"run-{name}"
        train(TrainConfig(cache=str(tmp_path / name), out=str(out), student=student, loss="kd", alpha=0.5, steps=300, batch_size=4,
                          lr=1e-2, warmup_steps=5, eval_fraction=0.0, eval_every=0, save_every=0, device="cpu", seed=0), progress=False)
        written[name] = {"rationale": _written(out / "final", rationales), "answer": _written(out / "final", answers)}
    # "[rationale] ...": the teacher's rationale; "[answer] ...": the answer alone, no rationale first
    assert written["both"]["rationale"] > 0.8 and written["both"]["answer"] > 0.8, written
    assert written["answers"]["answer"] > 0.8, written
    # without the rationale rows a "[rationale]" prompt gets no rationale: what the student learns is the second task
    assert written["answers"]["rationale"] < 0.3, written
