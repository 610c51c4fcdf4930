"""Data-parallel training under ``torchrun``: the process group, the DDP wrapper, and the few collectives the loop needs.

A run is distributed when torchrun's environment says so (``WORLD_SIZE`` > 1); one process is the same run it
always was. Rank ``r`` of ``W`` trains on every ``W``-th example of the one global example sequence (see
:class:`kdcache.cache.reader.ExampleStream`), each rank's loss is divided by the global count of target tokens
(all-reduced before backward), and DDP sums the gradients: a step of ``W`` ranks with ``grad_accum`` A and
``batch_size`` B sees the same examples and takes the same update as one process with ``grad_accum`` A x W.
Only rank 0 writes (run directory, metrics, checkpoints, ``final/``); every rank reads the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from kdcache.errors import ConfigError, KDCacheError

log = logging.getLogger(__name__)
T = TypeVar("T")

RANK_RNG = "rank_rng."  # checkpoint tensors: the torch RNG state of rank r > 0 (rank 0's is the checkpoint's own)


def launched_world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun --nproc-per-node N") from None


def refuse_unsupported(cfg: Any, world_size: int) -> None:
    """What this version cannot make correct across ranks, refused before the process group starts."""
    if world_size <= 1:
        return
    where = f"under torchrun ({world_size} processes)"
    if cfg.distributed.strategy == "fsdp":
        used = [name for name, on in (("terms", bool(cfg.terms)), ("stages", bool(cfg.stages)), ("packing", cfg.packing),
                                      (f"pseudo_teacher {cfg.pseudo_teacher}", cfg.pseudo_teacher != "none")) if on]
        if used:
            raise ConfigError(f"distributed.strategy fsdp trains a student with a logit loss only, not {used[0]} ({where}); "
                              "use --set distributed.strategy=ddp for it")
    if cfg.pseudo_teacher == "peers":
        raise ConfigError(f"pseudo_teacher peers trains its peers with their own optimizers, whose gradients are not reduced {where}; "
                          "train peers in one process (python -m kdcache train) or choose another pseudo_teacher")
    if cfg.curriculum.enabled:
        raise ConfigError(f"a curriculum skips examples per rank, so the ranks no longer share one global batch {where}; "
                          "train it in one process or drop --set curriculum.by=...")


@dataclass
class World:
    """This process's place among the ranks; every collective is a no-op for a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (float64 on the CPU: metrics and token counts, exact for integers)."""
        out = values.detach().to("cpu", torch.float64).clone()
        if self.active:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def total(self, count: int) -> int:
        """An integer (a token count) summed over the ranks."""
        return int(self.sum(torch.tensor([count], dtype=torch.float64)).item()) if self.active else count

    def sum_values(self, values: dict[str, Any]) -> dict[str, float]:
        """Metric sums (tensors or floats) summed over the ranks, in one collective; one process: just floats."""
        if not self.active:
            return {k: float(v) for k, v in values.items()}
        stacked = torch.stack([torch.as_tensor(v).detach().to("cpu", torch.float64).reshape(()) for v in values.values()])
        return dict(zip(values, self.sum(stacked).tolist()))

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank (small JSON-like values and CPU tensors only)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank. A kdcache error raised by ``fn`` is raised on
        every rank with the same message, so no rank waits forever for one that failed."""
        if not self.active:
            return fn()
        box: list[Any] = [None]
        error: Exception | None = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except KDCacheError as exc:
                error, box[0] = exc, ("error", type(exc), str(exc))
        torch.distributed.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0][0] == "error":
            raise box[0][1](box[0][2])
        return box[0][1]

    def own_randoms(self, seed: int) -> None:
        """Ranks > 0 reseed torch's RNG (rank 0 keeps one process's stream): dropout masks and augmentations differ
        across ranks, as they do across one process's examples, instead of repeating rank 0's on every rank."""
        if self.rank:
            torch.manual_seed(int.from_bytes(hashlib.blake2b(f"{seed}:{self.rank}".encode(), digest_size=8).digest(), "little"))

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def start(cfg: Any, world_size: int) -> World:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA unless ``distributed.backend`` says otherwise)."""
    if world_size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if device_for(cfg, local_rank).type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    log.info("rank %d of %d (local rank %d), backend %s", rank, world_size, local_rank, backend)
    return World(rank, world_size, local_rank)


def resume_position(state: dict, world: World, cfg: Any) -> dict:
    """This rank's data position in a checkpoint's trainer state: its own with the same world size; with another,
    the position after the last example any rank took, dealt anew (if every rank had taken as many), else refused."""
    from kdcache.cache.reader import reshard_states

    states = state.get("data_ranks") or [state["data"]]
    if len(states) == world.size:
        return states[world.rank]
    resharded = reshard_states(states, world.size)
    if resharded is None:
        raise ConfigError(f"the checkpoint in {cfg.out} was written by {len(states)} ranks whose data positions cannot be dealt to "
                          f"{world.size}; relaunch with torchrun --nproc-per-node {len(states)}")
    old, new = cfg.batch_size * cfg.grad_accum * len(states), cfg.batch_size * cfg.grad_accum * world.size
    log.warning("resuming a %d-rank checkpoint on %d ranks: the data continues where it stopped, but a step now sees %d examples, not %d "
                "(launch with --nproc-per-node %d to keep the global batch)", len(states), world.size, new, old, len(states))
    return resharded[world.rank]


def stop(world: World) -> None:
    if world.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device_for(cfg: Any, local_rank: int) -> torch.device:
    """Each rank's device: ``cuda`` (or auto with CUDA) means this rank's GPU, cuda:LOCAL_RANK."""
    from kdcache.modeling import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", local_rank)
    return device


class Closure(torch.nn.Module):
    """The trained modules as one module whose forward runs the given function: DDP wraps it, so the micro-batch's
    whole loss (student forward, loss terms, projections) runs inside DDP's forward and every trained parameter's
    gradient is reduced, whatever reads the student's internals (hooks, projections)."""

    def __init__(self, modules: torch.nn.Module):
        super().__init__()
        self.trained = modules

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


class DataParallel:
    """Runs micro-batches so that gradients are summed over the ranks once per optimizer step (the last micro-batch);
    for one process, just runs them."""

    def __init__(self, world: World, trained: torch.nn.Module, find_unused: bool, sharded_root: torch.nn.Module | None = None):
        self.world = world
        self.ddp = None
        self.sharded_root = sharded_root  # FSDP (kdcache.train.sharded) reduces the gradients itself, averaged as DDP does
        if world.active and sharded_root is None:
            from torch.nn.parallel import DistributedDataParallel

            # no buffer sync per forward: the student's buffers (rotary tables) are computed, the same on every rank
            self.ddp = DistributedDataParallel(Closure(trained), device_ids=None, forward_sync_buffers=False,
                                               find_unused_parameters=find_unused)

    def run(self, fn: Callable[[], T], last: bool) -> T:
        """``fn()``, the micro-batch's loss; its backward reduces the gradients over the ranks if ``last``. DDP averages
        them, so the caller divides each rank's loss sum by the global token count over the world size."""
        if self.sharded_root is not None:
            return self.sharded_root(fn)
        if self.ddp is None:
            return fn()
        with contextlib.nullcontext() if last else self.ddp.no_sync():  # the forward decides whether backward syncs
            return self.ddp(fn)
