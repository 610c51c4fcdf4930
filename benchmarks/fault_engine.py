"""The kill -9 engine of the fault-injection run: real CLI subprocesses killed at random moments, then rerun.

Each trial starts a real ``python -m kdcache <command>`` (generate, train, combine or merge), kills it with SIGKILL
at a moment drawn uniformly from [0, the uninterrupted run's wall time] (seeded), possibly several times, reruns
the same command to completion and compares what it wrote with an uninterrupted reference run of the same
command: every example (id and every column, exactly: one intra-op thread and one row per teacher batch make the
teacher's numbers independent of where a run resumed), ``verify --deep``, and for ``train`` the student's
safetensors bytes and its logged metrics. Nothing here is mocked: the tiny teacher is the tests' random Llama.

Used by ``benchmarks/fault_injection.py`` (the full run) and ``tests/test_fault_injection.py`` (a fast subset).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny teacher: one source of truth for the fixture

from conftest import _sentences, build_tiny_llama, build_tiny_tokenizer  # noqa: E402

COMMANDS = ("generate", "train", "combine", "merge")
TARGETS = ("local", "s3")
"""Where the caches live: local folders, or s3:// on a moto server started by the run (benchmarks/fault_s3.py);
with s3 every cache a trial writes or reads is on the bucket, while train's run folder stays local."""

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
KDCACHE = [sys.executable, "-m", "kdcache"]
TIMING_KEYS = {"tokens_per_s"}  # the only metric that may differ between identical training runs
STUDENT = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def refuse_target(target: str) -> None:
    if target not in TARGETS:
        raise SystemExit(f"error: --target {target} is not a fault-injection target; use --target {' or '.join(TARGETS)}")


def remove(path) -> None:
    """A local folder or a prefix on the bucket, and everything under it."""
    if hasattr(path, "remove_tree"):
        path.remove_tree()
    else:
        shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Sizes:
    """How big each trial's work is: big enough that kills land mid-work, small enough for 50 trials in minutes."""

    rows: int = 300  # dataset rows the teacher scores
    steps: int = 40  # training steps of the student
    save_every: int = 3  # steps between checkpoints


def generate_command(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """batch_tokens=2: every teacher batch holds one row, so a row's numbers do not depend on where a run resumed;
    small shards and a 0.2 s time bound: many commits, so a kill loses little and resumes often."""
    return [*KDCACHE, "generate", "--teacher", str(teacher), "--dataset", str(data), "--out", str(out), "--top-k", "4",
            "--max-length", "48", "--quiet", "--set", "device=cpu", "--set", "logprob_codec=fp32", "--set", "batch_tokens=2",
            "--set", "row_group_tokens=256", "--set", "shard_tokens=1024", "--set", "commit_seconds=0.2", *extra]


def train_config(cache: Path, out: Path, sizes: Sizes) -> dict:
    return {"train": {"cache": str(cache), "out": str(out), "student": dict(STUDENT), "loss": "kd", "alpha": 0.5,
                      "steps": sizes.steps, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                      "save_every": sizes.save_every, "eval_fraction": 0.1, "device": "cpu", "precision": "fp32"}}


def run(cmd: list[str], log: Path, timeout: float = 600) -> tuple[int, float]:
    """Run to the end; (exit code, wall seconds). stdout and stderr go to ``log``."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return rc, time.monotonic() - t0


def start(cmd: list[str], log: Path, preexec=None) -> subprocess.Popen:
    f = open(log, "w")
    try:
        return subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, preexec_fn=preexec)
    finally:
        f.close()  # the child holds its own copy


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


class World:
    """The fixtures every trial shares: teachers, dataset, and the reference (uninterrupted) run of each command,
    built on first use; ``wall[command]`` is that run's wall time, the range kill moments are drawn from."""

    def __init__(self, root: Path, sizes: Sizes, store=None):
        """``store``: a started fault_s3.S3Server to keep the caches on (None: local folders under ``root``)."""
        self.root, self.sizes, self.store = Path(root), sizes, store
        if store is not None:
            ENV.update(store.client_env)  # every kdcache subprocess reaches the bucket through the cuttable proxy
        self.root.mkdir(parents=True, exist_ok=True)
        self.wall: dict[str, float] = {}
        self._refs: dict[str, Path] = {}
        self.teacher = self._teacher("teacher", seed=0)
        self.data = self.root / "rows.jsonl"
        self.data.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(sizes.rows, seed=5)))

    def _teacher(self, name: str, seed: int) -> Path:
        path = self.root / name
        if not (path / "config.json").is_file():
            build_tiny_llama(path, build_tiny_tokenizer(path), seed=seed)
        return path

    def place(self, rel: str, kind: str = "cache"):
        """Where a cache named ``rel`` lives: under ``root``, or under this world's prefix of the bucket. A run folder
        (``kind="train"``) stays local either way."""
        if self.store is None or kind == "train":
            return self.root / rel
        from kdcache.cache.filesystem import RemotePath

        return RemotePath(self.store.url(self.root.name, rel))

    def _reference(self, name: str, cmd: list[str], out: Path, timed: str | None = None, prepare=None) -> Path:
        if name not in self._refs:
            if not _finished(out):
                remove(out)
                if prepare is not None:
                    prepare()
                rc, wall = run(cmd, self.root / f"{name}.log")
                if rc != 0:
                    raise RuntimeError(f"reference {name} failed (rc {rc}): {last_line(self.root / f'{name}.log')}")
                (self.root / f"{name}.wall").write_text(f"{wall:.3f}")
            if timed:  # also for a reference reused from an earlier invocation with this root
                self.wall[timed] = float((self.root / f"{name}.wall").read_text())
            self._refs[name] = out
        return self._refs[name]

    def command(self, kind: str, out: Path) -> list[str]:
        """The command a trial of ``kind`` runs, writing into ``out``."""
        if kind == "generate":
            return generate_command(self.teacher, self.data, out)
        if kind == "train":
            config = out.parent / "train.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump(train_config(self.reference("generate"), out, self.sizes)))
            return [*KDCACHE, "train", "--config", str(config), "--quiet"]
        if kind == "combine":
            return [*KDCACHE, "combine", str(self.reference("generate")), str(self.reference("second")), "--weights", "0.7,0.3",
                    "--out", str(out)]
        if kind == "merge":
            return [*KDCACHE, "merge", "--out", str(out)]
        raise ValueError(f"unknown command {kind!r}; choose from {COMMANDS}")

    def prepare(self, kind: str, out: Path) -> None:
        """What must be in place before the command runs: a merge joins complete parts (copied fresh per trial)."""
        if kind == "merge":
            parts = self.reference("parts")
            out.mkdir(parents=True)
            for part in sorted(p for p in parts.iterdir() if p.name.startswith("part-")):
                if self.store is not None:
                    (out / part.name).upload_tree(part)
                else:
                    shutil.copytree(part, out / part.name)

    def reference(self, name: str) -> Path:
        """``generate``, ``train``, ``combine``, ``merge`` (the reference runs of the trials' commands, timed) and
        the inputs they need: ``second`` (a second teacher's cache), ``parts`` (a job array's two complete parts, kept
        local: a merge trial copies them to its own output first)."""
        refs = self.root / "refs"
        if name == "second":
            out = self.place("refs/second")
            return self._reference(name, generate_command(self._teacher("teacher2", seed=1), self.data, out), out)
        if name == "parts":
            out = refs / "parts"
            for i in range(2):
                self._reference(f"part{i}", generate_command(self.teacher, self.data, out, "--num-shards", "2", "--shard-index", str(i)),
                                out / f"part-{i:05d}-of-00002")
            return out
        out = self.place(f"refs/{name}", name)
        return self._reference(name, self.command(name, out), out, timed=name, prepare=lambda: self.prepare(name, out))


def _finished(out: Path) -> bool:
    """A reference left by an earlier invocation with the same root (reused, not rebuilt)."""
    if (out / "final_metrics.json").is_file():
        return True
    try:
        return json.loads((out / "_manifest.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ comparisons
def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def compare_caches(got: Path, ref: Path) -> dict:
    """Examples lost (reference ids missing), duplicated (ids stored more than once), differing (same id, some
    column not bit-equal, or stored out of the reference's order), and ``verify --deep`` of ``got``."""
    from kdcache.cache import open_cache, read_manifest
    from kdcache.cache.verify import verify_cache

    report = verify_cache(got, deep=True)
    result = {"verify_ok": report.ok, "verify": report.lines()[:3], "complete": False, "lost": None, "duplicated": None, "differing": None}
    if not report.ok:
        return result
    result["complete"] = read_manifest(got).status == "complete"
    xs, ys = list(open_cache(got)), list(open_cache(ref))
    counts = collections.Counter(x["example_id"] for x in xs)
    by_id = {y["example_id"]: y for y in ys}
    result["lost"] = sum(1 for i in by_id if i not in counts)
    result["duplicated"] = sum(c - 1 for c in counts.values() if c > 1)
    differing = sum(1 for x in xs if x["example_id"] in by_id and
                    (set(x) != set(by_id[x["example_id"]]) or not all(_same(v, by_id[x["example_id"]][k]) for k, v in x.items())))
    in_order = [x["example_id"] for x in xs] == [y["example_id"] for y in ys]
    result["differing"] = differing + (0 if in_order or differing else 1)
    return result


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def compare_runs(got: Path, ref: Path) -> dict:
    """The student's weight files byte for byte, the logged metrics row for row (each step once), the final eval."""
    files = sorted(p.relative_to(ref / "final") for p in (ref / "final").rglob("*.safetensors"))
    identical = bool(files) and all((got / "final" / f).is_file() and (got / "final" / f).read_bytes() == (ref / "final" / f).read_bytes()
                                    for f in files)
    same_log = (got / "metrics.jsonl").is_file() and _metrics(got) == _metrics(ref)
    same_eval = (got / "final_metrics.json").is_file() and \
        json.loads((got / "final_metrics.json").read_text()) == json.loads((ref / "final_metrics.json").read_text())
    return {"identical": identical, "same_metrics": same_log and same_eval}


# ------------------------------------------------------------------------------------------ one trial
def progress_at_kill(kind: str, out: Path) -> int:
    """What was committed when the kill landed: shards listed by the manifest, or the latest checkpoint's step."""
    try:
        if kind == "train":
            name = (out / "checkpoints" / "latest").read_text().strip()
            return int(name.rsplit("-", 1)[1])
        return len(json.loads((out / "_manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


@dataclasses.dataclass
class Trial:
    index: int
    kind: str
    kills: int = 0  # SIGKILLs delivered
    finished_early: int = 0  # runs that ended before their kill moment (no kill delivered)
    kills_after_commit: int = 0  # kills that found something committed (a shard, a checkpoint)
    committed_at_kill: list[int] = dataclasses.field(default_factory=list)  # shards listed / checkpoint step, per kill
    delays: list[float] = dataclasses.field(default_factory=list)
    resumed: bool = False  # the rerun of the same command exited 0
    lost: int | None = None
    duplicated: int | None = None
    differing: int | None = None
    verify_ok: bool | None = None
    identical: bool | None = None  # train: the student's bytes equal the uninterrupted run's
    note: str = ""

    @property
    def ok(self) -> bool:
        if self.kind == "train":
            return self.resumed and bool(self.identical)
        return self.resumed and bool(self.verify_ok) and self.lost == 0 and self.duplicated == 0 and self.differing == 0


def kill_trial(world: World, index: int, kind: str, rng: random.Random, max_kills: int = 3) -> Trial:
    """Kill ``kind`` 1..max_kills times at uniform random moments, rerun it to the end, compare with the reference."""
    ref = world.reference(kind)
    work = world.root / "trials" / f"{index:03d}-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = world.place(f"trials/{index:03d}-{kind}/out", kind)
    remove(out)
    world.prepare(kind, out)
    cmd = world.command(kind, out)
    trial = Trial(index, kind)
    for attempt in range(rng.randint(1, max_kills)):
        delay = rng.uniform(0.0, world.wall[kind])
        trial.delays.append(round(delay, 3))
        proc = start(cmd, work / f"killed-{attempt}.log")
        try:
            rc = proc.wait(timeout=delay)
            trial.finished_early += 1
            if rc != 0:
                trial.note = f"run {attempt} failed before its kill (rc {rc}): {last_line(work / f'killed-{attempt}.log')}"
                return trial
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            trial.kills += 1
            trial.committed_at_kill.append(progress_at_kill(kind, out))
            trial.kills_after_commit += trial.committed_at_kill[-1] > 0
    rc, _ = run(cmd, work / "rerun.log")
    trial.resumed = rc == 0
    if not trial.resumed:
        trial.note = f"rerun failed (rc {rc}): {last_line(work / 'rerun.log')}"
        return trial
    if kind == "train":
        result = compare_runs(out, ref)
        trial.identical = result["identical"] and result["same_metrics"]
        if not trial.identical:
            trial.note = f"student differs from the uninterrupted run's: {result}"
    else:
        result = compare_caches(out, ref)
        trial.verify_ok, trial.lost, trial.duplicated, trial.differing = (result["verify_ok"], result["lost"], result["duplicated"],
                                                                          result["differing"])
        if not result["complete"] and result["verify_ok"]:
            trial.note = "rerun exited 0 but the cache is not complete"
            trial.verify_ok = False
        elif not result["verify_ok"]:
            trial.note = f"verify --deep failed: {result['verify']}"
    if trial.ok:
        shutil.rmtree(work, ignore_errors=True)  # a failed trial's folder stays for inspection
        remove(out)
    return trial


def schedule(trials: int, commands: tuple[str, ...] = COMMANDS) -> list[str]:
    """Commands in turn, so every one gets a share of the trials."""
    return [commands[i % len(commands)] for i in range(trials)]
