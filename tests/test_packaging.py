"""kdcache installs like any library: what it reads at run time ships inside the package and is found through
importlib.resources, a wheel built from the tree holds every config once, and there is one version string.
(scripts/check-wheel.sh installs that wheel into a fresh venv and runs the CLI from outside the checkout.)"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import CliRunner

import kdcache
from kdcache.cli import main
from kdcache.pipeline import recipes
from kdcache.pipeline.recipes import list_recipes, recipe_path, shipped_config

REPO = Path(__file__).resolve().parent.parent
PACKAGED = files("kdcache") / "configs"


def _packaged_yaml() -> dict[str, bytes]:
    """'kdcache/configs/...yaml' -> bytes, for every YAML file inside the package."""
    out = {}

    def walk(node, rel):
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{rel}/{child.name}")
            elif child.name.endswith(".yaml"):
                out[f"{rel}/{child.name}"] = child.read_bytes()

    walk(PACKAGED, "kdcache/configs")
    return out


def test_configs_are_found_through_importlib_resources_inside_the_package():
    package_dir = Path(kdcache.__file__).resolve().parent
    assert recipes.CONFIGS == PACKAGED
    for path in [recipe_path(n) for n in list_recipes()] + [shipped_config(n) for n in ("demo.yaml", "debug.yaml", "kd.yaml")]:
        assert path.resolve().is_relative_to(package_dir / "configs"), path
    assert sorted(list_recipes()) == sorted(p.name.removesuffix(".yaml") for p in (PACKAGED / "recipes").iterdir() if p.name.endswith(".yaml"))
    source = Path(recipes.__file__).read_text()
    assert "__file__" not in source and ".parent" not in source  # no path into a checkout


def test_the_checkouts_configs_folder_is_the_packaged_one():
    """configs/recipes/X.yaml keeps working for people and docs: one copy of each file, reached two ways."""
    link = REPO / "configs"
    assert link.is_symlink() and Path(link.readlink()) == Path("kdcache/configs")  # relative: works wherever the checkout lives
    assert (link / "recipes" / "jsd.yaml").resolve() == recipe_path("jsd").resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built the way `pip install .` builds one, from a copy of the tree (tracked and untracked files
    git does not ignore, symlinks kept as symlinks), so build/ and *.egg-info never land in the checkout."""
    src = tmp_path_factory.mktemp("tree")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if not (REPO / rel).is_symlink() and not (REPO / rel).exists():
            continue  # deleted in the working tree, not yet committed
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel, follow_symlinks=False)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("kdcache-*.whl")
    return whl


def test_the_wheel_holds_every_config_once(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        shipped = {n: zf.read(n) for n in names if n.endswith(".yaml")}
    assert len(names) == len(set(names))
    assert shipped == _packaged_yaml()  # every recipe and config, byte for byte, at its package path only
    assert {"kdcache/configs/demo.yaml", "kdcache/configs/recipes/rs-kd.yaml"} <= set(shipped) and len(shipped) >= 21
    assert {n.split("/")[0] for n in names} == {"kdcache", f"kdcache-{kdcache.__version__}.dist-info"}  # no top-level configs/ copy
    assert "kdcache/cli/main.py" in names and "kdcache/pipeline/recipes.py" in names


def test_one_version_string(wheel):
    """kdcache.__version__ is the one place; pyproject reads it, the wheel's metadata and --version say it."""
    assert 'dynamic = ["version"]' in (REPO / "pyproject.toml").read_text()
    assert "\nversion =" not in (REPO / "pyproject.toml").read_text().split("[tool.setuptools.dynamic]")[0]
    with zipfile.ZipFile(wheel) as zf:
        meta = email.message_from_bytes(zf.read(f"kdcache-{kdcache.__version__}.dist-info/METADATA"))
    assert meta["Name"] == "kdcache" and meta["Version"] == kdcache.__version__
    assert wheel.name.startswith(f"kdcache-{kdcache.__version__}-")
    r = CliRunner().invoke(main, ["--version"], prog_name="kdcache")
    assert r.exit_code == 0 and r.output.strip() == f"kdcache, version {kdcache.__version__}"
