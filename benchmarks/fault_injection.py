"""Fault injection: kill -9 at random moments across generate, train, combine and merge, plus a full disk, permission
lost mid-run and a second writer; prints a table and writes docs/reliability.md.

    PYTHONPATH=. python benchmarks/fault_injection.py --trials 50 --seed 0 --write docs/reliability.md

Each kill trial runs the real CLI, SIGKILLs it at a uniformly random moment of an uninterrupted run's wall time
(1..--max-kills times), reruns the same command to the end and compares with the uninterrupted reference: examples
lost, duplicated or differing (must be 0), ``verify --deep``, and the trained student's bytes (must be identical).
The engine is benchmarks/fault_engine.py (kills) and benchmarks/fault_other.py (the other faults); the tests run a
few trials of it (tests/test_fault_injection.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_engine import COMMANDS, Sizes, Trial, World, kill_trial, refuse_target, schedule  # noqa: E402
from fault_other import Outcome, run_faults  # noqa: E402


NOTES = "<!-- hand-written notes below: kept when the report is regenerated -->"


def summary(trials: list[Trial]) -> list[dict]:
    rows = []
    for kind in COMMANDS:
        ts = [t for t in trials if t.kind == kind]
        if not ts:
            continue
        caches = kind != "train"
        rows.append({
            "command": kind, "trials": len(ts), "kills": sum(t.kills for t in ts),
            "kills after a commit": sum(t.kills_after_commit for t in ts),
            "ended before the kill": sum(t.finished_early for t in ts),
            "resumed": sum(t.resumed for t in ts),
            "lost": sum(t.lost or 0 for t in ts) if caches else "-",
            "duplicated": sum(t.duplicated or 0 for t in ts) if caches else "-",
            "differing": sum(t.differing or 0 for t in ts) if caches else "-",
            "verify --deep ok": sum(bool(t.verify_ok) for t in ts) if caches else "-",
            "students bit-identical": "-" if caches else sum(bool(t.identical) for t in ts),
            "all good": sum(t.ok for t in ts),
        })
    return rows


def table(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def fault_table(outcomes: list[Outcome]) -> str:
    lines = ["| fault | command | exit code | one-line error | left cache verifies | rerun / first writer ok | equal to reference | good |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        left = ("- (a run folder)" if o.command == "train" else "no cache left (nothing committed)") if o.left_ok is None \
            else ("yes" if o.left_ok else "NO")
        lines.append(f"| {o.fault} | {o.command} | {o.exit_code} | {'yes' if o.one_line else 'NO'} | {left} | "
                     f"{'yes' if o.resumed else 'NO'} | {'yes' if o.equal else 'NO'} | {'yes' if o.ok else 'NO'} |")
    lines.append("")
    lines += [f"- {o.fault}, {o.command}: `{o.message[:240]}`" + (f" (note: {o.note})" if o.note else "") for o in outcomes]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50, help="kill -9 trials, shared in turn by generate, train, combine, merge")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments and counts")
    ap.add_argument("--max-kills", type=int, default=2, help="kills per trial: 1..N, drawn per trial")
    ap.add_argument("--rows", type=int, default=Sizes.rows, help="dataset rows per cache")
    ap.add_argument("--steps", type=int, default=Sizes.steps, help="training steps per student")
    ap.add_argument("--target", default="local", help="where the caches live: local (s3 is refused until kdcache supports it)")
    ap.add_argument("--no-other-faults", action="store_true", help="only the kill trials")
    ap.add_argument("--work", help="work folder (default: a new temporary folder)")
    ap.add_argument("--write", help="write the report (markdown) here, e.g. docs/reliability.md")
    args = ap.parse_args()
    refuse_target(args.target)
    t0 = time.monotonic()
    world = World(Path(args.work or tempfile.mkdtemp(prefix="kdcache-faults-")), Sizes(rows=args.rows, steps=args.steps))
    for kind in COMMANDS:
        world.reference(kind)
    print(f"references: {json.dumps({k: round(v, 2) for k, v in world.wall.items()})} s wall", flush=True)
    rng = random.Random(args.seed)
    trials = []
    for i, kind in enumerate(schedule(args.trials)):
        trials.append(kill_trial(world, i, kind, rng, args.max_kills))
        t = trials[-1]
        print(f"trial {i:3d} {kind:8s} kills {t.kills} at {t.delays} s (committed {t.committed_at_kill}) "
              f"{'ok' if t.ok else 'FAILED: ' + t.note}", flush=True)
    outcomes = [] if args.no_other_faults else run_faults(world)
    for o in outcomes:
        print(f"{o.fault} / {o.command}: {'ok' if o.ok else 'FAILED'}: {o.message[:160]} {o.note}", flush=True)
    minutes = (time.monotonic() - t0) / 60
    rows = summary(trials)
    print(table(rows))
    if outcomes:
        print(fault_table(outcomes))
    failed = [t for t in trials if not t.ok] + [o for o in outcomes if not o.ok]
    print(f"{len(trials)} trials, {sum(t.kills for t in trials)} kills, {len(outcomes)} other faults, "
          f"{len(failed)} failed, {minutes:.1f} min; work folder {world.root}")
    if args.write:
        command = "PYTHONPATH=. python benchmarks/fault_injection.py " + shlex.join(sys.argv[1:])
        path = Path(args.write)
        kept = path.read_text().partition(NOTES)[2] if path.is_file() else ""
        path.write_text(report(rows, outcomes, trials, command, minutes, world) + (NOTES + kept if kept else ""))
        print(f"wrote {args.write}")
    sys.exit(1 if failed else 0)


def report(rows, outcomes, trials, command, minutes, world) -> str:
    """The generated part of docs/reliability.md."""
    failures = [f"- trial {t.index} ({t.kind}): {t.note}" for t in trials if not t.ok]
    return "\n".join([
        "# Reliability: faults survived, in figures", "",
        "Generated by `benchmarks/fault_injection.py` (how it works: its docstring and the notes below).", "",
        f"Command: `{command}`  ", f"Took {minutes:.1f} min on this machine (2 shared cores). Reference runs' wall times "
        f"(kill moments are drawn uniformly from these): " + ", ".join(f"{k} {v:.1f} s" for k, v in world.wall.items()) + ".", "",
        "## kill -9 at random moments", "", table(rows), "",
        "*kills after a commit*: kills that found at least one shard (or checkpoint) committed, i.e. landed mid-work "
        "rather than while Python was still importing. *lost*: reference examples missing after the rerun; "
        "*duplicated*: examples stored more than once; *differing*: same id but some column not bit-equal (or out of order).", "",
        *(["Failures:", "", *failures, ""] if failures else ["No trial failed.", ""]),
        "## Other faults", "", fault_table(outcomes) if outcomes else "(not run)", "",
        "Sizes: " + json.dumps(dataclasses.asdict(world.sizes)) + ".", "",
    ])


if __name__ == "__main__":
    main()
