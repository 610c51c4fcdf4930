"""Loading a teacher with progress off draws no bar (issue 10): transformers' GGUF loader draws its
"Converting and de-quantizing GGUF tensors..." bar with tqdm directly, past transformers' own switch."""

from __future__ import annotations

import pytest

from kdcache.pipeline.teachers.transformers_backend import loading_bars

GGUF_BAR = "Converting and de-quantizing GGUF tensors"


@pytest.fixture
def bars_on():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield hf_logging
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _draw_like_the_gguf_loader() -> None:
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    for _ in gguf_loader.tqdm(range(3), desc=GGUF_BAR + "..."):  # the name the loader looks up when it loads
        pass


def test_progress_off_hides_the_gguf_bar_and_puts_everything_back(bars_on, capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    real = gguf_loader.tqdm
    with loading_bars(True):
        _draw_like_the_gguf_loader()
    assert GGUF_BAR in capfd.readouterr().err  # the bar this is about, drawn when allowed

    with loading_bars(False):
        assert not bars_on.is_progress_bar_enabled()
        _draw_like_the_gguf_loader()
    assert GGUF_BAR not in capfd.readouterr().err
    assert gguf_loader.tqdm is real and bars_on.is_progress_bar_enabled()

    bars_on.disable_progress_bar()  # the CLI turns transformers' bars off for every command
    with loading_bars(True):
        _draw_like_the_gguf_loader()
    assert GGUF_BAR not in capfd.readouterr().err
    assert not bars_on.is_progress_bar_enabled()


@pytest.mark.slow
def test_embedded_gguf_teacher_loads_without_a_bar_when_progress_is_off(bars_on, capfd):
    from kdcache.pipeline.smollm2 import smollm2_gguf
    from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher

    teacher = TransformersTeacher(str(smollm2_gguf()), device="cpu", dtype="float32")
    teacher.progress = False
    teacher.load()
    assert teacher.model is not None
    assert GGUF_BAR not in capfd.readouterr().err

    teacher.close()
    teacher.progress = True  # the control: the same load draws the bar when progress is on
    teacher.load()
    assert GGUF_BAR in capfd.readouterr().err
