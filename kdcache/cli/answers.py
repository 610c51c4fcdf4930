"""Answer accuracy: does a model's greedy answer to each prompt match the row's ground truth?

For tasks with checkable answers (distilling step-by-step, configs/recipes/step-by-step.yaml): each row's
prompt (after an optional context, e.g. few-shot examples for a teacher) is continued greedily up to the
first newline, the answer is read with a regular expression and compared with the row's answer field as
text. Any causal LM folder or .gguf file works, so the teacher's own accuracy (what it can give a student)
and the student's are measured the same way. Rows stream; batches are left-padded.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from kdcache.errors import ConfigError, DataError
from kdcache.pipeline.config import DataConfig
from kdcache.pipeline.data import iter_rows
from kdcache.pipeline.teachers.transformers_backend import locate_model
from kdcache.pipeline.word_problems import ANSWER_PATTERN


def answer_accuracy(
    model: str, dataset: str, *, prompt_field: str = "prompt", answer_field: str = "answer", pattern: str = ANSWER_PATTERN,
    context: str = "", where: dict | None = None, max_rows: int | None = None, max_new_tokens: int = 24, batch_size: int = 16,
    device: str = "cpu", show: int = 3,
) -> dict[str, Any]:
    """``{"accuracy", "answered", "rows", "examples"}``: the fraction of rows answered correctly, the fraction
    with any readable answer, and the first ``show`` (prompt, output, answer) triples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"answer pattern {pattern!r} is not a regular expression ({exc}); e.g. {ANSWER_PATTERN!r}") from None
    if regex.groups < 1:
        raise ConfigError(f"answer pattern {pattern!r} has no group; put the answer in one, e.g. {ANSWER_PATTERN!r}")
    folder, gguf, _ = locate_model(model)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # safetensors only (a .gguf is not pickle either): this reads students and teachers users may have received
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32, use_safetensors=None if gguf else True)
    lm = lm.to(device).eval()
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = iter_rows(DataConfig(source=dataset, where=dict(where or {}), max_rows=max_rows))
    correct = answered = total = 0
    examples: list[dict] = []
    batch: list[dict] = []

    def flush() -> None:
        nonlocal correct, answered, total
        for name in (prompt_field, answer_field):
            if name not in batch[0]:
                raise DataError(f"field {name!r} not in {dataset} (it has {sorted(batch[0])}); pass --prompt-field/--answer-field")
        enc = tok([context + str(r[prompt_field]) for r in batch], return_tensors="pt", padding=True, add_special_tokens=True)
        with torch.no_grad():
            out = lm.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for row, text in zip(batch, texts):
            line = text.split("\n", 1)[0]
            found = regex.search(line)
            ok = found is not None and found.group(1).strip() == str(row[answer_field]).strip()
            correct += ok
            answered += found is not None
            total += 1
            if len(examples) < show:
                examples.append({"prompt": row[prompt_field], "output": line, "answer": str(row[answer_field]), "correct": ok})
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not total:
        raise DataError(f"no rows to answer in {dataset}{f' matching {where}' if where else ''}")
    return {"accuracy": correct / total, "answered": answered / total, "rows": total, "examples": examples}
