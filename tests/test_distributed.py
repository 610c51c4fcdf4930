"""Training under real torchrun (gloo, 2 processes on CPU) against one process, and the rank sharding of the stream.

The references are independent of the distributed code: a single-process run with the same global batch (the
equality a user expects from data parallelism), an uninterrupted torchrun run (for the kill -9 resume), and the
unsharded stream's order (for the sharding and resharding of data positions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdcache.cache import open_cache
from kdcache.cache.reader import reshard_states
from kdcache.config import to_dict
from kdcache.errors import ConfigError
from kdcache.train.distributed import World, resume_position
from kdcache.train.loop import train
from safetensors.torch import load_file
from test_terms import STUDENT2, hidden_cache  # noqa: F401 (a fixture: the tiny teacher's top-8 and hidden states)
from test_train import assert_same_weights, final_weights, make_cfg, max_diff, train_rows, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 16


def ddp_cfg(cache, out, **kw):
    """2 ranks x batch 4 x accum 2: 16 examples a step; KD with a tempered tail, evaluation mid-run and at the end;
    a gradient clip that acts (the global norm over ranks and shards; at 1.0 it never would here)."""
    base = dict(steps=STEPS, batch_size=4, grad_accum=2, loss="kd", alpha=0.5, temperature=2.0, eval_every=8, grad_clip=0.2,
                save_every=2, keep_checkpoints=2)
    base.update(kw)
    return make_cfg(cache, out, **base)


def torchrun_cmd(cfg, tmp: Path, nproc: int = 2) -> list[str]:
    config = tmp / f"{Path(cfg.out).name}.yaml"
    config.write_text(yaml.safe_dump({"train": to_dict(cfg)}))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "kdcache", "train", "--config", str(config), "--quiet"]


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def ddp_run(tiny_cache, tmp_path_factory, request):
    """A 2-rank run of each strategy (FSDP2 fully_shard runs on CPU/gloo in torch 2.13)."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = ddp_cfg(tiny_cache, tmp / request.param, distributed={"strategy": request.param})
    r = subprocess.run(torchrun_cmd(cfg, tmp), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return cfg, r


def test_two_ranks_equal_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    cfg, r = ddp_run
    out = Path(cfg.out)
    single = dataclasses.replace(cfg, out=str(tmp_path / "single"), grad_accum=cfg.grad_accum * 2)  # 4 x 4 = 4 x 2 x 2 ranks
    final = train(single, progress=False)
    assert max_diff(final_weights(out), final_weights(single.out)) < 1e-5
    init = final_weights(out)
    assert max(v.abs().max().item() for v in init.values()) > 0.1  # weights that moved, not a trivially equal zero model
    ddp_rows, ref_rows = train_rows(out), train_rows(single.out)
    assert [x["step"] for x in ddp_rows] == list(range(1, STEPS + 1))
    for a, b in zip(ddp_rows, ref_rows):  # metrics are global sums over both ranks, as one process sums them
        assert a.keys() == b.keys()
        for k in a.keys() - {"tokens_per_s"}:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    ddp_final = json.loads((out / "final_metrics.json").read_text())
    assert ddp_final.keys() == final.keys() and ddp_final["eval_tokens"] == final["eval_tokens"]
    for k in final:
        assert ddp_final[k] == pytest.approx(final[k], rel=1e-5), k
    # rank 0 alone printed the metrics and wrote the run; the checkpoint records both ranks' data positions
    assert r.stdout.count('"eval_ce"') == 1
    state = json.loads((out / "checkpoints" / f"step-{STEPS:07d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and [s["rank"] for s in state["data_ranks"]] == [0, 1]
    assert [s["seen"] for s in state["data_ranks"]] == [STEPS * 16 - 1, STEPS * 16]


FAMILIES = {
    # a hidden-state term whose projection trains with the student, frozen modules, then a stage without the term
    # (its projection unused: DDP must allow that)
    "terms-stages": dict(stages=[{"steps": 4, "freeze": ["model.embed_tokens", "model.layers.0"], "terms": {"hidden": 1.0}},
                                 {"steps": 0, "loss": "kd", "terms": {}}]),
    # packed rows, and targets from an EMA of the student's weights
    "packing-ema": dict(packing=True, pseudo_teacher="ema", pseudo_teachers={"ema": {"decay": 0.5}}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_families_under_ddp_equal_one_process(hidden_cache, tmp_path, family):
    from kdcache.train.config import StudentConfig

    cfg = ddp_cfg(hidden_cache, tmp_path / "ddp", steps=8, save_every=0, eval_every=0, grad_accum=1, grad_clip=1.0,
                  student=StudentConfig(**STUDENT2), **FAMILIES[family])
    r = subprocess.run(torchrun_cmd(cfg, tmp_path), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = dataclasses.replace(cfg, out=str(tmp_path / "single"), grad_accum=2)
    train(single, progress=False)
    assert max_diff(final_weights(cfg.out), final_weights(single.out)) < 1e-5
    # what trains or moves beside the student (the projection, the EMA weights), from the last checkpoint
    extra = [load_file(str(Path(o) / "checkpoints" / "step-0000008" / "trainer_state.safetensors")) for o in (cfg.out, single.out)]
    assert "extra.rank_rng.1" in extra[0] and not any(k.startswith("extra.rank_rng") for k in extra[1])  # rank 1's RNG state
    extra = [{k: v for k, v in e.items() if k.startswith("extra.") and not k.startswith("extra.rank_rng")} for e in extra]
    assert extra[0] and max_diff(*extra) < 1e-5
    for a, b in zip(train_rows(cfg.out), train_rows(single.out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def test_kill_one_rank_then_rerun_ends_bit_identical(ddp_run, tmp_path):
    ref_cfg, _ = ddp_run
    cfg = dataclasses.replace(ref_cfg, out=str(tmp_path / "killed"))
    cmd = torchrun_cmd(cfg, tmp_path)
    latest = Path(cfg.out) / "checkpoints" / "latest"

    def saved_step() -> int:
        try:
            return int(latest.read_text().strip().split("-")[1])
        except (OSError, IndexError, ValueError):
            return 0

    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while saved_step() < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None and proc.poll() is None, "the run ended before rank 1 could be killed"
    os.kill(victim, signal.SIGKILL)
    output = proc.communicate(timeout=120)[0].decode(errors="replace")
    assert proc.returncode != 0, output[-2000:]
    killed_at = saved_step()
    assert 6 <= killed_at < STEPS and not (Path(cfg.out) / "final").exists()

    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out, ref = Path(cfg.out), Path(ref_cfg.out)
    assert_same_weights(final_weights(out), final_weights(ref))
    killed_log = train_rows(out)
    assert [x["step"] for x in killed_log] == list(range(1, STEPS + 1))
    assert [without_timing(x) for x in killed_log] == [without_timing(x) for x in train_rows(ref)]
    assert json.loads((out / "final_metrics.json").read_text()) == json.loads((ref / "final_metrics.json").read_text())


def test_resume_on_one_process_reshards_the_data_position(ddp_run, tmp_path):
    """A 2-rank run's checkpoint continued by one process: the data goes on where both ranks stopped."""
    cfg, _ = ddp_run
    import shutil

    out = tmp_path / "moved"
    shutil.copytree(cfg.out, out)
    more = dataclasses.replace(cfg, out=str(out), steps=STEPS + 2, resume=True)  # resume: the run moved (out differs)
    r = subprocess.run([sys.executable, "-m", "kdcache", "train", "--config", torchrun_cmd(more, tmp_path)[-2], "--quiet"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming a 2-rank checkpoint on 1 ranks" in r.stderr and "--nproc-per-node 2" in r.stderr
    state = json.loads((out / "checkpoints" / f"step-{STEPS + 2:07d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["data"]["base"] == STEPS * 16 and state["data"]["seen"] == STEPS * 16 + 2 * 8
    assert [x["step"] for x in train_rows(out)] == list(range(1, STEPS + 3))


# --------------------------------------------------------------------------------------------------
# The stream's rank sharding, against the unsharded stream


def _ids(stream, n=None) -> list[str]:
    out = []
    for ex in stream:
        out.append(ex["example_id"])
        if n is not None and len(out) == n:
            break
    return out


def test_ranks_deal_the_global_sequence_disjointly(tiny_cache):
    cache = open_cache(tiny_cache)
    keep = lambda i: not i.endswith("3")  # a filter: the dealing counts kept examples only
    kw = dict(shuffle=True, seed=5, window=2, columns=["example_id"], keep=keep)
    one_epoch = _ids(cache.stream(epochs=1, **kw))
    for world in (2, 3):
        ranks = [_ids(cache.stream(epochs=1, rank=r, world=world, **kw)) for r in range(world)]
        assert sorted(sum(ranks, [])) == sorted(one_epoch) and len(set(sum(ranks, []))) == len(one_epoch)  # disjoint, complete
        assert all(ranks[r] == one_epoch[r::world] for r in range(world))
    forever = _ids(cache.stream(epochs=None, **kw), 300)  # across epochs too: the dealing does not restart per epoch
    ranks = [_ids(cache.stream(epochs=None, rank=r, world=3, **kw), 100) for r in range(3)]
    assert [ranks[i % 3][i // 3] for i in range(300)] == forever


def test_reshard_continues_the_global_sequence_or_refuses_mid_round(tiny_cache, tmp_path):
    cache = open_cache(tiny_cache)
    kw = dict(shuffle=True, seed=1, window=3, epochs=None, columns=["example_id"])
    global_order = _ids(cache.stream(**kw), 200)
    streams = [cache.stream(rank=r, world=2, **kw) for r in range(2)]
    taken = [_ids(s, 37) for s in streams]  # 37 each: 74 of the global sequence, past an epoch end (64 rows)
    states = json.loads(json.dumps([s.state_dict() for s in streams]))
    for world in (1, 3):
        new = reshard_states(states, world)
        cont = []
        for r in range(world):
            s = cache.stream(rank=r, world=world, **kw)
            s.load_state_dict(new[r])
            cont.append(_ids(s, 20))
        assert [cont[i % world][i // world] for i in range(20 * world)] == global_order[74: 74 + 20 * world]
    assert sorted(taken[0] + taken[1]) == sorted(global_order[:74])

    ahead = cache.stream(rank=0, world=2, **kw)
    ahead.load_state_dict(states[0])
    _ids(ahead, 1)  # rank 0 one example further than rank 1: no single position continues both
    assert reshard_states([ahead.state_dict(), states[1]], 1) is None
    cfg = make_cfg(tiny_cache, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"relaunch with torchrun --nproc-per-node 2$"):
        resume_position({"data": ahead.state_dict(), "data_ranks": [ahead.state_dict(), states[1]]}, World(0, 1, 0), cfg)
    with pytest.raises(ValueError, match="reshard it first"):
        cache.stream(**kw).load_state_dict(states[1])


@pytest.mark.parametrize("overrides, match", [
    (dict(pseudo_teacher="peers"), "pseudo_teacher peers"),
    (dict(curriculum={"by": "teacher_nll"}), "curriculum"),
    (dict(distributed={"strategy": "fsdp"}, terms={"hidden": 1.0}), "fsdp trains a student with a logit loss only, not terms"),
    (dict(distributed={"strategy": "fsdp"}, pseudo_teacher="ema"), "not pseudo_teacher ema"),
])
def test_what_cannot_be_made_correct_across_ranks_is_refused_before_starting(tiny_cache, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=match):
        train(make_cfg(tiny_cache, tmp_path / "run", **overrides), progress=False)
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()
