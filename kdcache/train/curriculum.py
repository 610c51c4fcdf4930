"""Curriculum distillation: the student meets the examples the teacher finds easy first.

The cache already holds each example's difficulty for the teacher (``teacher_nll``, ``teacher_entropy``),
so a curriculum costs no teacher pass. A pacing function gives the *competence* c(t) in (0, 1]: the
fraction of the training examples, easiest first, that may be trained on at step t (Platanios et al. 2019,
"Competence-based curriculum learning"): ``linear`` c0 + (1 - c0) t/T, ``root`` sqrt(c0² + (1 - c0²) t/T),
``step`` c0 then ``stages`` equal jumps, all reaching 1 at ``full_at`` of the run. Examples above the
current threshold are skipped as the shuffled stream passes them (they come back in later epochs), so
memory stays that of the stream plus one float per training example (the sorted difficulties), the
order is a function of the seed and the step alone, and a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import numpy as np

from kdcache.config import FRACTION, POSITIVE, Valid, check_fields, doc
from kdcache.errors import ConfigError


@dataclass
class CurriculumConfig:
    by: Literal["none", "teacher_nll", "teacher_entropy"] = doc(
        "Difficulty of an example, from the cache's per-example statistics (none: no curriculum, every example "
        "from step 0).", "none")
    order: Literal["easy_first", "hard_first"] = doc("easy_first: admit the lowest difficulties first (the classic curriculum); "
                                                     "hard_first: the highest first (an anti-curriculum, for comparison).", "easy_first")
    pacing: Literal["linear", "root", "step"] = doc("How the admitted fraction grows from `start` to 1 (see kdcache/train/curriculum.py).", "root")
    start: float = doc("Fraction of the training examples admitted at step 0.", 0.3, valid=Valid(0, 1, lo_open=True))
    full_at: float = doc("Fraction of the run's steps after which every example is admitted.", 0.5, valid=FRACTION)
    stages: int = doc("pacing step: equal jumps from `start` to 1.", 4, valid=POSITIVE)

    def __post_init__(self):
        check_fields(self)

    @property
    def enabled(self) -> bool:
        return self.by != "none"


def competence(cfg: CurriculumConfig, step: int, steps: int) -> float:
    """The fraction of training examples (easiest first) admitted at ``step`` of ``steps``."""
    horizon = cfg.full_at * steps
    if horizon <= 0 or step >= horizon:
        return 1.0
    t = step / horizon
    c0 = cfg.start
    if cfg.pacing == "linear":
        c = c0 + (1.0 - c0) * t
    elif cfg.pacing == "root":
        c = math.sqrt(c0 * c0 + (1.0 - c0 * c0) * t)
    else:  # step: c0 for the first stage, then `stages` equal jumps
        c = c0 + (1.0 - c0) * math.floor(t * cfg.stages) / cfg.stages
    return min(1.0, c)


def training_difficulties(cache: Any, by: str, is_heldout: Callable[[str], bool]) -> np.ndarray:
    """The sorted difficulties of the examples training reads (held-out ones excluded, NaN dropped): the
    per-example column of every row group, read through the cache's checked path; one float per example."""
    if by not in cache.columns:
        raise ConfigError(f"curriculum.by={by}: cache {cache.path} has no {by} column; use teacher_nll or teacher_entropy")
    parts = []
    for g in range(len(cache.row_groups)):
        block = cache.read_block(g, ["example_id", by])
        keep = np.fromiter((not is_heldout(i) for i in block.scalars["example_id"]), dtype=bool, count=block.num_rows)
        parts.append(np.asarray(block.scalars[by], dtype=np.float64)[keep])
    values = np.concatenate(parts) if parts else np.zeros(0)
    return np.sort(values[~np.isnan(values)])


class Curriculum:
    """Which examples a step may train on: those whose difficulty is within the easiest (or hardest) c(t)."""

    def __init__(self, cfg: CurriculumConfig, difficulties: np.ndarray, steps: int):
        self.cfg = cfg
        self.sorted = difficulties
        self.steps = steps

    def threshold(self, step: int) -> float:
        """Easy first: the largest admitted difficulty; hard first: the smallest."""
        n = len(self.sorted)
        if n == 0:
            return math.inf if self.cfg.order == "easy_first" else -math.inf
        m = max(1, math.ceil(competence(self.cfg, step, self.steps) * n))
        return float(self.sorted[m - 1]) if self.cfg.order == "easy_first" else float(self.sorted[n - m])

    def admits(self, difficulty: float, step: int) -> bool:
        if math.isnan(difficulty):
            return True  # no loss tokens: nothing to order, nothing to learn either
        t = self.threshold(step)
        return difficulty <= t if self.cfg.order == "easy_first" else difficulty >= t

    def filter(self, examples: Iterator[dict], current_step: Callable[[], int]) -> Iterator[dict]:
        """The examples of ``examples`` admitted at the step training is at when each is drawn."""
        by = self.cfg.by
        for ex in examples:
            if self.admits(float(ex[by]), current_step()):
                yield ex
