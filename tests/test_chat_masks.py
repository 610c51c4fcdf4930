"""Assistant-only loss masks on real chat templates (kdcache.pipeline.data.RowTokenizer).

The reference is independent of kdcache's logic: the masked tokens are cut into contiguous runs and
each run is decoded back to text with the tokenizer, then compared with the assistant messages as
written (content followed by ``<|im_end|>``). Templates that cannot give a verified mask (they rewrite
history, stamp the time into the system block, merge tokens across the turn boundary) must turn the
row into a counted bad row, never into a shifted mask.

The tokenizer is SmolLM2-135M-Instruct's real one, loaded from the GGUF the demo ships (a few seconds,
once per module; the model weights are not loaded).
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from kdcache.cache import open_cache, read_manifest
from kdcache.errors import DataError
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.data import BadRow, RowTokenizer, Tokenized
from kdcache.pipeline.generate import generate

IM_END = "<|im_end|>"
UNSTABLE = "chat_template_not_prefix_stable"

CONVS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven is prime."},
        {"role": "user", "content": "And an even one?"},
        {"role": "assistant", "content": "Two — the only even prime."},
    ],
    [
        {"role": "user", "content": "Write a function."},
        {"role": "assistant", "content": "def f(x):\n    return x * 2\n\nThat doubles x."},
        {"role": "user", "content": "Shorter?"},
        {"role": "assistant", "content": "f = lambda x: 2 * x"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome. 😊"},
    ],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],  # a turn that is only <|im_end|>
]

# Strips <think>...</think> from every assistant message but the last (as Qwen3-style templates do).
THINK_STRIPPING = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in m['content'] -%}"
    "{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# The same, with the assistant output (content and <|im_end|>, not the newline) in {% generation %} blocks.
THINK_STRIPPING_MARKED = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- if not loop.last and '</think>' in m['content'] -%}{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- endgeneration -%}"
    "{{ '\n' }}"
    "{%- else -%}{{ m['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Marks only the content, not <|im_end|>: a choice the verified-prefix path would never make.
CONTENT_ONLY_MARKED = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['role'] == 'assistant' -%}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

_TURNS = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
# A system block stamped with the time of rendering (like "Today Date: ..." blocks), to the microsecond.
TIME_STAMPED = "{{ '<|im_start|>system\nNow: ' + strftime_now('%H:%M:%S.%f') + '<|im_end|>\n' }}" + _TURNS
# A system block that depends on the conversation's length: deterministic, and the same token count.
COUNTED = "{{ '<|im_start|>system\nThis chat has ' + (messages | length | string) + ' messages.<|im_end|>\n' }}" + _TURNS


@pytest.fixture(scope="module")
def smol():
    from kdcache.pipeline.smollm2 import smollm2_gguf
    from kdcache.pipeline.teachers.transformers_backend import load_tokenizer

    return load_tokenizer(str(smollm2_gguf()))


def with_template(tok, template: str):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def tokenize(tok, conv, **data) -> Tokenized | BadRow:
    rt = RowTokenizer(tok, DataConfig(source="unused", format="messages", field="messages", max_length=4096, **data))
    return rt({"messages": conv})


def masked_runs(tok, ex: Tokenized) -> list[str]:
    """Decoded text of each contiguous run of target tokens (target t+1 counts iff loss_mask[t])."""
    targets = np.concatenate([[False], ex.loss_mask])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], targets.astype(np.int8), [0]])))
    return [tok.decode(ex.input_ids[a:b].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for a, b in zip(edges[::2], edges[1::2])]


def assistant_texts(conv) -> list[str]:
    return [m["content"] + IM_END for m in conv if m["role"] == "assistant"]


# --------------------------------------------------------------------------------------------------
# the real SmolLM2 template


@pytest.mark.parametrize("conv", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_real_template_masks_exactly_the_assistant_messages(smol, conv):
    ex = tokenize(smol, conv)
    assert isinstance(ex, Tokenized), ex
    # the tokens are the template's own rendering, untouched
    assert ex.input_ids.tolist() == list(smol.apply_chat_template(conv, tokenize=True)["input_ids"])
    assert masked_runs(smol, ex) == assistant_texts(conv)  # content + <|im_end|>, no header, no trailing newline
    # the first target follows the generation prompt of the first assistant turn
    first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
    prompt = smol.apply_chat_template(conv[:first], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ex.prompt.tolist() == list(prompt)


def test_real_template_default_system_block_is_not_a_target(smol):
    conv = CONVS[0]
    ex = tokenize(smol, conv)
    text = smol.decode(ex.input_ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # inserted by the template
    assert text.endswith(IM_END + "\n")
    assert not ex.loss_mask[-1]  # the final newline after <|im_end|> is template, not a target
    assert ex.loss_mask[-2]  # <|im_end|> is


def test_bpe_merge_across_the_turn_boundary_is_a_bad_row(smol):
    """Content that starts with a newline merges with the header's newline ("\\n\\n" is one token), so the
    rendered prefix is not a token prefix of the whole: counted, not guessed."""
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nHello"}]
    merged = smol.apply_chat_template(conv, tokenize=True)["input_ids"]
    head = smol.apply_chat_template(conv[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(merged[: len(head)]) != list(head)  # the premise: SmolLM2's BPE really merges here
    out = tokenize(smol, conv)
    assert isinstance(out, BadRow) and out.reason == UNSTABLE


def test_assistant_first_is_a_bad_row(smol):
    out = tokenize(smol, [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes?"}])
    assert isinstance(out, BadRow) and out.reason == "no_prompt"


def test_template_exception_is_a_bad_row(smol):
    tok = with_template(smol, "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}{% endif %}" + _TURNS)
    out = tokenize(tok, [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
    assert isinstance(out, BadRow) and out.reason == "chat_template_error" and "user first" in out.detail


# --------------------------------------------------------------------------------------------------
# templates that break the prefix property


THINK_CONV = [
    {"role": "user", "content": "What is 3*4?"},
    {"role": "assistant", "content": "<think>3*4 is 12.</think>\n\n12."},
    {"role": "user", "content": "And 3*5?"},
    {"role": "assistant", "content": "<think>Add 3.</think>\n\n15."},
]


def test_history_rewriting_template_without_markers_is_a_bad_row(smol):
    tok = with_template(smol, THINK_STRIPPING)
    out = tokenize(tok, THINK_CONV)
    assert isinstance(out, BadRow), "a shifted mask came out of a template that rewrites history"
    assert out.reason == UNSTABLE
    # without <think> in the history nothing is rewritten: the same template gives exact masks
    plain = [THINK_CONV[0], {"role": "assistant", "content": "12."}, *THINK_CONV[2:]]
    ex = tokenize(tok, plain)
    assert isinstance(ex, Tokenized), ex
    assert masked_runs(tok, ex) == assistant_texts(plain)


def test_history_rewriting_template_with_markers_uses_the_template_mask(smol):
    tok = with_template(smol, THINK_STRIPPING_MARKED)
    ex = tokenize(tok, THINK_CONV)
    assert isinstance(ex, Tokenized), ex
    # what the template renders: the earlier turn without its <think>, the last one whole
    assert masked_runs(tok, ex) == ["12." + IM_END, THINK_CONV[3]["content"] + IM_END]
    assert "3*4 is 12" not in tok.decode(ex.input_ids.tolist())


def test_generation_markers_are_preferred(smol):
    tok = with_template(smol, CONTENT_ONLY_MARKED)
    conv = CONVS[1]
    ex = tokenize(tok, conv)
    assert isinstance(ex, Tokenized), ex
    assert masked_runs(tok, ex) == [m["content"] for m in conv if m["role"] == "assistant"]  # as marked: no <|im_end|>


@pytest.mark.parametrize("template", [TIME_STAMPED, COUNTED], ids=["time-stamped", "message-count"])
def test_changing_system_block_is_a_bad_row(smol, template):
    tok = with_template(smol, template)
    conv = CONVS[1]
    full = tok.apply_chat_template(conv, tokenize=True)["input_ids"]
    head = tok.apply_chat_template(conv[:2], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(full[: len(head)]) != list(head)  # the premise
    out = tokenize(tok, conv)
    assert isinstance(out, BadRow) and out.reason == UNSTABLE, out


# --------------------------------------------------------------------------------------------------
# through generate: counted in the manifest like every bad row, --strict stops on the first


@pytest.fixture
def think_teacher(tiny_teacher, tmp_path):
    """The tiny teacher with the history-rewriting template."""
    from transformers import AutoTokenizer

    path = tmp_path / "think_teacher"
    shutil.copytree(tiny_teacher, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = THINK_STRIPPING
    tok.save_pretrained(path)
    return path


def _rows():
    good = [{"role": "user", "content": "the value"}, {"role": "assistant", "content": "a list"},
            {"role": "user", "content": "and this"}, {"role": "assistant", "content": "the name"}]
    bad = [{"role": "user", "content": "the value"}, {"role": "assistant", "content": "<think>is it</think> a list"},
           {"role": "user", "content": "and this"}, {"role": "assistant", "content": "the name"}]
    return [{"messages": good}, {"messages": bad}, {"messages": good}, {"messages": bad}, {"messages": bad}]


def test_unstable_rows_are_counted_in_the_manifest(think_teacher, tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "cache"
    generate(GenerateConfig(teacher=str(think_teacher), out=str(out), device="cpu", top_k=4,
                            data=DataConfig(source=str(src), field="messages")), progress=False)
    assert [e["example_id"] for e in open_cache(out)] == ["0", "2"]
    stats = read_manifest(out).stats
    assert {k: v for k, v in stats.items() if k.startswith("bad_rows.")} == {f"bad_rows.{UNSTABLE}": 3}


def test_strict_stops_on_the_first_unstable_row(think_teacher, tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    with pytest.raises(DataError, match=rf"bad row 1\b.*{UNSTABLE}.*--strict") as err:
        generate(GenerateConfig(teacher=str(think_teacher), out=str(tmp_path / "cache"), device="cpu", top_k=4,
                                data=DataConfig(source=str(src), field="messages", strict=True)), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()
