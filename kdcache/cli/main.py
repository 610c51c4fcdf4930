"""The ``kdcache`` command: a thin click layer over the Python API.

Each command loads its YAML (``--config``; a file may hold ``generate:``/``train:`` sections), applies
the named flags, then ``--set key=value`` overrides, and calls one function. Errors print one line
and exit non-zero.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import logging
import signal
import sys
from typing import Any

import click

from kdcache import __version__
from kdcache.config import build_config, field_docs, load_yaml, plural
from kdcache.errors import Interrupted, KDCacheError

log = logging.getLogger("kdcache")


def _set_help(example: str, command: str) -> str:
    return f"Override any config field, e.g. --set {example} (repeatable; `kdcache fields {command}` lists them)."


def _setup_logging(verbose: bool) -> None:
    """Our records once, through one handler; the libraries' own chatter (hub retries, transformers' advice)
    only with -v. Set before transformers or huggingface_hub is imported, which read their verbosity from
    the environment at import time."""
    import os

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for name in ("huggingface_hub", "transformers", "datasets", "filelock", "urllib3"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _sigterm_as_interrupt(signum, frame) -> None:
    """A cluster scheduler's SIGTERM stops a command like Ctrl-C does: committed work is kept and reported."""
    raise KeyboardInterrupt


def _torchrun_worker() -> bool:
    world = os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1


def _exit_now(code: Any) -> None:
    """End a torchrun worker without the interpreter's teardown, once its output is flushed (everything it writes
    is closed and fsynced by then). At teardown, a thread of the process group that still releases a tensor needs
    the GIL, and Python ends such a thread mid-C++ (std::terminate: the rank dies by SIGABRT after a run that
    succeeded; seen in 1 of 3 CI runs of tests/test_distributed.py); os._exit skips that teardown."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


class _OneLineErrors(click.Group):
    """Usage errors (an unknown flag, a value of the wrong type) as one ``error:`` line naming the help to
    read, like every other mistake, instead of click's three-line block."""

    def main(self, *args, **kwargs):
        try:
            self._main(*args, **kwargs)
        except SystemExit as exc:
            if _torchrun_worker():
                _exit_now(exc.code)
            raise

    def _main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        kwargs["prog_name"] = "kdcache"  # also under CliRunner and `python -m kdcache`: the name users type
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "kdcache"
            click.echo(f"error: {' '.join(exc.format_message().split())} (see `{where} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


class _LossOption(click.Option):
    """``--loss``'s help lists the registered losses, read from the registry only when help is shown (the
    registry imports torch; most commands never need it)."""

    def get_help_record(self, ctx):
        from kdcache.train.losses import LOSSES

        self.help = f"Loss: {', '.join(sorted(LOSSES))} (README: Losses)."
        return super().get_help_record(ctx)


_SECTIONS = {"generate": "generate", "train": "train", "classify": "classify"}  # section -> the command that reads it


def _run_dir_options(command):
    """The options every trainer shares: its run directory, resume/overwrite, device."""
    for option in reversed([
        click.option("--out", help="Run directory."),
        click.option("--resume", is_flag=True, default=None, help="Continue the latest checkpoint even with a changed config."),
        click.option("--overwrite", is_flag=True, default=None, help="Start over in --out."),
        click.option("--device", help="auto, cpu, cuda, cuda:N."),
    ]):
        command = option(command)
    return command


def _section(path: str | None, name: str) -> str | None:
    """Use the ``name:`` section when the YAML file has one, else the whole file (a file of other commands'
    sections only is refused: it is not meant for this command)."""
    if path is None:
        return None
    data = load_yaml(path)
    if name in data:
        return name
    others = [s for s in _SECTIONS if s in data and s != name]
    if others:
        raise KDCacheError(f"{path} has no {name}: section (it has {', '.join(others)}); run it with "
                           + " / ".join(f"`kdcache {_SECTIONS[s]}`" for s in others))
    return None


def _config_path(config_path: str | None, recipe: str | None) -> str | None:
    if recipe is None:
        return config_path
    if config_path is not None:
        raise KDCacheError("pass either --config or --recipe, not both")
    from kdcache.pipeline.recipes import recipe_path

    return str(recipe_path(recipe))


# Flag names that differ from their config key.
_FLAG_KEYS = {
    "source": "data.source", "fmt": "data.format", "field": "data.field", "split": "data.split",
    "max_length": "data.max_length", "max_rows": "data.max_rows", "strict": "data.strict",
    "gen_enabled": "generation.enabled", "max_new_tokens": "generation.max_new_tokens",
    "num_samples": "generation.num_samples", "student_path": "student.path",
}


def _flag_values(flags: dict) -> dict:
    return {_FLAG_KEYS.get(k, k): v for k, v in flags.items()}


def _number_list(text: str, kind: type, flag: str, example: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KDCacheError(f"{flag} takes comma-separated numbers such as {example}, got {text!r}") from None


def _run(fn, *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except Interrupted as exc:
        click.echo(f"interrupted: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KDCacheError as exc:
        ctx = click.get_current_context(silent=True)
        message = str(exc).replace("`kdcache fields CMD`", f"`kdcache fields {ctx.info_name}`") if ctx and ctx.info_name in ("generate", "train", "classify", "demo", "born-again") else str(exc)
        click.echo(f"error: {message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume from what was committed", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("error: out of memory; lower --batch-tokens (generate) or --batch-size (train)", err=True)
        sys.exit(3)
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch's CUDA OOM
            raise
        click.echo("error: the GPU ran out of memory; lower --batch-tokens (generate) or --batch-size (train)", err=True)
        sys.exit(3)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (and the libraries' own warnings).")
@click.version_option(version=__version__, prog_name="kdcache")
def main(verbose: bool) -> None:
    """kdcache: run a teacher once into a durable cache, distil many students from it."""
    _setup_logging(verbose)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML config (a `generate:` section is used if present).")
@click.option("--recipe", help="A shipped recipe by name (`kdcache recipes` lists them); instead of --config.")
@click.option("--teacher", help="Model folder, .gguf file or hub id.")
@click.option("--backend", help="Teacher backend: transformers or vllm (engine settings: --set vllm.FIELD=...).")
@click.option("--dataset", "source", help="Local data file/folder, hub dataset, or embedded:stdlib-docs.")
@click.option("--split", help="Dataset split.")
@click.option("--field", help="Text or messages field.")
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "messages", "prompt_response", "tokens"]), help="Row format.")
@click.option("--max-length", type=int, help="Max tokens per example.")
@click.option("--max-rows", type=int, help="Read at most N rows.")
@click.option("--top-k", type=int, help="Top-k log-probabilities to keep (0: none).")
@click.option("--codec", help="Top-k codec: lists (format 1, plain Parquet lists) or sqrt-delta (format 2, ~2x smaller); options: --set codec_options={kl: 3e-5}.")
@click.option("--sampled-tokens", type=int, help="RS-KD: tokens drawn per position from the teacher (0: off).")
@click.option("--hidden-layers", help="Comma-separated layers to store, e.g. 6,12,-1.")
@click.option("--tail-temperatures", help="KD temperatures to store the exact tail mass for, e.g. 2 or 2,4 (transformers backend).")
@click.option("--context", help="Text the teacher reads before each row, the student never (context distillation); {field} fills a row field.")
@click.option("--out", help="Cache directory.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing cache with other settings.")
@click.option("--strict", is_flag=True, default=None, help="Fail on the first bad row.")
@click.option("--device", help="auto, cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Teacher dtype.")
@click.option("--batch-tokens", type=int, help="Token budget per forward pass.")
@click.option("--num-shards", type=int, help="Job array: parts to split the dataset into, each into OUT/part-IIIII-of-NNNNN "
              "(default: KDCACHE_NUM_SHARDS, SLURM_ARRAY_TASK_COUNT, else 1); join them with `kdcache merge --out OUT`.")
@click.option("--shard-index", type=int, help="Job array: the part this task writes, 0..N-1 (default: SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX).")
@click.option("--generate-continuations", "gen_enabled", is_flag=True, default=None, help="Cache teacher continuations of each prompt.")
@click.option("--max-new-tokens", type=int, help="Tokens per continuation.")
@click.option("--num-samples", type=int, help="Continuations per prompt.")
@click.option("--set", "overrides", multiple=True, help=_set_help("data.max_rows=100", "generate"))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(config_path, recipe, hidden_layers, tail_temperatures, overrides, quiet, **flags) -> None:
    """Run the teacher once over a dataset and write a cache (re-running resumes)."""
    from kdcache.pipeline.config import GenerateConfig

    values = _flag_values(flags)
    if hidden_layers is not None:
        values["hidden_layers"] = _run(_number_list, hidden_layers, int, "--hidden-layers", "6,12,-1")
    if tail_temperatures is not None:
        values["tail_temperatures"] = _run(_number_list, tail_temperatures, float, "--tail-temperatures", "2,4")
    config_path = _run(_config_path, config_path, recipe)
    cfg = _run(lambda: build_config(GenerateConfig, config_path, values, list(overrides), section=_section(config_path, "generate")))
    from kdcache.pipeline.sharding import cache_dir, from_environment

    cfg = _run(from_environment, cfg)  # a job array's part from SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX, ... when not given
    _run(cfg.validate)  # mistakes in the settings cost milliseconds: nothing heavy is imported before this
    from kdcache.pipeline.generate import generate as run

    manifest = _run(run, cfg, progress=not quiet)
    click.echo(f"cache {cache_dir(cfg)}: {plural(manifest.num_rows, 'row')}, {plural(manifest.num_tokens, 'token')}, "
               f"{manifest.num_bytes / max(manifest.num_tokens, 1):.1f} B/token ({manifest.status})")


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML config (a `train:` section is used if present).")
@click.option("--recipe", help="A shipped recipe by name (`kdcache recipes` lists them); instead of --config.")
@click.option("--cache", help="Cache directory.")
@click.option("--student", "student_path", help="Student folder or hub id (default: build from student.* spec).")
@click.option("--loss", cls=_LossOption)
@click.option("--temperature", type=float, help="KD temperature.")
@click.option("--alpha", type=float, help="Weight of the KD term (1 - alpha on hard labels).")
@click.option("--steps", type=int, help="Optimizer steps.")
@click.option("--batch-size", type=int, help="Examples per micro-batch.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--report-to", help="Metrics also to: tensorboard (RUN/tensorboard/); metrics.jsonl is always written.")
@_run_dir_options
@click.option("--set", "overrides", multiple=True, help=_set_help("student.hidden_size=256", "train"))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(config_path, recipe, overrides, quiet, **flags) -> None:
    """Distil a student from a cache, without loading the teacher (re-running resumes)."""
    from kdcache.train.config import TrainConfig

    values = _flag_values(flags)
    config_path = _run(_config_path, config_path, recipe)
    cfg = _run(lambda: build_config(TrainConfig, config_path, values, list(overrides), section=_section(config_path, "train")))
    _run(cfg.validate)  # before torch is imported
    from kdcache.train.loop import train as run

    rank = os.environ.get("RANK", "0")  # under torchrun: rank 0 logs and prints, the others only warn
    if rank != "0":
        logging.getLogger().setLevel(logging.WARNING)
    metrics = _run(run, cfg, progress=not quiet)
    if rank == "0":
        click.echo(json.dumps(metrics, indent=2))


@main.command(name="eval")
@click.option("--cache", required=True, help="Cache directory.")
@click.option("--student", required=True, help="Student folder (e.g. RUN/final).")
@click.option("--eval-fraction", type=float, default=0.05, show_default=True, help="Held-out fraction to evaluate; 0 evaluates every row.")
@click.option("--max-examples", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--allow-pickle-weights", is_flag=True, help="Also load pickle (.bin) weights; only for files you trust.")
def eval_cmd(cache, student, eval_fraction, max_examples, batch_size, device, allow_pickle_weights) -> None:
    """Perplexity, KD loss and top-1 agreement of a student on a cache's held-out rows."""
    from kdcache.train.evaluate import evaluate_student

    metrics = _run(evaluate_student, cache, student, eval_fraction=eval_fraction, max_examples=max_examples, batch_size=batch_size, device=device,
                   allow_pickle_weights=allow_pickle_weights)
    click.echo(json.dumps(metrics, indent=2))


@main.command(name="eval-answers")
@click.option("--model", required=True, help="Causal LM: a student's RUN/final, a model folder or a .gguf file.")
@click.option("--dataset", default="embedded:word-problems-test", show_default=True, help="Rows with a prompt and its true answer.")
@click.option("--prompt-field", default="prompt", show_default=True)
@click.option("--answer-field", default="answer", show_default=True)
@click.option("--pattern", help="Regular expression whose first group is the answer (default: the word problems', 'The answer is (-?\\d+)').")
@click.option("--context", default="", help="Text read before each prompt (e.g. few-shot examples for a teacher).")
@click.option("--where", "where", multiple=True, help="Only rows with FIELD=VALUE (repeatable).")
@click.option("--max-rows", type=int, help="Answer at most N rows.")
@click.option("--max-new-tokens", type=int, default=24, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", "out", help="Also write the result as JSON to this file.")
def eval_answers(model, dataset, prompt_field, answer_field, pattern, context, where, max_rows, max_new_tokens, batch_size, device, out) -> None:
    """Accuracy of a model's greedy answers (no rationale) against each row's true answer."""
    from kdcache.cli.answers import answer_accuracy

    pairs = {}
    for item in where:
        if "=" not in item:
            raise click.UsageError(f"--where {item!r}: write FIELD=VALUE, e.g. --where task=answer")
        key, value = item.split("=", 1)
        pairs[key] = value
    result = _run(answer_accuracy, model, dataset, prompt_field=prompt_field, answer_field=answer_field,
                  **({"pattern": pattern} if pattern is not None else {}),
                  context=context, where=pairs, max_rows=max_rows, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, device=device)
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)


@main.command(name="render-text")
@click.option("--dataset", "source", default="embedded:stdlib-modules", show_default=True, help="Dataset whose text to render.")
@click.option("--field", default="text", show_default=True, help="Text field.")
@click.option("--max-rows", type=int, help="Render at most N rows.")
@click.option("--out", required=True, help="Folder for rows.jsonl and img/*.png.")
@click.option("--width", type=int, default=320, show_default=True)
@click.option("--height", type=int, default=64, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def render_text(source, field, max_rows, out, width, height, quiet) -> None:
    """Render each row's text to an image: paired data for cross-modal distillation (text teacher, image student)."""
    from kdcache.pipeline.config import DataConfig
    from kdcache.pipeline.render import render_dataset

    data = _run(DataConfig, source=source, field=field, max_rows=max_rows)
    click.echo(f"wrote {_run(render_dataset, data, out, width, height, progress=not quiet)}")


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML config (a `classify:` section is used if present).")
@click.option("--recipe", help="A shipped recipe by name, e.g. cross-task-kd (`kdcache recipes` lists them); instead of --config.")
@click.option("--cache", help="Cache directory (with a kept label field and, for the teacher, pooled embeddings).")
@click.option("--label-field", help="Cache column with each row's class.")
@click.option("--teacher-weight", type=float, help="Weight of the teacher-embedding term (0: the same student without the teacher).")
@click.option("--steps", type=int, help="Optimizer steps.")
@_run_dir_options
@click.option("--set", "overrides", multiple=True, help=_set_help("student.hidden_size=64", "classify"))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def classify(config_path, recipe, overrides, quiet, **flags) -> None:
    """Train a classifier student on a label the cache keeps, guided by the teacher's embeddings (cross-task KD)."""
    from kdcache.train.classify import ClassifyConfig

    config_path = _run(_config_path, config_path, recipe)
    cfg = _run(lambda: build_config(ClassifyConfig, config_path, _flag_values(flags), list(overrides), section=_section(config_path, "classify")))
    _run(cfg.validate)
    from kdcache.train.classify import train_classifier

    click.echo(json.dumps(_run(train_classifier, cfg, progress=not quiet), indent=2))


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plot", type=click.Path(), help="Write a PNG of per-example teacher NLL and entropy.")
def inspect(cache, as_json, plot) -> None:
    """Rows, tokens, bytes/token, signals, teacher and entropy statistics of a cache."""
    from kdcache.cli.inspect_cache import format_summary, plot_summary, summarize

    s = _run(summarize, cache)
    written = _run(plot_summary, s, plot) if plot else None
    s.pop("_hist")
    click.echo(json.dumps(s, indent=2) if as_json else format_summary(s))
    if written is not None:
        click.echo(f"wrote {written}", err=as_json)  # --json keeps stdout machine-readable


@main.command()
@click.argument("runs", nargs=-1)
@click.option("--out", required=True, help="PNG file to write.")
@click.option("--width", type=int, default=1200, show_default=True, help="Pixels.")
@click.option("--height", type=int, default=800, show_default=True, help="Pixels.")
def plot(runs, out, width, height) -> None:
    """Curves of training runs overlaid: loss terms, held-out perplexity, KD loss and top-1 agreement by step."""
    from kdcache.cli.plot_runs import plot_runs

    click.echo(f"wrote {_run(plot_runs, list(runs), out, width, height)}")


@main.command()
@click.argument("cache")
@click.option("--deep", is_flag=True, help="Also decode every row group and check every row (reads the whole cache).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify(cache, deep, as_json) -> None:
    """Check every shard's size, sha256 and footer against the manifest (--deep: every row too)."""
    from kdcache.cache.verify import verify_cache

    report = _run(verify_cache, cache, deep=deep)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        click.echo(report.summary())
    for line in [] if as_json else report.lines():
        click.echo(f"error: {line}", err=True)
    if not report.ok:
        sys.exit(2)


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="Demo YAML (default: the packaged kdcache/configs/demo.yaml).")
@click.option("--out", help="Output directory (default runs/demo).")
@click.option("--steps", type=int, help="Training steps per student.")
@click.option("--max-rows", type=int, help="Docstrings to score with the teacher.")
@click.option("--set", "overrides", multiple=True, help=_set_help("train.alpha=0.7", "demo"))
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(config_path, out, steps, max_rows, overrides, quiet) -> None:
    """Distil the embedded SmolLM2-135M teacher into a small student; compare with CE-only training."""
    from kdcache.cli.demo import DemoConfig, format_results, run_demo

    values = {"out": out, "train.steps": steps, "generate.data.max_rows": max_rows}
    cfg = _run(build_config, DemoConfig, config_path, values, list(overrides))
    results = _run(run_demo, cfg, progress=not quiet)
    click.echo("\n" + format_results(results, cfg))


@main.command(name="born-again")
@click.option("--config", "config_path", type=click.Path(), help="YAML with generations, generate: and train: sections (defaults: the demo's).")
@click.option("--recipe", help="A shipped recipe by name, e.g. born-again (`kdcache recipes` lists them); instead of --config.")
@click.option("--out", "work", help="Work folder: WORK/gen-<g>/{cache,run} and WORK/generations.{json,md} (default runs/born-again).")
@click.option("--generations", type=int, help="Students trained in sequence, each the teacher of the next.")
@click.option("--teacher", help="Generation 0's teacher: model folder, .gguf file or hub id (default: the embedded SmolLM2).")
@click.option("--steps", type=int, help="Training steps per generation.")
@click.option("--max-rows", type=int, help="Dataset rows every generation's teacher scores.")
@click.option("--set", "overrides", multiple=True, help=_set_help("train.alpha=0.7", "born-again"))
@click.option("--quiet", is_flag=True, help="No progress bars.")
def born_again(config_path, recipe, work, generations, teacher, steps, max_rows, overrides, quiet) -> None:
    """Born-again self-distillation: each generation's student is the next one's teacher (re-running resumes)."""
    from kdcache.cli.born_again import BornAgainConfig, born_again as run, format_table

    values = {"work": work, "generations": generations, "generate.teacher": teacher, "train.steps": steps, "generate.data.max_rows": max_rows}
    config_path = _run(_config_path, config_path, recipe)
    cfg = _run(build_config, BornAgainConfig, config_path, values, list(overrides))
    _run(cfg.validate)
    rows = _run(run, cfg, progress=not quiet)
    click.echo("\n" + format_table(rows, cfg))
    click.echo(f"\nwrote {cfg.work}/generations.json and generations.md")


@main.command()
@click.argument("caches", nargs=-1, required=True)
@click.option("--weights", required=True, help="Comma-separated weight per cache, e.g. 0.7,0.3 (normalised to sum 1).")
@click.option("--out", required=True, help="Directory of the combined cache.")
@click.option("--top-k", type=int, help="Tokens kept per position (default: the largest source k).")
@click.option("--codec", default="lists", show_default=True, help="Top-k codec of the combined cache: lists or sqrt-delta.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache with other settings.")
def combine(caches, weights, out, top_k, codec, overwrite) -> None:
    """Ensemble target from several teachers' caches (same tokenizer and examples), no teacher loaded."""
    from kdcache.cache.combine import combine_caches

    try:
        w = [float(x) for x in weights.split(",")]
    except ValueError:
        click.echo(f"error: --weights must be comma-separated numbers, got {weights!r}", err=True)
        sys.exit(2)
    m = _run(combine_caches, list(caches), w, out, top_k=top_k, overwrite=overwrite, codec=codec)
    click.echo(f"cache {out}: {plural(m.num_rows, 'row')}, mixture of {len(caches)} teachers, top-{m.top_k}")


@main.command()
@click.argument("parts", nargs=-1)
@click.option("--out", required=True, help="The folder the parts are in (OUT/part-IIIII-of-NNNNN): it becomes the merged cache.")
def merge(parts, out) -> None:
    """Join the parts of a job array (generate --num-shards N) into one cache: a manifest, no data copied."""
    from kdcache.cache.merge import merge_parts

    m = _run(merge_parts, out, list(parts) or None)
    click.echo(f"cache {out}: {plural(m.num_rows, 'row')}, {plural(m.num_tokens, 'token')}, "
               f"{plural(m.settings['job_array']['num_shards'], 'part')} merged in place ({plural(len(m.shards), 'shard')}, no data copied)")


@main.command()
@click.argument("cache")
def unlock(cache) -> None:
    """Remove CACHE's writer lock, for a holder you know is gone (e.g. killed on another machine)."""
    from kdcache.cache.lock import unlock as remove_lock

    holder = _run(remove_lock, cache)
    if holder is None:
        click.echo(f"cache {cache} is not locked; nothing to do")
    else:
        click.echo(f"removed the lock of cache {cache} (held by host {holder.get('host')}, pid {holder.get('pid')}, "
                   f"since {holder.get('started')}: {holder.get('command')})")


from kdcache.cli.import_cache import register as _register_import  # noqa: E402  (kdcache import: DistillKit logit datasets)

_register_import(main, _run)


@main.command()
@click.argument("cache")
@click.option("--out", required=True, help="New or empty folder for the plain Parquet files.")
def export(cache, out) -> None:
    """A cache as plain Parquet lists (codecs decoded) for tools that want arrays."""
    from kdcache.cache.export import export_cache

    click.echo(f"wrote {_run(export_cache, cache, out)}")


@main.command()
@click.argument("src")
@click.argument("out")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Weights dtype to save.")
@click.option("--overwrite", is_flag=True, help="Replace a model already in OUT.")
@click.option("--allow-pickle-weights", is_flag=True, help="Also load pickle (.bin) weights; only for files you trust.")
def convert(src, out, dtype, overwrite, allow_pickle_weights) -> None:
    """Save a .gguf teacher (or any transformers model) as a model folder that vLLM can load."""
    from kdcache.pipeline.convert import convert_model

    click.echo(f"wrote {_run(convert_model, src, out, dtype=dtype, overwrite=overwrite, allow_pickle_weights=allow_pickle_weights)}")


@main.command()
def recipes() -> None:
    """List the shipped recipes (kdcache/configs/recipes) usable with --recipe NAME."""
    from kdcache.pipeline.recipes import list_recipes

    import shutil
    import textwrap

    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    for name, what in _run(list_recipes).items():  # whole descriptions, wrapped under their name
        click.echo(textwrap.fill(what, width, initial_indent=f"{name:28s} ", subsequent_indent=" " * 29,
                                 break_on_hyphens=False, break_long_words=False))


@main.command()
@click.argument("command", type=click.Choice(["generate", "train", "classify", "demo", "born-again"]))
def fields(command) -> None:
    """List every config field of COMMAND with its default and meaning."""
    from kdcache.pipeline.config import GenerateConfig
    from kdcache.cli.born_again import BornAgainConfig
    from kdcache.cli.demo import DemoConfig
    from kdcache.train.config import TrainConfig

    from kdcache.train.classify import ClassifyConfig

    cls = {"generate": GenerateConfig, "train": TrainConfig, "classify": ClassifyConfig, "demo": DemoConfig, "born-again": BornAgainConfig}[command]
    rows = field_docs(cls)
    if command == "train":  # each loss's, pseudo-teacher's and loss term's own section, and a stage's keys
        from kdcache.train.config import StageConfig
        from kdcache.train.losses import LOSSES
        from kdcache.train.objective import TERMS
        from kdcache.train.pseudo_teachers import PSEUDO_TEACHERS

        rows += field_docs(StageConfig, prefix="stages[i].")
        for loss in sorted(LOSSES):
            rows += field_docs(LOSSES[loss].config, prefix=f"losses.{loss}.")
        for name in sorted(PSEUDO_TEACHERS):
            rows += field_docs(PSEUDO_TEACHERS[name].config, prefix=f"pseudo_teachers.{name}.")
        for term in sorted(TERMS):
            rows += field_docs(TERMS[term].config, prefix=f"terms.{term}.")
    width = max(32, *(len(name) + 1 for name, _, _ in rows))
    for name, default, help_text in rows:
        click.echo(f"{name:{width}s} {default:24s} {help_text}")


if __name__ == "__main__":  # pragma: no cover
    main()
