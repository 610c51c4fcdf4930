"""Every shipped recipe (kdcache/configs/recipes, `kdcache recipes`) runs end to end (generate with its settings, train with its loss) on
the tiny teacher; mechanisms that are not a loss (the alpha schedule) are checked here too."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from kdcache.config import build_config, to_dict
from kdcache.pipeline.config import GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.train import TrainConfig, train
from kdcache.pipeline.recipes import list_recipes, recipe_path
from kdcache.train.loop import alpha_at

# recipes for `kdcache train` (cross-task-kd trains with `kdcache classify`: tests/test_cross_task.py)
RECIPES = [p for p in (recipe_path(name) for name in list_recipes()) if "train" in yaml.safe_load(p.read_text())]
TINY_STUDENT = {"student.hidden_size": 32, "student.num_layers": 2, "student.num_heads": 2, "student.num_kv_heads": 1, "student.intermediate_size": 64}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return {}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_end_to_end(recipe, tiny_teacher, text_jsonl, tmp_path_factory, caches):
    data = yaml.safe_load(recipe.read_text())
    # a recipe made for its own embedded data (step-by-step: word problems) keeps it; the others read the test rows
    source = data["generate"].get("data", {}).get("source") or str(text_jsonl)
    gen = build_config(GenerateConfig, recipe, {"teacher": str(tiny_teacher), "data.source": source, "data.max_length": 48,
                                                "data.max_rows": 40, "generation.max_new_tokens": 4, "out": "pending",
                                                # the tiny teacher has 2 blocks: its layers instead of a 30-block teacher's
                                                **({"hidden_layers": [1, 2]} if data["generate"].get("hidden_layers") else {}),
                                                # the test rows have only `text`: a fixed context instead of one from their fields
                                                **({"context": "notes on the list :"} if data["generate"].get("context") else {})}, section="generate")
    key = json.dumps({k: v for k, v in to_dict(gen).items() if k != "out"}, sort_keys=True)
    if key not in caches:  # recipes with the same generate settings share a cache, as users would
        gen.out = str(tmp_path_factory.mktemp("recipe_cache") / "cache")
        generate(gen, progress=False)
        caches[key] = gen.out
    out = tmp_path_factory.mktemp("recipe_run") / recipe.stem
    cfg = build_config(TrainConfig, recipe, {"cache": caches[key], "out": str(out), "steps": 6, "batch_size": 4, "eval_fraction": 0.2,
                                             "eval_every": 0, "save_every": 0, "log_every": 1, "warmup_steps": 1, **TINY_STUDENT}, section="train")
    if cfg.stages:  # the same stages, in 6 steps
        cfg.stages[0].steps = 3
    if "exits" in cfg.terms:  # the recipe's middle block of a 4-block student is block 1 of the tiny one
        cfg.terms["exits"] = {**cfg.terms["exits"], "layers": [1]}
    final = train(cfg, progress=False)
    assert math.isfinite(final["eval_ppl"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metric = {"kd": "kd"}.get(cfg.loss, cfg.loss)
    stages = cfg.stages or [type("Stage", (), {"loss": "", "terms": None})()]
    for r in (r for r in rows if "loss" in r):  # each logged row has its stage's logit loss and terms
        stage = stages[r.get("stage", 0)]
        expected = [stage.loss or metric] if (stage.loss or metric) != "none" else []
        expected += list(cfg.terms if stage.terms is None else stage.terms)
        assert expected and all(math.isfinite(r[m]) for m in expected), f"{recipe.stem}: no {expected} metric"
    assert data["train"]["loss"] == cfg.loss
    if gen.generation.enabled:  # sequence-level / response-based: trained on teacher continuations, loss on them only
        from kdcache.cache import open_cache

        for ex in open_cache(caches[key]).stream():
            assert "#g" in ex["example_id"] or gen.generation.rows == "unanswered"  # (rows with a response are scored as given)
            mask = ex["loss_mask"]
            assert not mask[: ex["prompt_length"] - 1].any() and mask[ex["prompt_length"] - 1 :].all()


def test_alpha_schedule_moves_from_start_to_end():
    cfg = TrainConfig(loss="kd", alpha=0.8, alpha_schedule="cosine", alpha_end=0.3, steps=11)
    values = [alpha_at(cfg, s) for s in range(11)]
    assert values[0] == pytest.approx(0.8) and values[-1] == pytest.approx(0.3) and values[5] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(values, values[1:]))
    lin = TrainConfig(loss="kd", alpha=0.2, alpha_schedule="linear", alpha_end=1.0, steps=5)
    assert [alpha_at(lin, s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert alpha_at(TrainConfig(loss="ce", alpha=0.7), 3) == 0.0
    assert alpha_at(TrainConfig(loss="kd", alpha=0.7), 3) == 0.7


def test_alpha_schedule_reaches_the_training_loss(tiny_cache, tmp_path):
    cfg = TrainConfig(cache=str(tiny_cache), out=str(tmp_path / "r"), loss="kd", alpha=1.0, alpha_schedule="linear", alpha_end=0.0,
                      steps=5, batch_size=4, eval_every=0, save_every=0, log_every=1, warmup_steps=1,
                      **{"student": build_config(TrainConfig, None, TINY_STUDENT).student})
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["alpha"] for r in rows] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # alpha = 1: the loss is the KD term alone; alpha = 0: cross-entropy alone.
    assert rows[0]["loss"] == pytest.approx(rows[0]["kd"], rel=1e-5)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["ce"], rel=1e-5)
