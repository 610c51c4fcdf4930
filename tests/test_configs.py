"""Every shipped config and recipe loads into its typed config, and the config layer rejects what it should."""

from __future__ import annotations

import pytest

from kdcache.config import build_config, field_docs
from kdcache.errors import ConfigError
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.recipes import list_recipes, recipe_path, shipped_config
from kdcache.cli.demo import DemoConfig
from kdcache.train.config import StudentConfig, TrainConfig

# Found the way an installed kdcache finds them (importlib.resources), not by a path into the checkout.
CONFIGS = [shipped_config(n) for n in ("demo.yaml", "debug.yaml", "kd.yaml")] + [recipe_path(n) for n in list_recipes()]


def test_the_list_is_every_packaged_yaml():
    from importlib.resources import files

    def walk(node):
        for child in node.iterdir():
            yield from walk(child) if child.is_dir() else [child] if child.name.endswith(".yaml") else []

    assert sorted(p.name for p in CONFIGS) == sorted(p.name for p in walk(files("kdcache") / "configs")) and len(CONFIGS) >= 21


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    import yaml

    data = yaml.safe_load(path.read_text())
    assert "generate" in data or "train" in data
    if "generate" in data:
        build_config(GenerateConfig, path, section="generate")
    if "train" in data:
        build_config(TrainConfig, path, section="train")
    if "out" in data:  # a demo-shaped file
        build_config(DemoConfig, path)


def test_demo_defaults_are_the_packaged_demo_yaml():
    """DemoConfig() reads its defaults from the packaged demo.yaml (the one place they are written): an edit
    there changes `kdcache demo`, and the values are those the demo has always run with."""
    from kdcache.config import to_dict

    assert to_dict(build_config(DemoConfig, shipped_config("demo.yaml"))) == to_dict(DemoConfig())
    # the values `kdcache demo` ran with before they moved to demo.yaml (every field given: no default is read)
    expected = DemoConfig(
        out="runs/demo",
        generate=GenerateConfig(top_k=64, sampled_tokens=28, batch_tokens=4096,
                                data=DataConfig(source="embedded:stdlib-docs", max_rows=300, max_length=128)),
        train=TrainConfig(loss="rskd", alpha=0.5, temperature=1.0, steps=200, batch_size=8, lr=3e-3, warmup_steps=20,
                          eval_fraction=0.1, eval_every=0, save_every=100, log_every=25,
                          student=StudentConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384)),
    )
    assert to_dict(DemoConfig()) == to_dict(expected)


def test_demo_defaults_follow_an_edited_demo_yaml(tmp_path, monkeypatch):
    import kdcache.cli.demo as demo
    import kdcache.pipeline.recipes as recipes

    (tmp_path / "demo.yaml").write_text(shipped_config("demo.yaml").read_text().replace("steps: 200", "steps: 7").replace("top_k: 64", "top_k: 5"))
    monkeypatch.setattr(recipes, "CONFIGS", tmp_path)
    demo._demo_yaml.cache_clear()
    try:
        cfg = DemoConfig()
        assert (cfg.train.steps, cfg.generate.top_k, cfg.train.loss) == (7, 5, "rskd")
    finally:
        demo._demo_yaml.cache_clear()


def test_unknown_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key stepz \(did you mean steps\?\)"):
        build_config(TrainConfig, bad, section="train")


def test_overrides_parse_types_and_nested_keys():
    cfg = build_config(TrainConfig, overrides=["steps=7", "student.hidden_size=64", "alpha=0.25", "resume=true"])
    assert (cfg.steps, cfg.student.hidden_size, cfg.alpha, cfg.resume) == (7, 64, 0.25, True)
    with pytest.raises(ConfigError, match="key=value"):
        build_config(TrainConfig, overrides=["steps"])
    with pytest.raises(ConfigError, match="expected an integer"):
        build_config(TrainConfig, overrides=["steps=many"])
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\], got 2"):
        build_config(TrainConfig, overrides=["alpha=2"])
    with pytest.raises(ConfigError, match="is not one of"):
        build_config(GenerateConfig, overrides=["data.truncation=chop"])


def test_every_field_is_documented():
    for cls in (GenerateConfig, TrainConfig, DemoConfig):
        for name, _, help_text in field_docs(cls):
            assert help_text, f"{cls.__name__}.{name} has no help text"


def test_a_partial_section_keeps_the_enclosing_configs_defaults():
    """`kdcache demo --steps 6` overrides one train field: the rest stay the demo's (its loss, eval split,
    student), not TrainConfig's class defaults."""
    from kdcache.config import build_config

    full = DemoConfig()
    cfg = build_config(DemoConfig, None, {"train.steps": 6, "generate.data.max_rows": 24}, ["train.student.num_layers=2"])
    assert cfg.train.steps == 6 and cfg.generate.data.max_rows == 24 and cfg.train.student.num_layers == 2
    assert (cfg.train.loss, cfg.train.eval_fraction, cfg.train.log_every) == (full.train.loss, full.train.eval_fraction, full.train.log_every)
    assert cfg.generate.sampled_tokens == full.generate.sampled_tokens and cfg.generate.data.source == full.generate.data.source
    assert cfg.train.student.hidden_size == full.train.student.hidden_size


def test_fields_lists_the_demos_own_defaults():
    from kdcache.config import field_docs

    docs = {name: default for name, default, _ in field_docs(DemoConfig)}
    assert docs["train.loss"] == repr(DemoConfig().train.loss) and docs["generate.sampled_tokens"] == repr(DemoConfig().generate.sampled_tokens)
