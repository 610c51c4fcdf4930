"""Where a training run's metric rows go: ``RUN/metrics.jsonl`` always, plus the reporters named in ``report_to``.

The loop hands every row (a train row every ``log_every`` steps, an eval row every ``eval_every``) to one
:class:`Reporters`; each reporter writes it its own way. A resumed run must not show a point twice, so
every reporter is opened at the step the run starts from and drops what was logged after it: the JSONL file is
truncated to its rows at or before that step, and TensorBoard is given ``purge_step`` (its readers discard the
events of an earlier session from that step on). Adding a backend is one class plus one entry in ``REPORTERS``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Callable, Protocol

from kdcache.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: `tensorboard --logdir RUN` finds it


class Reporter(Protocol):
    def write(self, row: dict, kind: str) -> None:
        """One metrics row (it holds ``step``); ``kind`` is ``train`` or ``eval``."""

    def close(self) -> None: ...


class JsonlReporter:
    """``RUN/metrics.jsonl``: one JSON line per row, flushed at once (a crash loses no logged row)."""

    def __init__(self, out: Path, start_step: int):
        from kdcache.train.run_dir import truncate_metrics  # here: `check_report_to` runs before torch is imported

        path = out / METRICS_FILE
        truncate_metrics(path, start_step)
        self._file = open(path, "a")

    def write(self, row: dict, kind: str) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardReporter:
    """``RUN/tensorboard/``: every numeric field of a row as the scalar ``KIND/FIELD`` at the row's step
    (``train/loss``, ``eval/eval_ppl``), so TensorBoard groups the train and eval curves apart."""

    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at steps >= start_step + 1 written by an earlier session (a crash after the checkpoint
        # we resume from) are dropped by TensorBoard's readers, as metrics.jsonl drops its rows after start_step
        self._writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step + 1)

    def write(self, row: dict, kind: str) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"{kind}/{key}", value, step)
        self._writer.flush()  # one row every log_every steps: cheap, and a killed run keeps its curves

    def close(self) -> None:
        self._writer.close()


def _need_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("report_to tensorboard needs the tensorboard package, which is not installed; "
                          "run `pip install 'kdcache[tensorboard]'` or drop --report-to tensorboard")


# name -> (factory, check that it can run here, called before torch loads)
REPORTERS: dict[str, tuple[Callable[[Path, int], Reporter], Callable[[], None]]] = {
    "tensorboard": (TensorBoardReporter, _need_tensorboard),
}


def check_report_to(names: list[str]) -> None:
    """Every name is a reporter that can run here; a one-line ConfigError naming the fix otherwise."""
    for name in names:
        if name == "jsonl":
            continue  # always on; naming it changes nothing
        if name not in REPORTERS:
            raise ConfigError(f"unknown reporter {name!r} in report_to; valid reporters: {', '.join(sorted(REPORTERS))} "
                              f"(metrics.jsonl is always written)")
        REPORTERS[name][1]()


class Reporters:
    """metrics.jsonl plus the chosen reporters, opened at ``start_step`` (the step the run starts or resumes from)."""

    def __init__(self, out: Path, names: list[str], start_step: int):
        check_report_to(names)
        self._all: list[Reporter] = [JsonlReporter(out, start_step)]
        try:
            for name in dict.fromkeys(n for n in names if n != "jsonl"):
                self._all.append(REPORTERS[name][0](out, start_step))
        except BaseException:
            self.close()
            raise

    def write(self, row: dict, kind: str) -> None:
        for r in self._all:
            r.write(row, kind)

    def close(self) -> None:
        for r in self._all:
            r.close()

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
