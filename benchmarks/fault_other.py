"""The other faults of the fault-injection run: a full disk, permission lost mid-run, a second writer.

Each is real. The full disk is a size-limited tmpfs mounted in a private user+mount namespace (``unshare -Urm``:
no privileges needed on the host, nothing visible outside); the command fills it (ENOSPC), the tmpfs is then
grown ("space freed") and the same command rerun in the same namespace. Permission loss runs the command as root
*without* CAP_DAC_OVERRIDE (``setpriv --bounding-set``; a plain root process ignores mode bits) and chmods its
output folder read-only while it runs, then restores it. The second writer is a second identical process started
while the first holds the cache's lock (the first is paused with SIGSTOP meanwhile, so the overlap does not depend
on the machine's speed; it is continued after). Expected each time: the faulted run exits non-zero with one ``error:``
line and no traceback, what it leaves verifies, and the rerun (or the first writer) ends equal to the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from fault_engine import ENV, World, compare_caches, compare_runs, generate_command, last_line, run, start

NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
"""Root that honours mode bits: what a chmod means to an ordinary user."""


@dataclasses.dataclass
class Outcome:
    fault: str
    command: str
    exit_code: int | None = None  # of the faulted run (the second writer, for that fault)
    message: str = ""  # its last line
    one_line: bool = False  # exactly one `error:` line, no traceback
    left_ok: bool | None = None  # what the faulted run left verifies (None: it left no cache, by design)
    resumed: bool = False  # the rerun (or the first writer) exited 0
    equal: bool = False  # ... and its output equals the reference's (examples or student bytes)
    note: str = ""
    seconds: float | None = None  # network cut: from the cut to the faulted run's exit

    @property
    def ok(self) -> bool:
        return (self.exit_code not in (None, 0) and self.one_line and self.left_ok is not False and self.resumed and self.equal
                and not self.note)


def _one_error_line(log: Path) -> tuple[bool, str]:
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    return len(errors) == 1 and "Traceback" not in text, last_line(log)


def _left(path: Path) -> bool | None:
    from kdcache.cache.verify import verify_cache

    return verify_cache(path, deep=True).ok if (path / "_manifest.json").is_file() else None


def _equal(kind: str, got: Path, ref: Path) -> tuple[bool, str]:
    if kind == "train":
        r = compare_runs(got, ref)
        return r["identical"] and r["same_metrics"], "" if r["identical"] else f"student differs: {r}"
    r = compare_caches(got, ref)
    ok = r["verify_ok"] and r["complete"] and r["lost"] == r["duplicated"] == r["differing"] == 0
    return ok, "" if ok else f"cache differs: {r}"


def _wait_for(ready, proc: subprocess.Popen, timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.01)
    return False


def _committed(kind: str, out: Path) -> bool:
    if kind == "train":
        return (out / "checkpoints" / "latest").is_file()
    try:
        return len(json.loads((out / "_manifest.json").read_text())["shards"]) >= 1
    except (OSError, ValueError, KeyError):
        return False


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ full disk
def full_disk(world: World, kind: str) -> Outcome:
    """``kind`` (generate or train) writes into a tmpfs about half as big as it needs (generate) or room for one
    checkpoint and a half (train); the tmpfs is then grown and the same command rerun."""
    ref = world.reference(kind)
    base = world.root / "faults" / f"full-disk-{kind}"
    shutil.rmtree(base, ignore_errors=True)
    mnt, keep = base / "mnt", base / "keep"
    mnt.mkdir(parents=True)
    keep.mkdir()
    out = mnt / "out"
    cmd = world.command(kind, out)
    if kind == "train":  # the config file lives beside the run dir: keep it outside the small disk
        config = keep / "train.yaml"
        shutil.move(str(out.parent / "train.yaml"), config)
        cmd[cmd.index("--config") + 1] = str(config)
        latest = (ref / "checkpoints" / "latest").read_text().strip()
        size = int(1.5 * _tree_bytes(ref / "checkpoints" / latest)) + 64 * 1024
    else:
        size = _tree_bytes(ref) // 2
    script = "\n".join([
        f"mount -t tmpfs -o size={size // 1024}k tmpfs {shlex.quote(str(mnt))} || exit 97",
        f"{shlex.join(cmd)} > {keep}/full.log 2>&1; echo $? > {keep}/full.rc",
        f"if [ -d {out} ]; then cp -a {out} {keep}/left; fi",
        f"mount -o remount,size=512m {shlex.quote(str(mnt))} || exit 98",  # space freed
        f"{shlex.join(cmd)} > {keep}/rerun.log 2>&1; echo $? > {keep}/rerun.rc",
        f"cp -a {out} {keep}/resumed",
    ])
    o = Outcome("full disk", kind)
    r = subprocess.run(["unshare", "-Urm", "bash", "-c", script], env=ENV, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not (keep / "full.rc").is_file():
        o.note = f"could not mount a tmpfs here (rc {r.returncode}: {r.stderr.strip()[-200:]})"
        return o
    o.exit_code = int((keep / "full.rc").read_text())
    o.one_line, o.message = _one_error_line(keep / "full.log")
    if "space" not in o.message:
        o.note = "the error does not name the full disk"
    if kind != "train":
        o.left_ok = _left(keep / "left")
    o.resumed = int((keep / "rerun.rc").read_text()) == 0
    if o.resumed:
        o.equal, why = _equal(kind, keep / "resumed", ref)
        o.note = o.note or why
    return o


# ------------------------------------------------------------------------------------------ permission lost
def permission_lost(world: World, kind: str) -> Outcome:
    """Once ``kind`` has committed something, its output folder (a cache) or checkpoints folder (a run) turns
    read-only for it; it must stop in one line. Then the mode is restored and the same command rerun."""
    ref = world.reference(kind)
    base = world.root / "faults" / f"permission-{kind}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    out = base / "out"
    cmd = [*NO_DAC, *world.command(kind, out)]
    target = out / "checkpoints" if kind == "train" else out
    o = Outcome("permission lost mid-run", kind)
    proc = start(cmd, base / "faulted.log")
    try:
        if not _wait_for(lambda: _committed(kind, out), proc):
            o.note = f"the run ended before its first commit (rc {proc.wait()}); use more rows or steps"
            return o
        os.chmod(target, 0o555)
        o.exit_code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if target.exists():
            os.chmod(target, 0o755)
    if o.exit_code == 0:
        o.note = "the run finished before the permission loss reached a write; use more rows or steps"
    o.one_line, o.message = _one_error_line(base / "faulted.log")
    if kind != "train":
        o.left_ok = _left(out)
    rc, _ = run(cmd, base / "rerun.log")
    o.resumed = rc == 0
    if o.resumed:
        o.equal, why = _equal(kind, out, ref)
        o.note = o.note or why
    else:
        o.note = o.note or f"rerun failed: {last_line(base / 'rerun.log')}"
    return o


# ------------------------------------------------------------------------------------------ second writer
def second_writer(world: World, kind: str) -> Outcome:
    """generate: the same command again while the first holds the lock. merge: a merge started while a part it
    would join is still being generated. The second must be refused; the first (then the merge) ends as the reference."""
    base = world.root / "faults" / f"second-writer-{kind}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    out = base / "out"
    if kind == "generate":
        ref, first_cmd, lock = world.reference("generate"), world.command("generate", out), out / ".kdcache.lock"
        second_cmd = first_cmd
    elif kind == "merge":
        ref = world.reference("merge")
        parts = world.reference("parts")
        out.mkdir()
        shutil.copytree(parts / "part-00000-of-00002", out / "part-00000-of-00002")
        first_cmd = generate_command(world.teacher, world.data, out, "--num-shards", "2", "--shard-index", "1")
        lock = out / "part-00001-of-00002" / ".kdcache.lock"
        second_cmd = world.command("merge", out)
    else:
        raise ValueError(f"second writer of {kind!r}: generate or merge")
    o = Outcome("second writer", kind)
    if not race_paused_writer(o, first_cmd, second_cmd, lambda: lock.is_file() and _committed("generate", lock.parent), base):
        return o
    if kind == "merge" and o.resumed:  # the part is complete now: the same merge succeeds
        rc, _ = run(second_cmd, base / "merge-again.log")
        o.resumed = rc == 0
    o.left_ok = _left(out)
    if o.resumed:
        o.equal, why = _equal(kind, out, ref)
        o.note = o.note or why
    return o


def race_paused_writer(o: Outcome, first_cmd: list[str], second_cmd: list[str], ready, base: Path, timeout: float = 180) -> bool:
    """Start the first writer; once ``ready()`` (it holds its lock and has committed), pause it (SIGSTOP: a slow
    first writer, alive and holding its lock, on any machine) while the second command runs, then let it finish.
    Fills ``o``'s exit code, error line and whether the first ended well; False (``o.note`` says why) when the
    first ended before it was ready. Shared by the local and the s3 runs (fault_s3)."""
    first = start(first_cmd, base / "first.log")
    try:
        if not _wait_for(ready, first, timeout=timeout):
            o.note = f"the first writer ended before its first commit (rc {first.wait()})"
            return False
        os.kill(first.pid, signal.SIGSTOP)
        try:
            o.exit_code, _ = run(second_cmd, base / "second.log")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        o.one_line, o.message = _one_error_line(base / "second.log")
        if "being written by another kdcache process" not in o.message:
            o.note = o.note or "the refusal does not name the other writer"
        o.resumed = first.wait(timeout=600) == 0
        return True
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


FAULTS = {
    "full disk": (full_disk, ("generate", "train")),
    "permission lost mid-run": (permission_lost, ("generate", "train")),
    "second writer": (second_writer, ("generate", "merge")),
}
"""Each fault with the commands it is tried on."""


def run_faults(world: World, only: list[tuple[str, str]] | None = None) -> list[Outcome]:
    todo = only or [(fault, kind) for fault, (_, kinds) in FAULTS.items() for kind in kinds]
    return [FAULTS[fault][0](world, kind) for fault, kind in todo]
