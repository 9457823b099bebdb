"""Multi-process runs with ``torch.distributed``: ``torchrun --nproc_per_node N prunekit ...``.

Under ``torchrun`` (the environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
are set) :func:`init_if_needed` starts the process group (NCCL for CUDA tensors and gloo for
CPU tensors when every process has its own GPU, gloo otherwise);
:func:`prunekit.workflow.finetune.finetune`, :func:`prunekit.workflow.ana.ana` and
:class:`prunekit.workflow.iterative.IterativePruner` call it themselves, so the same script or CLI
verb runs on one process or on many. Without those variables every helper here is a no-op
and a single process runs as before.

* fine-tuning: the model is wrapped in ``DistributedDataParallel`` (:func:`wrap_ddp`), the
  training batches are split with a ``DistributedSampler`` (:func:`shard_loader`), losses and
  metrics are summed over the processes (:func:`all_reduce_sum`, :func:`shard_eval_fn`), and
  only rank 0 writes the workspace (:func:`is_main`).
* ana: the (group, ratio) points are split over the processes; rank 0 merges the results.
* Code that only some ranks run, or that runs different work on each rank (ana's points),
  goes inside :func:`local`: evaluation functions from :func:`shard_eval_fn` then evaluate all
  their batches on the calling process instead of splitting them.

Example:
    >>> init_if_needed()  # no torchrun variables: stays a single process
    False
    >>> is_main(), world_size(), all_reduce_sum([1.0, 2.0])
    (True, 1, [1.0, 2.0])
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "init_if_needed",
    "active",
    "collective",
    "local",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "broadcast_object",
    "sync_buffers",
    "wrap_ddp",
    "unwrap",
    "rewrap",
    "transform_ddp",
    "shard_loader",
    "ShardedLoader",
    "shard_eval_fn",
]

_LOCAL_DEPTH = 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def init_if_needed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Start the process group if ``torchrun`` launched this process and none is running.

    Args:
        backend: e.g. ``"nccl"`` or ``"gloo"``; default: the ``PRUNEKIT_DIST_BACKEND``
            environment variable, else ``"cpu:gloo,cuda:nccl"`` when CUDA has a GPU for this
            process's ``LOCAL_RANK`` (a model trained on the GPU syncs through NCCL, the small
            CPU messages, and a model left on the CPU, through gloo), else gloo.
        timeout_s: Collective timeout (default: ``PRUNEKIT_DIST_TIMEOUT`` seconds, else torch's).

    Returns:
        Whether more than one process runs together (the group existed or was started).
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if _env_int("WORLD_SIZE", 1) <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank()
    backend = backend or os.environ.get("PRUNEKIT_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if "nccl" in backend:
        torch.cuda.set_device(local_rank())
    timeout_s = timeout_s or float(os.environ.get("PRUNEKIT_DIST_TIMEOUT", 0) or 0)
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend, **kwargs)
    atexit.register(_shutdown)
    return dist.get_world_size() > 1


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def active() -> bool:
    """A process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective() -> bool:
    """Every process runs the same code now: :func:`active` and not inside :func:`local`."""
    return _LOCAL_DEPTH == 0 and active()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Run the block as if this process were alone (no collectives in evaluation functions).

    For code that only some ranks run (rank 0 evaluating the slim model) or that differs
    between ranks (each rank of ana evaluates other points).
    """
    global _LOCAL_DEPTH
    _LOCAL_DEPTH += 1
    try:
        yield
    finally:
        _LOCAL_DEPTH -= 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; 0 when not set)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0: the process that writes the workspace and prints."""
    return rank() == 0


def _device() -> torch.device:
    """Where collective tensors live: this process's GPU for an NCCL-only group, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if not active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(values: Iterable[float]) -> list[float]:
    """The element-wise sums of ``values`` over all processes (float64); unchanged when alone."""
    values = [float(v) for v in values]
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every process (picklable objects; tensors come back on the CPU
    for gloo). Unchanged when alone."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device() if dist.get_backend() == "nccl" else None)
    return box[0]


@torch.no_grad()
def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every process.

    DDP broadcasts them before every forward, but each process then updates them with its
    own batch: after training, call this so that every rank evaluates and saves the same model.
    """
    if not active():
        return
    for b in unwrap(model).buffers():
        if b.device.type == "cuda" or dist.get_backend() != "nccl":
            dist.broadcast(b, src)
        else:  # NCCL moves CUDA tensors only
            t = b.to(_device())
            dist.broadcast(t, src)
            b.copy_(t)


# ----- DistributedDataParallel ------------------------------------------------------------
def wrap_ddp(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` on the model's device (``model`` itself when alone).

    DDP copies rank 0's parameters and buffers to every process when it is built, averages
    the gradients in ``backward`` and broadcasts rank 0's buffers (BatchNorm statistics)
    before every forward. The masks of a sparse model keep working: their gradient hooks zero
    the pruned slices before DDP averages them (zeros on every rank average to zero) and the
    optimizer post-step hook re-zeroes the weights, so every rank holds the same masks.
    ``kwargs`` go to ``DistributedDataParallel`` (e.g. ``find_unused_parameters=True``).
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        return model
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type == "cuda":
        kwargs.setdefault("device_ids", [dev.index if dev.index is not None else torch.cuda.current_device()])
    return DDP(model, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``)."""
    from torch.nn.parallel import DataParallel
    from torch.nn.parallel import DistributedDataParallel as DDP

    while isinstance(model, (DDP, DataParallel)):
        model = model.module
    return model


def rewrap(model: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Unwrap ``model``, apply ``fn`` to the module (it may return a new one), wrap it again.

    A DDP wrapper holds the parameters it was built with: after a change of parameters (a
    slim transform) it must be rebuilt, and the optimizer too (its parameters are gone).
    The new wrapper keeps the old one's ``find_unused_parameters`` and buffer syncing.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = unwrap(model)
    new = fn(inner)
    new = inner if new is None else new
    if not isinstance(model, DDP):
        return new
    kwargs: dict[str, Any] = {"find_unused_parameters": model.find_unused_parameters}
    if hasattr(model, "forward_sync_buffers"):  # torch >= 2.12 renamed broadcast_buffers
        kwargs["forward_sync_buffers"] = model.forward_sync_buffers
    else:
        kwargs["broadcast_buffers"] = model.broadcast_buffers
    barrier()  # every rank has transformed before the new wrapper syncs rank 0's weights
    return wrap_ddp(new, **kwargs)


def transform_ddp(model: nn.Module) -> nn.Module:
    """The slim version of a (DDP-wrapped) sparse model, wrapped again: training goes on.

    Every rank checks that it holds rank 0's pruning plan (the masks are the same on every
    rank, see :func:`wrap_ddp`), transforms its copy (no weights travel), and the new
    wrapper starts from rank 0's slim weights. Build a new optimizer over the returned
    model's parameters.

    Example:
        >>> import torch.nn as nn
        >>> from prunekit.engine.plan import PruningPlan
        >>> from prunekit.engine.sparse import apply_plan
        >>> m = apply_plan(nn.Linear(4, 3), PruningPlan({"weight": {0: [1]}, "bias": {0: [1]}},
        ...                                             {"weight": [3, 4], "bias": [3]}))
        >>> transform_ddp(m).out_features  # alone: the slim model itself
        2
    """
    from prunekit.engine import sparse
    from prunekit.engine.slim import to_slim

    def slim(module: nn.Module) -> nn.Module:
        plan = sparse.get_plan(module).to_dict()
        ref = broadcast_object(plan)
        if ref != plan:
            raise RuntimeError(
                f"rank {rank()} holds another pruning plan than rank 0; prune every rank alike "
                "(same weights, same settings) before transforming"
            )
        return to_slim(module)

    return rewrap(model, slim)


# ----- data -------------------------------------------------------------------------------
class ShardedLoader:
    """This rank's share of a training loader, reshuffled per epoch by :meth:`set_epoch`.

    A ``DataLoader`` over a map-style data set is rebuilt with a ``DistributedSampler``
    (shuffled if the original shuffled, seeded with ``seed + epoch``) and a batch of
    ``ceil(batch_size / world_size)``: the global batch, the number of steps per epoch and
    so the learning-rate schedule stay those of one process. Any other iterable with a
    ``len()`` is split by batch: rank ``r`` takes batches ``r, r + N, ...`` (the same number
    on every rank; the remainder is dropped).
    """

    def __init__(
        self, loader: Iterable, seed: int = 0, num_replicas: int | None = None, rank_: int | None = None
    ) -> None:
        from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

        self.original = loader
        self.world = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_
        self.sampler = None
        if (
            isinstance(loader, DataLoader)
            and not isinstance(loader.dataset, IterableDataset)
            and loader.batch_size is not None
        ):
            shuffle = isinstance(loader.sampler, RandomSampler)
            self.sampler = DistributedSampler(
                loader.dataset,
                num_replicas=self.world,
                rank=self.rank,
                shuffle=shuffle,
                seed=seed,
                drop_last=loader.drop_last,
            )
            extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
            self.loader: Iterable = DataLoader(
                loader.dataset,
                batch_size=math.ceil(loader.batch_size / self.world),
                sampler=self.sampler,
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                drop_last=loader.drop_last,
                timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context,
                persistent_workers=loader.persistent_workers,
                **extra,
            )
            self.n = len(self.loader)
        else:
            try:
                total = len(loader)  # type: ignore[arg-type]
            except TypeError:
                raise ValueError(
                    f"to split training data over {self.world} processes the loader needs a len(): "
                    f"got {type(loader).__name__}; pass a DataLoader over a map-style data set, a "
                    "list of batches, or your own train_fn"
                ) from None
            self.loader = loader
            self.n = total // self.world

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        if self.sampler is not None:
            yield from self.loader
            return
        taken = 0
        for i, batch in enumerate(self.loader):
            if taken >= self.n:
                break
            if i % self.world == self.rank:
                taken += 1
                yield batch


def shard_loader(loader: Iterable, seed: int = 0) -> Iterable:
    """:class:`ShardedLoader` of ``loader`` under a process group, else ``loader`` itself."""
    if not active() or isinstance(loader, ShardedLoader):
        return loader
    return ShardedLoader(loader, seed)


def _batch_size(target: Any) -> int:
    from torch.utils._pytree import tree_flatten

    ts = [t for t in tree_flatten(target)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    return int(ts[0].shape[0]) if ts else 1


class _Batches:
    """Batches ``i < limit`` of ``loader`` with ``i % step == offset``; counts the samples."""

    def __init__(self, loader: Iterable, limit: int | None, step: int = 1, offset: int = 0) -> None:
        self.loader, self.limit, self.step, self.offset = loader, limit, step, offset
        self.samples = 0
        self.batches = 0

    def __len__(self) -> int:
        n = len(self.loader)  # type: ignore[arg-type]
        n = min(n, self.limit) if self.limit is not None else n
        return len(range(self.offset, n, self.step))

    def __iter__(self) -> Iterator:
        self.samples = self.batches = 0
        for i, batch in enumerate(self.loader):
            if self.limit is not None and i >= self.limit:
                break
            if i % self.step == self.offset:
                if isinstance(batch, (tuple, list)) and len(batch) == 2:
                    self.samples += _batch_size(batch[1])
                self.batches += 1
                yield batch


def shard_eval_fn(
    loader: Iterable, build: Callable[[Iterable], Callable[[nn.Module], float]], max_batches: int | None = None
) -> Callable[[nn.Module], float]:
    """An ``eval_fn(model)`` whose batches are split over the processes and summed.

    ``build(batches)`` makes an evaluation function that returns the sample-weighted mean of
    a metric over ``batches`` (e.g. ``lambda b: make_eval_fn(b, "accuracy")``). Called by
    every rank together, rank ``r`` evaluates batches ``r, r + N, ...`` of the first
    ``max_batches``; ``mean * samples`` and ``samples`` (correct/total for accuracy, the loss
    sum for a loss) are summed over the ranks by ``all_reduce``, so every rank gets the
    metric of the whole evaluation set. Alone or inside :func:`local` it evaluates every
    batch itself. The result has ``collective = True`` (and the ``lower_is_better`` and
    ``metric`` attributes of ``build``'s function).
    """
    whole = _Batches(loader, max_batches)
    full = build(whole)

    def eval_fn(model: nn.Module) -> float:
        if not collective():
            return full(model)
        part = _Batches(loader, max_batches, world_size(), rank())
        fn = build(part)
        try:
            value = float(fn(model))
        except ValueError:
            if part.batches:
                raise
            value = 0.0  # no batch for this rank (fewer batches than ranks)
        weighted, samples = all_reduce_sum([value * part.samples, part.samples])
        if samples == 0:
            raise ValueError("the evaluation loader yielded no batches; nothing to evaluate")
        return weighted / samples

    for attr in ("lower_is_better", "metric", "evaluation"):  # evaluation: ana runs the forward (fast ana)
        if hasattr(full, attr):
            setattr(eval_fn, attr, getattr(full, attr))
    eval_fn.collective = True  # type: ignore[attr-defined]
    return eval_fn
