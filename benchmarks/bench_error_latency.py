"""How long a new user waits for the one-line answer to a mistake (issue: "errors from generate take 11-13 s").

Each mistake runs as a real ``python -m kdcache`` process (imports included, as a user sees it), offline
(``HF_HUB_OFFLINE=1``), against the embedded teacher and dataset; the median of ``--repeats`` runs is
reported with the exit code and the first characters of the line.

    .venv/bin/python benchmarks/bench_error_latency.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from kdcache.pipeline.smollm2 import smollm2_gguf


def mistakes(teacher: str, tmp: Path) -> list[tuple[str, list[str]]]:
    g = ["generate", "--teacher", teacher, "--dataset", "embedded:stdlib-docs", "--out", str(tmp / "out")]
    return [
        ("unknown flag", [*g, "--bogus-flag"]),
        ("--top-k -1", [*g, "--top-k", "-1"]),
        ("--hidden-layers 6,abc", [*g, "--hidden-layers", "6,abc"]),
        ("missing local dataset", [*g[:4], "mydata.jsonl", *g[5:]]),
        ("missing teacher path", ["generate", "--teacher", "./nosuch.gguf", "--out", str(tmp / "out")]),
        ("hub-style teacher, offline", ["generate", "--teacher", "nosuchteacher", "--out", str(tmp / "out")]),
        ("--field typo (needs the data)", [*g, "--field", "body", "--max-rows", "4"]),
        ("train --steps 0", ["train", "--cache", str(tmp / "nosuch"), "--out", str(tmp / "run"), "--steps", "0"]),
        ("typo in --set", ["train", "--set", "stpes=3"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"machine: {machine()}; median of {args.repeats} runs of `python -m kdcache ...`, offline\n")
        print("| mistake | exit | seconds | line |\n|---|---:|---:|---|")
        for name, argv in mistakes(str(smollm2_gguf()), tmp):
            times, last = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                last = subprocess.run([sys.executable, "-m", "kdcache", *argv], capture_output=True, text=True, env=env, timeout=600)
                times.append(time.perf_counter() - t0)
            line = (last.stderr.strip().splitlines() or [""])[-1]
            print(f"| {name} | {last.returncode} | {statistics.median(times):.2f} | `{line[:90]}` |")


if __name__ == "__main__":
    main()
