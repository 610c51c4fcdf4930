"""Tiny real fixtures: a word-level tokenizer and a random 2-layer Llama teacher built in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a an of to in and is was for on with as by at from that this it be are or not have has which "
    "function returns value list string file object class method name data type default error number "
    "module argument result python code line text set true false none if else when each new first"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,:;()'\"-_"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def build_tiny_llama(path: Path, tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper than init noise, so top-k and tails are not all flat
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: runs compared bit for bit must sum in the same order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_teacher")
    tok = build_tiny_tokenizer(path)
    build_tiny_llama(path, tok)
    return path


def _sentences(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(64)))
    return path


@pytest.fixture(scope="session")
def tiny_cache(tiny_teacher, text_jsonl, tmp_path_factory) -> Path:
    """A 64-row top-8 cache of the tiny teacher, shared by read-only tests."""
    from kdcache.pipeline.config import DataConfig, GenerateConfig
    from kdcache.pipeline.generate import generate

    out = tmp_path_factory.mktemp("caches") / "tiny"
    generate(GenerateConfig(teacher=str(tiny_teacher), out=str(out), top_k=8, row_group_tokens=256, shard_tokens=1024,
                            data=DataConfig(source=str(text_jsonl), max_length=64)), progress=False)
    return out


def sigint_as_in_a_terminal() -> None:
    """In the child: SIGINT at its default, as under a terminal. A shell without job control starts background
    commands with SIGINT ignored (a CI runner's `cmd &`), which Python then keeps, and the test would send Ctrl-C
    to a process that cannot hear it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
