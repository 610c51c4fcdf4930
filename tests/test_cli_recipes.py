"""Recipes by name from the CLI, and one-line errors for unknown names and missing config files."""

from __future__ import annotations

from click.testing import CliRunner

from kdcache.cli import main
from kdcache.pipeline.recipes import RECIPES_DIR, list_recipes


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_recipes_lists_every_file():
    r = _run("recipes")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.output.splitlines()]
    assert names == sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) and "rs-kd" in names
    assert all(list_recipes().values())  # each recipe says what it does


def test_unknown_recipe_lists_valid_ones(tmp_path):
    r = _run("train", "--recipe", "nope", "--cache", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "unknown recipe 'nope'; valid recipes:" in r.output and "reverse-kl" in r.output
    r = _run("generate", "--recipe", "rs-kd", "--config", "x.yaml", "--teacher", "t", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "either --config or --recipe" in r.output


def test_missing_config_file_is_one_line(tmp_path):
    for cmd in ("train", "generate"):
        r = _run(cmd, "--config", tmp_path / "missing.yaml")
        assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "does not exist" in r.output, r.output


def test_recipe_is_used_by_train(tiny_cache, tmp_path):
    r = _run("train", "--recipe", "reverse-kl", "--cache", tiny_cache, "--out", tmp_path / "run", "--steps", 2, "--quiet",
             "--set", "student.hidden_size=32", "--set", "student.num_layers=1", "--set", "student.num_heads=2",
             "--set", "student.num_kv_heads=1", "--set", "student.intermediate_size=64", "--set", "eval_every=0")
    assert r.exit_code == 0, r.output
    assert "loss: rkl" in (tmp_path / "run" / "config.yaml").read_text()
