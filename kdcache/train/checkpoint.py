"""Checkpoints with no pickle: the model as a save_pretrained folder, everything else safetensors + JSON.

A checkpoint directory is written under a temporary name, every file in it and then every folder is
fsynced, it is renamed into place, and only then is ``latest`` updated atomically: a kill or a power loss
at any moment leaves ``latest`` naming a complete checkpoint whose bytes are on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdcache.cache.manifest import fsync_dir, fsync_file, write_atomic
from kdcache.cache.writer import is_space_error
from kdcache.errors import KDCacheError, OutOfSpaceError

LATEST = "latest"
_STEP_NAME = re.compile(r"step-\d+")


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder (deepest first, ``root`` last).

    Files written by ``save_pretrained`` or ``save_file`` are only in the page cache when those return; a
    rename that points readers at them must not reach the disk before their bytes do."""
    dirs: list[Path] = []
    for folder, _, files in os.walk(root):
        dirs.append(Path(folder))
        for name in sorted(files):
            fsync_file(Path(folder) / name)
    for folder in reversed(dirs):
        fsync_dir(folder)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, sd: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                       load: Callable[[dict], None] | None = None) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    (load or optimizer.load_state_dict)({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model: Any, tokenizer: Any, optimizer, scheduler, trainer_state: dict, keep: int,
                    extra_tensors: dict[str, torch.Tensor] | None = None, full_state: tuple[dict, dict] | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically; a failure (e.g. a full disk) leaves the previous one in place.
    ``extra_tensors`` (e.g. a pseudo-teacher's weights) come back from :func:`load_checkpoint`. ``full_state``:
    the model's and the optimizer's state dicts, gathered from shards (kdcache.train.sharded), written instead
    of the model's and optimizer's own."""
    ckpt_root = run_dir / "checkpoints"
    tmp = ckpt_root / f".step-{step:07d}.tmp"
    try:
        return _save(ckpt_root, tmp, step, model, tokenizer, optimizer, scheduler, trainer_state, keep, extra_tensors or {}, full_state)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)  # our own half-written folder; `latest` still names the previous one
        raise
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error, not an OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if is_space_error(exc):
            raise OutOfSpaceError(
                f"no space left writing a checkpoint in {ckpt_root}; free disk space and rerun the same command "
                "(it resumes from the last complete checkpoint)"
            ) from None
        raise KDCacheError(f"cannot write checkpoint in {ckpt_root}: {exc}") from None


def _save(ckpt_root: Path, tmp: Path, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict, keep: int,
          extra_tensors: dict[str, torch.Tensor], full_state: tuple[dict, dict] | None) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model_state, optimizer_state = full_state or (None, None)
    model.save_pretrained(tmp / "model", safe_serialization=True, **({"state_dict": model_state} if model_state is not None else {}))
    if tokenizer is not None:  # an image student has none
        tokenizer.save_pretrained(tmp / "model")
    tensors, optim_meta = _optimizer_tensors(optimizer, optimizer_state)
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "trainer_state.safetensors"))
    state = {**trainer_state, "step": step, "optimizer": optim_meta, "scheduler": scheduler.state_dict()}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
    fsync_tree(tmp)  # weights, tokenizer and trainer state on disk before anything points at them
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    write_atomic(ckpt_root / LATEST, final.name.encode())
    # Only kdcache's own step-N folders, oldest step first (a user's step-best/ or step-0000005-good/ stays).
    existing = sorted((p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name)), key=lambda p: int(p.name[5:]))
    for old in existing[: max(len(existing) - keep, 0)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` gets every file of ``src`` as a hard link (no second copy on disk), or as a copy where the
    file system refuses links. Used for ``final/``, whose weights are those of the last checkpoint."""
    for folder, _, files in os.walk(src):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            try:
                os.link(Path(folder) / name, target / name)
            except OSError:
                shutil.copy2(Path(folder) / name, target / name)


def checkpoint_step(path: Path) -> int:
    """The step of a ``step-N`` checkpoint folder."""
    return int(path.name[len("step-"):])


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpt_root = run_dir / "checkpoints"
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    # The pointer names a folder next to it, never a path: an edited or foreign file must not send a resume elsewhere.
    if not _STEP_NAME.fullmatch(name):
        raise KDCacheError(
            f"{pointer} holds {name[:80]!r}, not a checkpoint name in {ckpt_root} (step-N); "
            f"write the name of a step-N folder there, or pass --overwrite to start the run over"
        )
    path = ckpt_root / name
    return path if (path / "trainer_state.json").is_file() else None


def load_checkpoint(path: Path, model: Any, optimizer, scheduler, device: torch.device,
                    restore_weights: Callable[[Any, dict], tuple[list, list]] | None = None,
                    load_optimizer: Callable[[dict], None] | None = None) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the trainer state (step, data position, ...).
    ``restore_weights(model, full_weights)`` / ``load_optimizer(full_state)``: for a sharded model (kdcache.train.sharded)."""
    from safetensors.torch import load_file as load_weights

    weights: dict[str, torch.Tensor] = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_weights(str(f)))
    missing, unexpected = (restore_weights or (lambda m, w: m.load_state_dict(w, strict=False)))(model, weights)
    tied = {k for k in missing if "lm_head" in k} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    state = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(str(path / "trainer_state.safetensors"))
    _restore_optimizer(optimizer, {k: v.to(device) if k.startswith("optim.") and v.dim() > 0 else v for k, v in tensors.items()}, state["optimizer"], load_optimizer)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    state["extra_tensors"] = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return state
