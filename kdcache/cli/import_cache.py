"""``kdcache import SRC --out CACHE``: a DistillKit logit dataset as a kdcache cache, no teacher loaded.

A thin layer over :func:`kdcache.cache.distillkit.import_distillkit`: the compression settings come from
``--config`` (else the ``compression_config.yaml`` DistillKit writes next to its Parquet files), with
``--set key=value`` on top; errors are one line and leave no partial cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from kdcache.config import parse_override, plural
from kdcache.errors import ConfigError


def _overrides(items: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for text in items:
        key, value = parse_override(text)
        out[key] = value
    return out


def _load_tokenizer(path: str) -> Any:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder {path} does not exist; pass the teacher's tokenizer folder (a save_pretrained folder) to --tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0][:200]}") from None


def register(group: click.Group, run: Callable[..., Any]) -> None:
    """Add ``import`` to ``group``; ``run(fn, *args)`` calls ``fn`` turning kdcache errors into one line (main's ``_run``)."""

    @group.command(name="import")
    @click.argument("src")
    @click.option("--out", required=True, help="Cache directory to write.")
    @click.option("--config", "config_path", type=click.Path(),
                  help="DistillKit compression settings: its compression_config.yaml, or a training YAML with teacher.logprob_compressor "
                       "(default: compression_config.yaml next to SRC, if there is one).")
    @click.option("--set", "overrides", multiple=True, help="One compression setting, e.g. --set exact_k=16 or --set residual_bins=[] (repeatable; over --config).")
    @click.option("--vocab-size", type=int, help="The cache's vocabulary (default: the settings' d); give the model's (e.g. 151936) when it is larger.")
    @click.option("--tokenizer", help="Tokenizer folder to store as the cache's (needed to train students with kdcache train).")
    @click.option("--teacher", "teacher_name", help="Teacher name for the manifest, e.g. Qwen/Qwen3-235B-A22B.")
    @click.option("--logprob-codec", type=click.Choice(["fp16", "fp32", "bf16"]), default="fp16", show_default=True, help="How the cache stores log-probs.")
    @click.option("--max-rows", type=int, help="Import at most N source rows.")
    @click.option("--strict", is_flag=True, help="Fail on the first bad row instead of skipping and counting it.")
    @click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    def import_(src, out, config_path, overrides, vocab_size, tokenizer, teacher_name, logprob_codec, max_rows, strict, overwrite, quiet) -> None:
        """A DistillKit logit dataset (Parquet: input_ids, compressed_logprobs, bytepacked_indices) as a cache (re-running resumes)."""
        from kdcache.cache.distillkit import import_distillkit, load_config, source_files

        run(source_files, src)  # a missing source first: its folder may be where the settings are
        cfg, found = run(load_config, src, config_path, run(_overrides, overrides))
        if found is not None and config_path is None:
            click.echo(f"compression settings from {found}", err=True)
        tok = run(_load_tokenizer, tokenizer) if tokenizer else None
        if tok is None:
            click.echo("note: no --tokenizer: the cache records none, and kdcache train needs one to build or check a student", err=True)
        m = run(import_distillkit, src, out, cfg, vocab_size=vocab_size, tokenizer=tok, teacher=teacher_name, logprob_codec=logprob_codec,
                max_rows=max_rows, strict=strict, overwrite=overwrite, progress=not quiet)
        bad = sum(v for k, v in m.stats.items() if k.startswith("bad_rows"))
        click.echo(f"cache {out}: {plural(m.num_rows, 'row')}, {plural(m.num_tokens, 'token')}, top-{m.top_k}, "
                   f"{m.num_bytes / max(m.num_tokens, 1):.1f} B/token ({m.status})" + (f", {plural(bad, 'bad row')} skipped" if bad else ""))
