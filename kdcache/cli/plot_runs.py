"""``kdcache plot RUN... --out FILE.png``: a training run's curves, for people who would rather look than read.

Reads only ``RUN/metrics.jsonl`` (the rows ``kdcache train`` logs; eval rows are those with ``eval_`` fields), so
it works on a run that is still going or was killed (a torn last line is skipped). Four panels by step: the loss
terms of the train rows, held-out perplexity (the teacher's as a dotted reference), the held-out KD loss at T=1 and
top-1 agreement with the teacher (kdcache/train/evaluate.py). Each run has one colour; the loss terms differ by
line style. Torch-free: matplotlib only (the ``plot`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.errors import ConfigError, KDCacheError

METRICS_FILE = "metrics.jsonl"  # kdcache.train.reporting.METRICS_FILE (not imported: that package loads torch)

# Fields of a train row that are not loss terms (kdcache/train/loop.py): the schedule, speed and the teacher's own NLL.
NOT_LOSS_TERMS = {"step", "lr", "alpha", "tokens_per_s", "stage", "curriculum_competence", "teacher_nll"}

# (panel title, eval field, reference field drawn dotted in the same colour, y label)
EVAL_PANELS = (
    ("held-out perplexity (dotted: teacher; log scale)", "eval_ppl", "teacher_ppl", "perplexity"),
    ("held-out KD loss vs teacher (T=1)", "eval_kd", None, "nats / token"),
    ("top-1 agreement with teacher", "eval_top1_agreement", None, "fraction of tokens"),
)
LINE_STYLES = ("-", "--", ":", "-.")


def read_run(run: str | Path) -> tuple[list[dict], list[dict]]:
    """A run's (train rows, eval rows) from its metrics.jsonl, each in file order."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        what = "does not exist" if not Path(run).exists() else f"has no {METRICS_FILE}"
        raise ConfigError(f"{run} {what}: not a training run (`kdcache train --out RUN` writes RUN/{METRICS_FILE}); pass run directories")
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if isinstance(row, dict) and "step" in row:
            (evals if any(k.startswith("eval_") for k in row) else train).append(row)
    if not train and not evals:
        raise ConfigError(f"{path} holds no metrics rows yet; plot it once the run has logged (every log_every steps)")
    return train, evals


def run_labels(runs: list[str | Path]) -> list[str]:
    """Each run's folder name, or its last two parts where names repeat (a/kd, b/kd)."""
    names = [Path(r).resolve().name for r in runs]
    return [f"{Path(r).resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def figure(runs: list[str | Path], width: int = 1200, height: int = 800, dpi: int = 100):
    """The four panels for ``runs`` overlaid, as a matplotlib Figure of ``width`` x ``height`` pixels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise KDCacheError("plots need matplotlib; run `pip install 'kdcache[plot]'`") from None
    if not runs:
        raise ConfigError("no run given; pass one or more run directories (kdcache plot RUN [RUN...] --out FILE.png)")
    if width < 200 or height < 200:
        raise ConfigError(f"--width and --height are pixels and must be at least 200, got {width}x{height}")
    data = [read_run(r) for r in runs]  # every run checked before anything is drawn
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax_loss, *ax_eval = fig.subplots(2, 2).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for label, color, (train, evals) in zip(run_labels(runs), colors, data):
        terms = [k for k in dict.fromkeys(k for r in train for k in r) if k not in NOT_LOSS_TERMS]
        for style, term in zip(LINE_STYLES * len(terms), terms):
            pts = [(r["step"], r[term]) for r in train if isinstance(r.get(term), (int, float))]
            if pts:
                ax_loss.plot(*zip(*pts), color=color, linestyle=style, linewidth=1.2, label=f"{label}: {term}")
        for ax, (_, field, reference, _) in zip(ax_eval, EVAL_PANELS):
            pts = [(r["step"], r[field]) for r in evals if isinstance(r.get(field), (int, float))]
            if pts:
                ax.plot(*zip(*pts), color=color, marker="o", markersize=3, linewidth=1.2, label=label)
            ref = [(r["step"], r[reference]) for r in evals if reference and isinstance(r.get(reference), (int, float))]
            if ref:
                ax.plot(*zip(*ref), color=color, linestyle=":", linewidth=1.0)
    ax_loss.set_title("training loss terms (per loss token)", fontsize=10)
    ax_loss.set_ylabel("nats / token")
    for ax, (title, _, _, ylabel) in zip(ax_eval, EVAL_PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if ylabel == "perplexity" and ax.get_lines():
            ax.set_yscale("log")  # a young student's perplexity and the teacher's differ by orders of magnitude
    for ax in (ax_loss, *ax_eval):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(frameon=False, fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
    fig.tight_layout()
    return fig


def plot_runs(runs: list[str | Path], out: str | Path, width: int = 1200, height: int = 800) -> Path:
    """Write :func:`figure` as a PNG of exactly ``width`` x ``height`` pixels; returns the path written."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the plot is a PNG; name the file FILE.png")
    fig = figure(runs, width, height)
    fig.savefig(out, dpi=fig.dpi)
    return out
