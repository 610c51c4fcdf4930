"""What a training run keeps on disk (issue 10): final/ shares the last checkpoint's files instead of a
second copy, a copy where the file system refuses hard links, and both load as the trained model.

Real runs of a tiny student on the tiny cache; the only fault injected is an ``os.link`` that fails the way
it does across file systems (EXDEV).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcache.train import StudentConfig, TrainConfig, train
from kdcache.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: exact comparisons need one thread


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), student=StudentConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                intermediate_size=64), steps=4, batch_size=4, warmup_steps=1, log_every=1, eval_every=0, save_every=2,
                keep_checkpoints=2, device="cpu", precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _disk_bytes(root: Path) -> int:
    """Bytes of the distinct files under ``root`` (a file with two names counted once, as `du` does)."""
    seen: dict[tuple[int, int], int] = {}
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_final_shares_the_last_checkpoints_files(tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(_cfg(tiny_cache, out), progress=False)
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step-0000004"
    final, model_dir = _files(out / "final"), _files(ckpt / "model")
    assert final.keys() == model_dir.keys() and "model.safetensors" in final
    for name, path in final.items():  # one file with two names: weights, config and tokenizer alike
        assert path.samefile(model_dir[name]), name
    assert _disk_bytes(out) == _disk_bytes(out / "checkpoints") + (out / "metrics.jsonl").stat().st_size \
        + (out / "config.yaml").stat().st_size + (out / "final_metrics.json").stat().st_size

    # The checkpoints are kdcache's to rotate; final/ keeps its bytes when they go (or when a user deletes them).
    trained = load_file(str(final["model.safetensors"]))
    shutil.rmtree(out / "checkpoints")
    assert _same(load_file(str(out / "final" / "model.safetensors")), trained)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_rerun_and_more_steps_relink_final_to_the_new_last_checkpoint(tiny_cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_cache, out), progress=False)
    train(_cfg(tiny_cache, out), progress=False)  # the same command: resumes at the end, rewrites final/ from step 4
    assert (out / "final" / "model.safetensors").samefile(out / "checkpoints" / "step-0000004" / "model" / "model.safetensors")
    old_final = load_file(str(out / "final" / "model.safetensors"))

    train(_cfg(tiny_cache, out, steps=6), progress=False)  # more steps continue the run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000004", "step-0000006"]
    assert (out / "final" / "model.safetensors").samefile(out / "checkpoints" / "step-0000006" / "model" / "model.safetensors")
    # writing the new final/ left step 4's checkpoint as it was, and final/ holds the step-6 weights
    assert _same(load_file(str(out / "checkpoints" / "step-0000004" / "model" / "model.safetensors")), old_final)
    assert not _same(load_file(str(out / "final" / "model.safetensors")), old_final)


def test_final_is_a_copy_where_hard_links_fail(tiny_cache, tmp_path, monkeypatch):
    from kdcache.train import checkpoint

    def no_links(src, dst, *a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    out = tmp_path / "run"
    train(_cfg(tiny_cache, out), progress=False)
    final, model_dir = _files(out / "final"), _files(latest_checkpoint(out) / "model")
    assert final.keys() == model_dir.keys()
    for name, path in final.items():
        assert not path.samefile(model_dir[name]) and path.read_bytes() == model_dir[name].read_bytes(), name
    assert os.stat(final["model.safetensors"]).st_nlink == 1
