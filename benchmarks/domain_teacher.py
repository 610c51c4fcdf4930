"""A second real teacher for the ensemble benchmark: SmolLM2-135M-Instruct fine-tuned on the demo's training rows.

Only one pretrained model ships offline here, and an ensemble needs teachers that share a tokenizer but
disagree. Briefly adapting SmolLM2 to the docstrings gives exactly that: same tokenizer, different
predictions (a domain expert beside the generalist). It trains only on rows outside the held-out split,
read from the demo cache, so the evaluation rows stay unseen. Benchmark-only: kdcache's train stage never
loads a teacher.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path

import torch

from kdcache.cache import holdout_fraction_filter, open_cache
from kdcache.pipeline.convert import convert_model
from kdcache.pipeline.smollm2 import smollm2_gguf

log = logging.getLogger(__name__)


def domain_teacher(out: Path, cache_dir: str, eval_fraction: float, steps: int = 16, batch_size: int = 8, lr: float = 1e-4, seed: int = 0) -> Path:
    """Fine-tune SmolLM2 on ``cache_dir``'s training rows into ``out`` (reused if it exists)."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").is_file():
        return out
    base = convert_model(str(smollm2_gguf()), out.parent / "smollm2-f32")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
    heldout = holdout_fraction_filter(eval_fraction)
    rows = [ex["input_ids"] for ex in open_cache(cache_dir).stream(columns=["input_ids"], keep=lambda i: not heldout(i))]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(steps):
        pick = [rows[order[(step * batch_size + j) % len(rows)]] for j in range(batch_size)]
        width = max(len(r) for r in pick)
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for j, r in enumerate(pick):
            ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == steps - 1:
            print(f"teacher-b step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in base.iterdir():  # tokenizer files
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out
