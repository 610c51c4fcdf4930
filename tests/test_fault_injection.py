"""A fast subset of the fault-injection run (benchmarks/fault_injection.py), with the same engine, plus regression
tests of the two faults it found.

Real processes throughout: ``python -m kdcache`` killed with SIGKILL at seeded random moments and rerun, compared
with uninterrupted runs; a read-only folder for a root process without CAP_DAC_OVERRIDE (``setpriv``); a full disk
as a small tmpfs in a private user+mount namespace (``unshare -Urm``). The last two are skipped where the machine
allows neither.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fault_engine  # noqa: E402
from fault_engine import ENV, Sizes, World, kill_trial  # noqa: E402


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
needs_setpriv = pytest.mark.skipif(not shutil.which("setpriv") or not _works([*NO_DAC, "true"]),
                                   reason="setpriv cannot drop CAP_DAC_OVERRIDE here")
needs_userns = pytest.mark.skipif(not shutil.which("unshare") or not _works(["unshare", "-Urm", "true"]),
                                  reason="no unprivileged user+mount namespaces here (tmpfs full disk)")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("faults"), Sizes(rows=100, steps=12, save_every=2))


@pytest.mark.parametrize("index,kind", [(0, "generate"), (1, "train"), (2, "merge")])
def test_a_random_kill_9_then_the_same_command_ends_as_an_uninterrupted_run(world, index, kind):
    trial = kill_trial(world, index, kind, random.Random(1000 + index), max_kills=1)
    assert trial.kills + trial.finished_early == 1
    assert trial.resumed, trial.note
    if kind == "train":
        assert trial.identical, trial.note
    else:
        assert (trial.verify_ok, trial.lost, trial.duplicated, trial.differing) == (True, 0, 0, 0), trial.note
    assert trial.ok


def test_the_comparison_counts_lost_duplicated_and_differing_examples(world, tmp_path):
    """The judge itself, against a cache written by hand from the reference's rows: one row dropped, one written
    twice, one changed in a single value; a run student whose weights differ by a byte is not identical."""
    import numpy as np

    from kdcache.cache import CacheWriter, open_cache, read_manifest

    ref = world.reference("generate")
    m = read_manifest(ref)
    rows = list(open_cache(ref))
    rows[3] = {**rows[3], "topk_logprobs": np.nextafter(rows[3]["topk_logprobs"], 0).astype(np.float32)}
    tampered = rows[:5] + rows[6:] + [rows[7]]  # row 5 lost, row 7 twice, row 3 differs
    w = CacheWriter(tmp_path / "c", m.settings, m.signals)
    for i, r in enumerate(tampered):
        w.add_row([r], i + 1)
    w.close()
    got = fault_engine.compare_caches(tmp_path / "c", ref)
    assert (got["verify_ok"], got["lost"], got["duplicated"], got["differing"]) == (True, 1, 1, 1)
    assert fault_engine.compare_caches(ref, ref)["differing"] == 0

    run = world.reference("train")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = next((copy / "final").rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.unlink()  # final/ holds hard links to the checkpoint's files: never flip the reference's byte
    weights.write_bytes(bytes(data))
    assert fault_engine.compare_runs(run, run) == {"identical": True, "same_metrics": True}
    assert not fault_engine.compare_runs(copy, run)["identical"]


def test_an_unknown_target_is_refused_in_one_line():
    fault_engine.refuse_target("s3")  # tests/test_fault_injection_s3.py runs it
    with pytest.raises(SystemExit, match=r"^error: --target gcs is not a fault-injection target; use --target local or s3$"):
        fault_engine.refuse_target("gcs")


@needs_setpriv
def test_a_lock_in_a_folder_turned_read_only_is_left_quietly_and_taken_over_after(tmp_path):
    """Regression: the lock's release raised PermissionError over the writer's own one-line error."""
    folder = tmp_path / "cache"
    folder.mkdir()
    script = textwrap.dedent(f"""
        import os
        from kdcache.cache.lock import CacheLock
        lock = CacheLock({str(folder)!r}).acquire()
        os.chmod({str(folder)!r}, 0o555)
        lock.release()
        print("released")
    """)
    try:
        r = subprocess.run([*NO_DAC, sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    finally:
        folder.chmod(0o755)
    assert r.returncode == 0 and r.stdout.strip() == "released", r.stderr
    assert (folder / ".kdcache.lock").is_file()  # left behind: it could not be removed
    from kdcache.cache.lock import CacheLock

    with CacheLock(folder):  # its process has exited: taken over
        pass
    assert not (folder / ".kdcache.lock").exists()


@needs_userns
def test_a_checkpoint_on_a_full_disk_is_one_out_of_space_error_and_leaves_no_half_checkpoint(tmp_path):
    """Regression: safetensors reports ENOSPC as SafetensorError (no OSError), which went through as a traceback."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    script = textwrap.dedent(f"""
        import subprocess, sys, torch
        from pathlib import Path
        from transformers import LlamaConfig, LlamaForCausalLM
        from kdcache.errors import OutOfSpaceError
        from kdcache.train.checkpoint import save_checkpoint
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", {str(mnt)!r}], check=True)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1))
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        try:
            save_checkpoint(Path({str(mnt)!r}), 1, model, None, opt, sched, {{}}, keep=2)
        except OutOfSpaceError as exc:
            ckpts = Path({str(mnt)!r}) / "checkpoints"
            print("out of space:", sorted(p.name for p in ckpts.iterdir()), "|", exc)
    """)
    r = subprocess.run(["unshare", "-Urm", sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("out of space: [] | no space left writing a checkpoint in"), r.stdout + r.stderr[-2000:]
