"""``kdcache born-again``: iterative self-distillation (born-again networks, Furlanello et al. 2018).

Generation 0 is a student distilled from the teacher; generation g+1 is a fresh student of the same
architecture distilled from generation g, whose ``run/final`` folder is the teacher of ``generate``
(transformers backend) for the next cache. Everything lands under ``work``::

    WORK/gen-<g>/cache               generation g's cache (teacher: the original, or gen-<g-1>/run/final)
    WORK/gen-<g>/run                 generation g's student (final/, final_metrics.json, config.yaml)
    WORK/gen-<g>/trained_on.json     the cache (settings hash, rows) that run was trained on
    WORK/gen-<g>/own_teacher.json    the student on its own cache's held-out rows (agreement with its teacher)
    WORK/generations.{json,md}       one row per generation

Every generation is evaluated on the held-out rows of generation 0's cache (``train.eval_cache``, unless
the config names another), so perplexity and top-1 agreement with the *original* teacher compare across
generations. The held-out split is by example id, the same rows in every generation's cache, so no
student (nor any student acting as a teacher) ever trains on them.

Each stage resumes: ``generate`` resumes an unfinished cache and returns a complete one without loading
the teacher (its settings, the teacher's weights fingerprint included, must match); a complete run
(``final_metrics.json``, the same config, trained on the same cache) is skipped, an unfinished one
resumes from its last checkpoint. A generation whose cache or run no longer matches (settings changed,
or an earlier generation was redone) is refused unless ``overwrite`` is set, which redoes it and, since
its student changes, every generation after it.

Seeds: generation g trains with ``train.seed + g`` (a fresh initialisation and data order, as in the
paper), or ``train.seed`` for every generation with ``same_seed``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdcache.config import at_least, check_fields, doc, from_dict, load_yaml, to_dict, typed_sections
from kdcache.errors import CacheMismatchError, ConfigError, Interrupted
from kdcache.pipeline.config import GenerateConfig
from kdcache.pipeline.recipes import shipped_config
from kdcache.train.config import TrainConfig

log = logging.getLogger(__name__)

# Set by born-again for each generation: a value given in the config would be silently replaced.
_PLACED = {"generate": ("out", "overwrite"), "train": ("cache", "out", "overwrite")}


@functools.lru_cache(maxsize=1)
def _demo_yaml() -> dict:
    return load_yaml(shipped_config("demo.yaml"))


def _demo_section(cls: type, name: str):
    """The demo's teacher, data and student are born-again's defaults; a recipe or --config sets the method."""
    return from_dict(cls, copy.deepcopy(_demo_yaml()[name]), name)


@dataclass
class BornAgainConfig:
    """Defaults: the generate and train sections of the packaged ``kdcache/configs/demo.yaml``."""

    generations: int = doc("Students trained in sequence: generation 0 from the teacher, generation g from generation g-1.", 3, valid=at_least(1))
    work: str = doc("Folder of the generations: WORK/gen-<g>/cache and WORK/gen-<g>/run, and the table WORK/generations.{json,md}.", "runs/born-again")
    same_seed: bool = doc("Train every generation with train.seed (false: generation g uses train.seed + g, a fresh init and data order).", False)
    overwrite: bool = doc(
        "Redo a generation whose cache or run no longer matches its settings (or was made from an earlier generation that was redone), "
        "and so every later one; false refuses such a mismatch. Complete, matching generations are kept either way.", False)
    generate: GenerateConfig = doc(
        "Generate stage of every generation; `teacher` is generation 0's (empty: the embedded SmolLM2); generation g>=1's is "
        "WORK/gen-<g-1>/run/final through the transformers backend.", default_factory=lambda: _demo_section(GenerateConfig, "generate"))
    train: TrainConfig = doc(
        "Train stage of every generation (the same student spec); eval_cache empty: generation 0's cache, so every generation "
        "is evaluated on the same held-out rows.", default_factory=lambda: _demo_section(TrainConfig, "train"))

    def __post_init__(self):
        typed_sections(self)
        check_fields(self)
        defaults = {"generate": GenerateConfig(), "train": TrainConfig()}
        for section, keys in _PLACED.items():
            given = [k for k in keys if getattr(getattr(self, section), k) != getattr(defaults[section], k)]
            if given:
                fix = "--set overwrite=true" if given[0] == "overwrite" else "--out WORK"
                raise ConfigError(f"born-again sets {', '.join(f'{section}.{k}' for k in given)} for each generation (under WORK/gen-<g>/); "
                                  f"drop {'it' if len(given) == 1 else 'them'} from the config and use {fix}")

    def validate(self) -> None:
        """What can be checked before anything heavy loads: generation 0's stages as they will run."""
        if not self.work:
            raise ConfigError("no work folder given; pass --out WORK")
        generation_config(self, 0).validate()
        train_config(self, 0).validate()


def _gen_dir(cfg: BornAgainConfig, g: int) -> Path:
    return Path(cfg.work) / f"gen-{g}"


def original_teacher(cfg: BornAgainConfig) -> str:
    if cfg.generate.teacher:
        return cfg.generate.teacher
    from kdcache.pipeline.smollm2 import smollm2_gguf

    return str(smollm2_gguf())


def generation_config(cfg: BornAgainConfig, g: int, overwrite: bool = False) -> GenerateConfig:
    """Generation g's generate stage: the original teacher for g = 0, else generation g-1's student."""
    if g == 0:
        teacher, backend = original_teacher(cfg), cfg.generate.backend
    else:
        teacher, backend = str(_gen_dir(cfg, g - 1) / "run" / "final"), "transformers"
    return dataclasses.replace(cfg.generate, teacher=teacher, backend=backend, out=str(_gen_dir(cfg, g) / "cache"), overwrite=overwrite)


def train_config(cfg: BornAgainConfig, g: int) -> TrainConfig:
    """Generation g's train stage: a fresh student on generation g's cache, evaluated on generation 0's held-out rows."""
    return dataclasses.replace(
        cfg.train, cache=str(_gen_dir(cfg, g) / "cache"), out=str(_gen_dir(cfg, g) / "run"),
        seed=cfg.train.seed + (0 if cfg.same_seed else g), eval_cache=cfg.train.eval_cache or str(_gen_dir(cfg, 0) / "cache"))


def _with_our_flags(message: str) -> str:
    """generate's and train's own fixes, as born-again spells them."""
    return (message.replace("pass --overwrite", "pass --set overwrite=true").replace("--overwrite to start over", "--set overwrite=true to start over")
            .replace("pass --resume", "pass --set train.resume=true"))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_complete(tcfg: TrainConfig) -> bool:
    """The run in ``tcfg.out`` finished with exactly this config."""
    run = Path(tcfg.out)
    if not (run / "final_metrics.json").is_file() or not (run / "final" / "config.json").is_file():
        return False
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    from kdcache.train.loop import comparable_config  # the resume check's view: old flat keys moved, sections in full

    strip = lambda d: {k: v for k, v in comparable_config(d).items() if k not in ("resume", "overwrite")}  # noqa: E731
    return strip(saved) == strip(to_dict(tcfg))


def _generate(cfg: BornAgainConfig, g: int, progress: bool):
    from kdcache.pipeline.generate import generate

    try:
        return generate(generation_config(cfg, g), progress=progress)
    except CacheMismatchError as exc:
        if not cfg.overwrite:
            raise CacheMismatchError(f"generation {g}: {_with_our_flags(str(exc))}") from None
    log.info("generation %d: regenerating %s (--set overwrite=true)", g, _gen_dir(cfg, g) / "cache")
    return generate(generation_config(cfg, g, overwrite=True), progress=progress)


def _train(cfg: BornAgainConfig, g: int, manifest, progress: bool) -> dict:
    """Generation g's student: skipped when complete on this very cache, else trained (or resumed)."""
    from kdcache.train.loop import train

    tcfg = train_config(cfg, g)
    run, stamp_path, own = Path(tcfg.out), _gen_dir(cfg, g) / "trained_on.json", _gen_dir(cfg, g) / "own_teacher.json"
    stamp = {"cache": tcfg.cache, "settings_hash": manifest.settings_hash, "rows": manifest.num_rows, "tokens": manifest.num_tokens}
    started = (run / "config.yaml").is_file()
    if started and _read_json(stamp_path) != stamp:  # trained (in part) on another cache: its teacher was redone since
        if not cfg.overwrite:
            raise CacheMismatchError(
                f"generation {g}: {run} was trained on another {tcfg.cache} (its teacher or settings changed since); "
                f"pass --set overwrite=true to retrain generation {g} and every later one, or another --out")
        log.info("generation %d: retraining %s on the regenerated cache (--set overwrite=true)", g, run)
        shutil.rmtree(run)
    elif _run_complete(tcfg):
        log.info("generation %d: %s is complete; skipped", g, run)
        return json.loads((run / "final_metrics.json").read_text())
    _write_json(stamp_path, stamp)  # before the first checkpoint, so a resumed run is known to belong to this cache
    try:
        final = train(tcfg, progress=progress)
    except CacheMismatchError as exc:  # the run holds another config
        if not cfg.overwrite:
            raise CacheMismatchError(f"generation {g}: {_with_our_flags(str(exc))}") from None
        log.info("generation %d: retraining %s with the new settings (--set overwrite=true)", g, run)
        shutil.rmtree(run)
        final = train(tcfg, progress=progress)
    own.unlink(missing_ok=True)  # the student may have changed: its own-teacher evaluation is redone
    return final


def _own_teacher_eval(cfg: BornAgainConfig, g: int, final: dict) -> dict:
    """Generation g's student on its own cache's held-out rows: top-1 agreement with the teacher it was distilled from."""
    if g == 0 and not cfg.train.eval_cache:
        return final  # its own cache is generation 0's: the same rows, the same numbers
    path = _gen_dir(cfg, g) / "own_teacher.json"
    saved = _read_json(path)
    if saved is not None:
        return saved
    from kdcache.train.evaluate import evaluate_student

    tcfg = train_config(cfg, g)
    metrics = evaluate_student(tcfg.cache, str(Path(tcfg.out) / "final"), eval_fraction=tcfg.eval_fraction,
                               max_examples=tcfg.eval_max_examples, batch_size=tcfg.batch_size, device=tcfg.device)
    _write_json(path, metrics)
    return metrics


def _teacher_name(manifest, g: int) -> str:
    if g > 0:
        return f"gen-{g - 1} student"
    from kdcache.cli.inspect_cache import teacher_name

    return teacher_name(manifest.teacher) or "teacher"


def born_again(cfg: BornAgainConfig, progress: bool = True) -> list[dict]:
    """Run (or resume) every generation; write WORK/generations.json and .md; return one row per generation."""
    cfg.validate()
    rows = []
    for g in range(cfg.generations):
        stage = "generate"
        try:
            log.info("generation %d of %d: teacher %s", g, cfg.generations, generation_config(cfg, g).teacher)
            manifest = _generate(cfg, g, progress)
            stage = "train"
            final = _train(cfg, g, manifest, progress)
            stage = "evaluate"
            own = _own_teacher_eval(cfg, g, final)
        except Interrupted as exc:
            done = "" if not g else "generation 0 is complete; " if g == 1 else f"generations 0-{g - 1} are complete; "
            raise Interrupted(f"generation {g} ({stage}): {done}{exc}") from None
        tcfg = train_config(cfg, g)
        rows.append({
            "generation": g,
            "teacher": _teacher_name(manifest, g),
            "teacher_path": manifest.teacher.get("path"),
            "cache": tcfg.cache,
            "cache_rows": manifest.num_rows,
            "cache_tokens": manifest.num_tokens,
            "run": tcfg.out,
            "seed": tcfg.seed,
            "steps": final.get("step"),
            "eval_tokens": final.get("eval_tokens"),
            "eval_ppl": final.get("eval_ppl"),
            "eval_kd": final.get("eval_kd"),
            "top1_agreement_original": final.get("eval_top1_agreement"),
            "top1_agreement_own_teacher": own.get("eval_top1_agreement"),
            "teacher_ppl": final.get("teacher_ppl"),
        })
    work = Path(cfg.work)
    _write_json(work / "generations.json", {"generations": rows, "eval_cache": train_config(cfg, 0).eval_cache, "config": to_dict(cfg)})
    (work / "generations.md").write_text(format_table(rows, cfg) + "\n")
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict], cfg: BornAgainConfig) -> str:
    t = cfg.train
    evaluated_on = "generation 0's cache" if not t.eval_cache else t.eval_cache
    first = rows[0] if rows else {}
    lines = [
        f"born-again: {len(rows)} generation{'s' if len(rows) != 1 else ''}, loss {t.loss} (alpha={t.alpha}, T={t.temperature}), "
        f"{t.steps} steps x {t.batch_size} examples each; held-out rows of {evaluated_on} ({first.get('eval_tokens') or 0:,} tokens)",
        "",
        "| generation | teacher | cache rows | held-out ppl | top-1 agreement with original teacher | with its own teacher |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    if first.get("teacher_ppl") is not None:
        name = first["teacher"] if not t.eval_cache else "the eval cache's teacher"
        lines.append(f"| teacher | {name} | - | {first['teacher_ppl']:.2f} | 1.000 | - |")
    for r in rows:
        lines.append(f"| {r['generation']} | {r['teacher']} | {r['cache_rows']:,} | {_num(r['eval_ppl'], '.2f')} | "
                     f"{_num(r['top1_agreement_original'], '.3f')} | {_num(r['top1_agreement_own_teacher'], '.3f')} |")
    return "\n".join(lines)
