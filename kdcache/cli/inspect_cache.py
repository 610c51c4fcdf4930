"""``kdcache inspect``: what a cache holds, from the manifest and the small per-example stats columns (streamed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdcache.cache import open_cache
from kdcache.cache.stream_stats import ColumnSummary, column_summaries
from kdcache.config import plural


def summarize(path: str | Path) -> dict[str, Any]:
    """The manifest's facts plus exact per-example NLL and entropy statistics, read one row group at a time
    (kdcache/cache/stream_stats.py: a few passes over three small columns, memory flat in the cache's size)."""
    cache = open_cache(path, verify_sha256=False)  # page checksums and footers still checked; no full-file hash
    m = cache.manifest
    stats_cols = ["teacher_nll", "teacher_entropy", "num_loss_tokens"]

    def chunks():
        # through the reader, so a damaged shard is one line naming it (checksums, sizes, footers), never a traceback
        for g in range(len(cache.row_groups)):
            yield cache.read_block(g, stats_cols).scalars

    weighted = {"nll_x_tokens": 0.0, "tokens": 0, "scored": 0}  # running sums for the perplexity over loss targets
    for b in chunks():
        nll, n = np.asarray(b["teacher_nll"], dtype=np.float64), np.asarray(b["num_loss_tokens"], dtype=np.int64)
        weighted["nll_x_tokens"] += float(np.nansum(nll * n))
        weighted["tokens"] += int(n.sum())
        weighted["scored"] += int((~np.isnan(nll)).sum())
    summaries = column_summaries(chunks, ["teacher_nll", "teacher_entropy"])
    total = max(weighted["tokens"], 1)

    def dist(c: ColumnSummary) -> dict[str, float]:
        if not c.count:
            return {}
        return {"mean": c.mean, "p10": c.percentiles[10], "p50": c.percentiles[50], "p90": c.percentiles[90]}

    return {
        "path": str(cache.path),
        "status": m.status,
        "format_version": m.format_version,
        "rows": m.num_rows,
        "tokens": m.num_tokens,
        "bytes": m.num_bytes,
        "bytes_per_token": m.num_bytes / max(m.num_tokens, 1),
        "shards": len(m.shards),
        "top_k": m.top_k,
        "topk_codec": _topk_codec(m),
        "tail_at_temperature": _tail_at_temperature(m),
        "signals": {name: sorted(sig.get("columns", {})) for name, sig in m.signals.items()},
        "teacher_name": teacher_name(m.teacher) if m.teacher else _ensemble_name(m.settings.get("ensemble", [])),
        "teacher": m.teacher,
        "tokenizer": {k: m.tokenizer.get(k) for k in ("fingerprint", "vocab_size", "tokenizer_size")},
        "dataset": m.settings.get("dataset", {}),
        "loss_tokens": weighted["tokens"],
        # None without next-token scores (an encoder teacher's NLL is NaN): never a perplexity of 1 from no data
        "teacher_ppl": float(np.exp(weighted["nll_x_tokens"] / total)) if weighted["scored"] else None,
        "teacher_nll_per_example": dist(summaries["teacher_nll"]),
        "teacher_entropy_per_example": dist(summaries["teacher_entropy"]),
        "stats": m.stats,
        "context": m.signals.get("context", {}).get("template"),
        # the plot's 40-bin histograms (counts, edges): what matplotlib's hist(x, bins=40) would draw
        "_hist": {k: (v.hist_counts, v.hist_edges) for k, v in summaries.items()},
    }


def _topk_codec(m) -> str | None:
    """How the top-k is stored, in words: the codec and its parameters (lists: the value codec)."""
    if "topk" not in m.signals:
        return None
    storage = m.signals["topk"].get("storage")
    if storage is None:
        return f"lists, {m.signals['topk']['columns']['topk_logprobs']['codec']} values"
    extra = {k: v for k, v in storage["params"].items() if k not in ("codec", "version", "k", "vocab_size")}
    return f"{storage['name']} {', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in extra.items())}".strip()


# Folder names that say nothing about the model on their own: shown with their parent (kd/final).
_GENERIC_FOLDERS = {"final", "model", "models", "teacher", "checkpoint", "snapshot"}


def teacher_name(teacher: dict) -> str | None:
    """A short, true name for a recorded teacher: a hub id as given, a local .gguf file's stem
    (SmolLM2-135M-Instruct.Q4_1), a model folder's name. The full path stays in ``teacher["path"]``."""
    name = teacher.get("name")
    path = teacher.get("path") or name
    if not name or not path:
        return name
    if not Path(path).is_absolute():  # a hub id: recorded as given, never resolved to a path
        return name
    p = Path(path)
    if p.suffix == ".gguf":
        return p.stem
    if p.name in _GENERIC_FOLDERS or p.name.startswith("step-"):
        return f"{p.parent.name}/{p.name}"
    return p.name


def _ensemble_name(ensemble: list[dict]) -> str | None:
    """A combined cache (``kdcache combine``): its teachers and weights."""
    if not ensemble:
        return None
    return "mixture of " + ", ".join(f"{teacher_name(e.get('teacher', {})) or '?'} ({e.get('weight', 0):g})" for e in ensemble)


def _short_source(source: str | None) -> str | None:
    """A local dataset's file or folder name; a hub dataset or embedded:NAME as given."""
    if source and Path(source).is_absolute():
        return Path(source).name
    return source


def _tail_at_temperature(m) -> str | None:
    """How a trainer gets the teacher's tail bucket at T != 1 from this cache (see README, temperature)."""
    if "topk" not in m.signals:
        return None
    temps = m.tail_temperatures
    exact = f"exact at T in {', '.join(f'{t:g}' for t in temps)}; " if temps else ""
    return exact + "bucket-tempered approximation at other T != 1 (k+1 buckets tempered on both sides)"


def format_summary(s: dict[str, Any]) -> str:
    t = s["teacher"]
    teacher = f"{s['teacher_name']}  [{t.get('backend')}, {t.get('dtype')}, config {t.get('config_hash')}]" if t else s["teacher_name"]
    lines = [
        f"cache        {s['path']}  ({s['status']}, format v{s['format_version']})",
        f"teacher      {teacher}",
        f"tokenizer    {s['tokenizer']['fingerprint']}  vocab {s['tokenizer']['vocab_size']}",
        f"dataset      {s['dataset'].get('source')}  split {s['dataset'].get('split')}  max_length {s['dataset'].get('max_length')}",
        f"rows         {s['rows']:,}  in {plural(s['shards'], 'shard')}",
        f"tokens       {s['tokens']:,}  ({s['loss_tokens']:,} loss targets)",
        f"bytes        {s['bytes']:,}  ({s['bytes_per_token']:.1f} B/token)",
        "signals      " + "; ".join(f"{k}: {', '.join(v)}" for k, v in s["signals"].items()),
        f"top-k        {s['top_k']}" + (f"  (codec {s['topk_codec']})" if s["topk_codec"] else ""),
    ]
    if s["context"]:
        lines.append(f"context      the teacher read {s['context']!r} before each row (the student does not; offsets in context_tokens)")
    if s["tail_at_temperature"]:
        lines.append(f"tail at T!=1 {s['tail_at_temperature']}")
    if s["teacher_ppl"] is not None:
        lines.append(f"teacher ppl  {s['teacher_ppl']:.2f} on the loss targets")
    for key, label in (("teacher_nll_per_example", "nll/example"), ("teacher_entropy_per_example", "entropy/ex.")):
        d = s[key]
        if d:
            lines.append(f"{label:12s} mean {d['mean']:.3f}  p10 {d['p10']:.3f}  p50 {d['p50']:.3f}  p90 {d['p90']:.3f} nats")
    if s["stats"]:
        lines.append("counts       " + ", ".join(f"{k}={v}" for k, v in sorted(s["stats"].items())))
    return "\n".join(lines)


def plot_title(s: dict[str, Any]) -> str:
    """Which teacher on which data, and how much: the plot's title."""
    d = s["dataset"]
    split = f" ({d['split']})" if d.get("split") else ""
    return (f"{s['teacher_name'] or 'unknown teacher'} on {_short_source(d.get('source')) or 'unknown dataset'}{split}\n"
            f"{Path(s['path']).name}: {s['rows']:,} rows, {s['tokens']:,} tokens, {s['bytes_per_token']:.0f} B/token")


def figure(s: dict[str, Any]):
    """Histograms of per-example teacher NLL and entropy, each with its mean and median marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        from kdcache.errors import KDCacheError

        raise KDCacheError("plots need matplotlib; run `pip install 'kdcache[plot]'`") from None
    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2)
    panels = (("teacher_nll", "teacher_nll_per_example", "teacher NLL per example (nats)"),
              ("teacher_entropy", "teacher_entropy_per_example", "teacher entropy per example (nats)"))
    for ax, (key, stats, label) in zip(axes, panels):
        counts, edges = s["_hist"][key]
        if len(counts):
            ax.hist(edges[:-1], bins=edges, weights=counts, color="#4477aa")
        d = s[stats]
        if d:  # the same numbers as the text summary's mean and p50
            ax.axvline(d["mean"], color="#cc3311", linestyle="-", linewidth=1.5, label=f"mean {d['mean']:.2f}")
            ax.axvline(d["p50"], color="#222222", linestyle="--", linewidth=1.5, label=f"median {d['p50']:.2f}")
            ax.legend(frameon=False, fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("examples")
    fig.suptitle(plot_title(s), fontsize=10)
    fig.tight_layout()
    return fig


def plot_summary(s: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`figure` as a PNG; returns the path written."""
    path = Path(path)
    figure(s).savefig(path, dpi=110)
    return path
