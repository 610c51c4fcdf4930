"""Durability and trust of what kdcache writes and reads (issue 9).

Real components throughout: a tiny Llama, real checkpoints, real ``kdcache convert``, real files. The
fsync tests only *record* the calls to ``os.fsync`` / ``os.replace`` / ``os.rename`` (each still runs)
so their order can be checked: a power loss must never leave ``latest`` or ``final/`` naming bytes that
are not on disk yet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import WORDS, build_tiny_llama, build_tiny_tokenizer
from kdcache.errors import ConfigError, DataError, KDCacheError
from kdcache.fingerprint import file_fingerprint, sampled_file_fingerprint
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.convert import MARKER, convert_model
from kdcache.pipeline.data import dataset_identity
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher
from kdcache.train import StudentConfig, TrainConfig, train
from kdcache.train.checkpoint import latest_checkpoint, save_checkpoint
from kdcache.train.student import build_student


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: exact comparisons need one thread


class Recorder:
    """Records (in order) the fsyncs, replaces and renames the process makes; each call still runs."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            self.events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            self.events.append(("move", os.path.realpath(src), os.path.realpath(dst)))
            return real_replace(src, dst, *a, **kw)

        def rename(src, dst, *a, **kw):
            self.events.append(("move", os.path.realpath(src), os.path.realpath(dst)))
            return real_rename(src, dst, *a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def index_of_move(self, dst: Path) -> int:
        hits = [i for i, e in enumerate(self.events) if e[0] == "move" and e[2] == os.path.realpath(dst)]
        assert hits, f"no move onto {dst}"
        return hits[-1]

    def fsynced_before(self, path: Path, limit: int) -> bool:
        return ("fsync", os.path.realpath(path)) in self.events[:limit]


def _tree(root: Path) -> tuple[list[Path], list[Path]]:
    files, dirs = [], [root]
    for folder, subdirs, names in os.walk(root):
        dirs += [Path(folder) / d for d in subdirs]
        files += [Path(folder) / n for n in names]
    return files, dirs


def _tiny_student(tiny_teacher: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_teacher)


# -- checkpoints and final/ are on disk before anything points at them


def test_checkpoint_files_are_fsynced_before_latest_moves(tiny_teacher, tmp_path, monkeypatch):
    model, tok = _tiny_student(tiny_teacher)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rec = Recorder(monkeypatch)
    final = save_checkpoint(tmp_path, 5, model, tok, opt, sched, {"data": {"epoch": 0}}, keep=2)

    ckpts = tmp_path / "checkpoints"
    tmp = ckpts / ".step-0000005.tmp"
    into_place = rec.index_of_move(final)
    latest_moves = rec.index_of_move(ckpts / "latest")
    assert into_place < latest_moves
    files, dirs = _tree(final)
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "trainer_state.safetensors", "trainer_state.json"}
    for f in files:  # every file (weights, tokenizer, state) under its temporary name, before the rename
        assert rec.fsynced_before(tmp / f.relative_to(final), into_place), f"{f.name} not fsynced before the rename"
    for d in dirs:  # and every folder, so the entries naming the files are durable too
        assert rec.fsynced_before(tmp / d.relative_to(final), into_place), f"folder {d} not fsynced before the rename"
    # the rename itself is durable (the checkpoints folder fsynced) before latest names it
    assert ("fsync", os.path.realpath(ckpts)) in rec.events[into_place:latest_moves]
    assert latest_checkpoint(tmp_path) == final


def test_final_folder_is_fsynced_before_it_is_renamed_into_place(tiny_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = TrainConfig(cache=str(tiny_cache), out=str(out), student=StudentConfig(hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, intermediate_size=64), steps=2, batch_size=4, warmup_steps=1, log_every=1,
                      eval_every=0, save_every=0, device="cpu", precision="fp32", eval_fraction=0.0)
    rec = Recorder(monkeypatch)
    train(cfg, progress=False)
    final = out / "final"
    into_place = rec.index_of_move(final)
    files, dirs = _tree(final)
    assert any(p.name == "model.safetensors" for p in files)
    for f in files:
        assert rec.fsynced_before(out / ".final.tmp" / f.relative_to(final), into_place), f"final/{f.name} not fsynced first"
    for d in dirs:
        assert rec.fsynced_before(out / ".final.tmp" / d.relative_to(final), into_place)
    assert ("fsync", os.path.realpath(out)) in rec.events[into_place:]  # the rename reaches the disk


@pytest.mark.parametrize("pointer", ["../x", "/etc", "step-0000002/../../x", "step-2/model", "..", ""])
def test_latest_pointer_is_confined_to_the_checkpoints_folder(tmp_path, pointer):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-0000002").mkdir(parents=True)
    (ckpts / "step-0000002" / "trainer_state.json").write_text("{}")
    (ckpts / "latest").write_text(pointer)
    with pytest.raises(KDCacheError) as err:
        latest_checkpoint(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpts / "latest") in msg and "--overwrite" in msg
    (ckpts / "latest").write_text("step-0000002\n")
    assert latest_checkpoint(tmp_path) == ckpts / "step-0000002"


# -- convert --overwrite removes only what convert wrote


def test_convert_overwrite_keeps_the_users_files(tiny_teacher, tmp_path):
    out = tmp_path / "converted"
    convert_model(str(tiny_teacher), out)
    listed = json.loads((out / MARKER).read_text())["files"]
    assert "model.safetensors" in listed and "config.json" in listed and MARKER not in listed
    (out / "NOTES.md").write_text("mine")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("also mine")
    # a file an earlier convert wrote but this one does not: removed (it is convert's own)
    (out / "stale.safetensors").write_bytes(b"old")
    (out / MARKER).write_text(json.dumps({"files": listed + ["stale.safetensors"]}))

    convert_model(str(tiny_teacher), out, overwrite=True)
    assert (out / "NOTES.md").read_text() == "mine" and (out / "runs" / "log.txt").read_text() == "also mine"
    assert not (out / "stale.safetensors").exists()
    assert json.loads((out / MARKER).read_text())["files"] == listed
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".converted")]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)  # still a loadable model folder


def test_convert_overwrite_refuses_a_folder_it_did_not_write(tiny_teacher, tmp_path):
    out = tmp_path / "someone-elses"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError) as err:
        convert_model(str(tiny_teacher), out, overwrite=True)
    assert "\n" not in str(err.value) and MARKER in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"


def test_convert_refuses_to_replace_a_users_file_of_the_same_name(tiny_teacher, tmp_path):
    out = tmp_path / "converted"
    convert_model(str(tiny_teacher), out)
    listed = json.loads((out / MARKER).read_text())["files"]
    (out / MARKER).write_text(json.dumps({"files": [f for f in listed if f != "tokenizer.json"]}))
    (out / "tokenizer.json").write_text("the user's own")
    with pytest.raises(ConfigError, match="tokenizer.json was not written by kdcache convert"):
        convert_model(str(tiny_teacher), out, overwrite=True)
    assert (out / "tokenizer.json").read_text() == "the user's own"


def test_convert_marker_with_a_path_outside_is_refused(tiny_teacher, tmp_path):
    out = tmp_path / "converted"
    convert_model(str(tiny_teacher), out)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / MARKER).write_text(json.dumps({"files": ["../victim.txt"]}))
    with pytest.raises(ConfigError, match="not a kdcache convert list"):
        convert_model(str(tiny_teacher), out, overwrite=True)
    assert victim.read_text() == "keep"


# -- safetensors only unless asked


@pytest.fixture(scope="module")
def pickle_only_model(tmp_path_factory) -> Path:
    """A real model folder whose weights exist only as pytorch_model.bin (transformers 5 no longer writes
    one with safe_serialization=False, so the state dict is saved the way older versions did)."""
    path = tmp_path_factory.mktemp("pickle_model")
    tok = build_tiny_tokenizer(path)
    model = build_tiny_llama(path, tok, seed=1)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def test_student_with_only_pickle_weights_is_refused(pickle_only_model, tiny_cache):
    from kdcache.cache import open_cache

    cache = open_cache(tiny_cache)
    with pytest.raises(ConfigError) as err:
        build_student(StudentConfig(path=str(pickle_only_model)), cache)
    msg = str(err.value)
    assert "\n" not in msg and "pytorch_model.bin" in msg and "student.allow_pickle_weights" in msg
    model, _ = build_student(StudentConfig(path=str(pickle_only_model), allow_pickle_weights=True), cache)  # asked for
    assert model.get_output_embeddings().weight.shape[0] == cache.manifest.vocab_size


def test_teacher_with_only_pickle_weights_is_refused(pickle_only_model, tiny_teacher):
    with pytest.raises(ConfigError) as err:
        TransformersTeacher(str(pickle_only_model))
    msg = str(err.value)
    assert "\n" not in msg and "pytorch_model.bin" in msg and "allow_pickle_weights" in msg
    from kdcache.pipeline.teachers.base import build_teacher

    with pytest.raises(ConfigError, match="allow_pickle_weights"):
        build_teacher(GenerateConfig(teacher=str(pickle_only_model), out="unused"))
    teacher = TransformersTeacher(str(pickle_only_model), device="cpu", allow_pickle_weights=True)
    teacher.load()
    assert teacher.model is not None
    assert not TransformersTeacher(str(tiny_teacher)).trust_remote_code  # remote code stays off unless asked


def test_teacher_load_passes_use_safetensors(pickle_only_model):
    """Even past the folder check (a folder that gains a .bin later, a hub id), from_pretrained itself
    is asked for safetensors: a .bin-only folder fails to load with a line naming the flag."""
    teacher = TransformersTeacher(str(pickle_only_model), device="cpu", allow_pickle_weights=True)
    teacher.allow_pickle_weights = False  # as if the check had been passed
    with pytest.raises(KDCacheError) as err:
        teacher.load()
    assert "\n" not in str(err.value) and "allow_pickle_weights" in str(err.value)


def test_convert_refuses_pickle_only_source(pickle_only_model, tmp_path):
    with pytest.raises(ConfigError, match="allow_pickle_weights"):
        convert_model(str(pickle_only_model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the dataset's identity: every byte of a local file, the revision of a hub one


def _big_jsonl(path: Path, mib: float = 3.0) -> Path:
    line_words = (WORDS * 3)[:40]
    lines, size, i = [], 0, 0
    while size < mib * (1 << 20):
        line = json.dumps({"text": f"{i:08d} " + " ".join(line_words)}) + "\n"
        lines.append(line)
        size += len(line)
        i += 1
    path.write_text("".join(lines))
    return path


def test_an_edit_in_the_middle_of_a_large_dataset_changes_its_identity(tmp_path):
    path = _big_jsonl(tmp_path / "big.jsonl", mib=9.0)  # the middle is in the second 4 MiB read
    size = path.stat().st_size
    assert size > 2 * (1 << 20) + (1 << 20)  # the middle is outside the first and last MiB
    before, ident_before = file_fingerprint(path), dataset_identity(DataConfig(source=str(path)))
    data = bytearray(path.read_bytes())
    mid = data.index(b'"text": "', size // 2) + len('"text": "')
    data[mid : mid + 8] = b"99999999"  # same length: the size does not change either
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    assert file_fingerprint(path) != before
    assert dataset_identity(DataConfig(source=str(path)))["fingerprint"] != ident_before["fingerprint"]
    # a folder of files too
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(bytes(data))
    first = dataset_identity(DataConfig(source=str(folder)))["fingerprint"]
    data[mid] = ord("8")
    (folder / "a.jsonl").write_bytes(bytes(data))
    assert dataset_identity(DataConfig(source=str(folder)))["fingerprint"] != first


def test_the_old_sampled_fingerprint_misses_the_same_edit(tmp_path):
    """Why the data is hashed whole: the size + first/last MiB sample (kept for multi-GB teacher weights)
    cannot see an edit in the middle, which would resume a cache into a mix of old and new rows."""
    path = _big_jsonl(tmp_path / "big.jsonl")
    before = sampled_file_fingerprint(path)
    data = bytearray(path.read_bytes())
    mid = data.index(b'"text": "', len(data) // 2) + len('"text": "')
    data[mid : mid + 8] = b"99999999"
    path.write_bytes(bytes(data))
    assert sampled_file_fingerprint(path) == before


def test_dataset_revision_is_recorded_in_the_cache_settings(tiny_teacher, tmp_path):
    from kdcache.pipeline.generate import _settings

    teacher = TransformersTeacher(str(tiny_teacher))

    def settings(revision):
        cfg = GenerateConfig(teacher=str(tiny_teacher), out=str(tmp_path / "c"), data=DataConfig(source="someorg/somedata", revision=revision))
        return _settings(cfg, teacher, [])["dataset"]

    assert dataset_identity(DataConfig(source="someorg/somedata", revision="0a1b2c3"))["revision"] == "0a1b2c3"
    pinned, other, unpinned = settings("0a1b2c3"), settings("v2.0"), settings(None)
    assert pinned["revision"] == "0a1b2c3" and "revision" not in unpinned  # unset: the identity of older caches
    assert len({pinned["fingerprint"], other["fingerprint"], unpinned["fingerprint"]}) == 3  # never the same cache
    with pytest.raises(DataError, match="data.revision"):
        dataset_identity(DataConfig(source=str(tmp_path), revision="v1"))  # a local folder has no revisions


def test_vllm_teacher_with_only_pickle_weights_is_refused_before_the_engine(pickle_only_model):
    """No engine starts (slow): the refusal comes from the transformers side the vLLM teacher is built on.
    With the flag off, load() also passes load_format="safetensors" (vLLM's default globs *.bin too)."""
    from kdcache.pipeline.teachers.vllm_backend import VLLMTeacher, vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    with pytest.raises(ConfigError, match="allow_pickle_weights"):
        VLLMTeacher(GenerateConfig(teacher=str(pickle_only_model), out="unused", backend="vllm"))


def test_cache_without_a_revision_keeps_the_old_settings(tiny_cache):
    """data.revision unset: no "revision" key anywhere in the dataset settings, so the settings hash of every
    cache made before the field existed is unchanged (and those caches still resume)."""
    from kdcache.cache import read_manifest

    dataset = read_manifest(tiny_cache).settings["dataset"]
    assert "revision" not in dataset and "fingerprint" in dataset
    assert "revision" not in dataset_identity(DataConfig(source="someorg/somedata"))


# -- pruning old checkpoints touches only step-N folders


def test_pruning_keeps_folders_that_only_look_like_checkpoints(tiny_teacher, tmp_path):
    model, tok = _tiny_student(tiny_teacher)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpts = tmp_path / "checkpoints"
    users = ["step-best", "step-0000001-good", "step-000-keep"]
    for name in ["step-0000001", *users]:
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "note.txt").write_text(name)
    final = save_checkpoint(tmp_path, 2, model, tok, opt, sched, {"data": {"epoch": 0}}, keep=1)
    assert final.name == "step-0000002"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == sorted(["step-0000002", *users])
    for name in users:
        assert (ckpts / name / "note.txt").read_text() == name


def test_convert_uses_its_own_temporary_folder(tiny_teacher, tmp_path):
    """Another convert into the same OUT (or anything else) may own `.OUT.tmp`: it is never removed."""
    out = tmp_path / "converted"
    other = tmp_path / ".converted.tmp"
    other.mkdir()
    (other / "in-progress.safetensors").write_bytes(b"another process")
    convert_model(str(tiny_teacher), out)
    assert (other / "in-progress.safetensors").read_bytes() == b"another process"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".converted.tmp", "converted"]
    assert (out / "model.safetensors").is_file()
