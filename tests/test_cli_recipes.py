"""Recipes by name from the CLI, and one-line errors for unknown names and missing config files."""

from __future__ import annotations

import re
import zipfile
from importlib.resources import files

import pytest
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.pipeline import recipes
from kdcache.pipeline.recipes import describe, list_recipes, recipe_path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_recipes_lists_every_file_with_its_whole_description():
    r = _run("recipes")
    assert r.exit_code == 0
    # one entry per recipe: its name, then its description wrapped under it (indented continuation lines)
    entries = [e for e in re.split(r"\n(?=\S)", r.output.strip())]
    packaged = sorted(p.name.removesuffix(".yaml") for p in (files("kdcache") / "configs" / "recipes").iterdir() if p.name.endswith(".yaml"))
    assert [e.split()[0] for e in entries] == packaged and "rs-kd" in packaged
    for entry, (name, what) in zip(entries, list_recipes().items()):
        assert " ".join(entry.split()[1:]) == " ".join(what.split()), name
        # the whole first paragraph: ends a sentence, and no sentence is cut at a comment line's end
        assert len(what) > 40 and re.search(r"[.!?]$", what), f"{name}: {what!r}"
    assert list_recipes()["kd-temperature"].endswith("the T^2 factor keeps the gradient scale comparable across T.")
    assert list_recipes()["augmentation-consistency"].endswith("own predictions under input augmentation.")


def test_describe_takes_the_first_comment_paragraph():
    text = "# One sentence that goes\n# on over two lines. And more.\n#   kdcache train --config X\n# loss = later\ntrain: {}\n"
    assert describe(text) == "One sentence that goes on over two lines. And more."
    assert describe("# First.\n#\n# Second paragraph.\n") == "First."
    assert describe("# Only one.\ngenerate: {}\n# a comment further down\n") == "Only one."
    assert describe("train: {}\n") == ""


def test_recipes_are_read_from_a_zipped_install(tmp_path, monkeypatch):
    """The lookup goes through importlib.resources: a package that is not on the filesystem (a zip) works
    too, each recipe handed to --recipe as a real file with the packaged text."""
    root = files("kdcache") / "configs"
    archive = tmp_path / "kdcache.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in (root / "recipes").iterdir():
            zf.writestr(f"kdcache/configs/recipes/{p.name}", p.read_text())
    expected = list_recipes()
    monkeypatch.setattr(recipes, "CONFIGS", zipfile.Path(archive, "kdcache/configs/"))
    assert list_recipes() == expected
    path = recipe_path("jsd")
    assert path.is_file() and path.read_text() == (root / "recipes" / "jsd.yaml").read_text()
    with pytest.raises(Exception, match="unknown recipe 'nope'; valid recipes: .*jsd"):
        recipe_path("nope")


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


def test_an_install_without_its_recipes_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "CONFIGS", tmp_path)
    with pytest.raises(Exception, match="recipes kdcache ships are missing .*reinstall kdcache"):
        list_recipes()
    (tmp_path / "recipes").mkdir()
    with pytest.raises(Exception, match="unknown recipe 'jsd'; valid recipes: none in "):
        recipe_path("jsd")
