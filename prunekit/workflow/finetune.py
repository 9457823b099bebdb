"""The ``finetune`` verb: train a sparse model back to accuracy, resumably.

A small built-in training loop (SGD with momentum or AdamW, cosine or step decay, linear
warm-up, optional label smoothing, CUDA mixed precision) that evaluates after every epoch
and keeps the best weights. Pruned channels stay at zero throughout: the sparse engine masks
their gradients and re-zeroes them after every optimizer step (see :mod:`prunekit.engine.sparse`).

Knowledge distillation (``distill_weight`` above 0, ``finetune(..., teacher=unpruned)``) mixes the
loss with the soft targets of the unpruned model: ``(1 - w) * loss + w * T^2 * KL(teacher_T ||
student_T)`` at temperature ``T`` (:func:`distillation_loss`); the teacher runs in eval mode
without gradients.

With a ``workspace`` every finished epoch leaves a checkpoint (model, optimizer, scheduler,
history; written to a temp file then renamed), so a killed run resumes from the last
finished epoch and ends with the same weights an uninterrupted run would have. Each epoch
reseeds torch's RNG with ``seed + epoch``, which makes the shuffling of a ``DataLoader``
(and dropout) independent of where the run was interrupted.

Under ``torchrun`` (see :mod:`prunekit.workflow.distributed`) the model trains in
``DistributedDataParallel``: each process gets ``1/N`` of every batch (a
``DistributedSampler``, the global batch and the schedule unchanged), losses and metrics are
summed over the processes, only rank 0 writes the workspace, and a checkpoint resumes on any
number of processes.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(4)]
    >>> score = lambda m: float((m(data[0][0]).argmax(1) == data[0][1]).float().mean())
    >>> res = finetune(model, data, score, FinetuneConfig(epochs=2, lr=0.05, progress=False))
    >>> len(res.history)
    2
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from prunekit.engine import sparse
from prunekit.graph.trace import call_model
from prunekit.utils import artifacts
from prunekit.utils.devices import check_device
from prunekit.utils.files import atomic_torch_save, torch_load
from prunekit.workflow import distributed as pdist
from prunekit.workflow.options import FinetuneConfig
from prunekit.workflow.progress import bar as progress_bar
from prunekit.workflow.validation import check_sparse_model, first_inputs
from prunekit.workflow.workspace import Workspace, model_fingerprint

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "distillation_loss"]

CHECKPOINT = artifacts.CHECKPOINT
FORMAT = "prunekit-finetune"


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        best_metric: The best metric seen (the model holds those weights if ``restore_best``).
        best_epoch: Its epoch (1-based; 0: the starting weights were best).
        history: ``[{"epoch", "loss", "metric", "lr", "seconds"}]`` per epoch.
        lr: The learning rate used (chosen by the trial, if any).
        trial: ``{lr: metric}`` of the learning-rate trial.
        resumed_from: The epoch the run resumed after (0: a fresh start).
    """

    best_metric: float | None
    best_epoch: int
    history: list[dict]
    lr: float
    trial: dict[float, float] = field(default_factory=dict)
    resumed_from: int = 0


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


def _split(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise ValueError(f"each training batch must be a pair (inputs, target), got {what}")
    return batch[0], batch[1]


def _score(eval_fn: Callable, model: nn.Module) -> float:
    v = eval_fn(model)
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(float(v)):
        raise TypeError(f"eval_fn must return a number, got {v!r:.80}")
    return float(v)


def _score_all(eval_fn: Callable, model: nn.Module) -> float:
    """The metric, the same on every process: a collective ``eval_fn`` (``shard_eval_fn``) runs on
    all of them and sums its parts; any other runs on rank 0 alone and is broadcast."""
    if not pdist.collective() or getattr(eval_fn, "collective", False):
        return _score(eval_fn, model)
    value = None
    if pdist.is_main():
        with pdist.local():
            value = _score(eval_fn, model)
    return pdist.broadcast_object(value)


def _better(a: float, b: float | None, lower: bool) -> bool:
    return b is None or (a < b if lower else a > b)


def _len(loader: Iterable, cap: int | None) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return cap
    return min(n, cap) if cap else n


def distillation_loss(student: Any, teacher: Any, temperature: float = 4.0) -> torch.Tensor:
    """Soft-target loss of knowledge distillation (Hinton et al., 2015), scaled by ``temperature ** 2``.

    ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the class dimension (1), the
    mean over the batch and any further positions; computed in float32. A ``(logits, ...)``
    tuple counts as its logits.

    Example:
        >>> s = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(distillation_loss(s, s))
        0.0
        >>> float(distillation_loss(s, -s, temperature=1.0)) > 0
        True
    """
    s, t = _logits(student).float(), _logits(teacher).float()
    if s.shape != t.shape:
        raise ValueError(
            f"distillation needs the student's and the teacher's outputs of one shape, got "
            f"{tuple(s.shape)} and {tuple(t.shape)}"
        )
    kl = F.kl_div(
        F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), reduction="none", log_target=True
    )
    return kl.sum(1).mean() * temperature**2


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"distillation needs the models to return class scores (a tensor), got {type(output).__name__}")
    return output


class _Teacher:
    """The unpruned model as a teacher: run in eval mode without gradients, its mode restored after
    (a copy of it where it lives on another device than the training)."""

    def __init__(self, model: nn.Module, weight: float, temperature: float, device: torch.device) -> None:
        self.original, self.weight, self.temperature = model, weight, temperature
        self.was_training = model.training
        self.model = model if _model_device(model) == device else copy.deepcopy(model).to(device)
        self.model.eval()

    def mix(self, loss: torch.Tensor, out: Any, x: Any) -> torch.Tensor:
        """``(1 - weight) * loss + weight * distillation_loss(out, teacher(x))``."""
        with torch.no_grad():
            soft = call_model(self.model, x)
        return (1 - self.weight) * loss + self.weight * distillation_loss(out, soft, self.temperature)

    def close(self) -> None:
        self.original.train(self.was_training)


class _Trainer:
    """Optimizer, schedule and one epoch of training for one model."""

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable,
        cfg: FinetuneConfig,
        lr: float,
        loss_fn: Callable | None,
        teacher: _Teacher | None = None,
    ) -> None:
        self.model, self.loader, self.cfg, self.lr, self.teacher = model, loader, cfg, lr, teacher
        self.device = torch.device(cfg.device) if cfg.device else _model_device(model)
        self.steps_per_epoch = _len(loader, cfg.max_batches) or 1
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
            )
        else:
            self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._factor)
        use_amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.amp = bool(use_amp)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.device.type == "cuda" else None
        smooth = cfg.label_smoothing
        self.loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, label_smoothing=smooth))

    def _factor(self, step: int) -> float:
        """LR multiplier at optimizer step ``step`` (warm-up, then the decay schedule)."""
        cfg = self.cfg
        warm = cfg.warmup_epochs * self.steps_per_epoch
        if step < warm:
            return 0.1 + 0.9 * step / warm
        epoch = step / self.steps_per_epoch
        if cfg.schedule == "cosine":
            total = max(cfg.epochs * self.steps_per_epoch - warm, 1)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / total)))
        if cfg.schedule == "step":
            return cfg.gamma ** int(epoch // cfg.step_epochs)
        return 1.0

    def step(self, batch: Any, i: int) -> float:
        """One optimizer step on one batch (the loss mixed with the teacher's, if any); returns the loss."""
        x, y = _to(_split(batch), self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = call_model(self.model, x)
            loss = self.loss_fn(out, y)
            if self.teacher is not None:
                loss = self.teacher.mix(loss, out, x)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {float(loss)} at batch {i}; lower the "
                "learning rate (finetune.lr) or turn off mixed precision"
            )
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def train_batches(self, limit: int | None, desc: str, progress: bool) -> float:
        """Train on up to ``limit`` batches; returns the mean loss."""
        self.model.train()
        bar = progress_bar(_len(self.loader, limit), desc, "batch", enabled=progress, leave=False)
        loss_sum, n = 0.0, 0
        try:
            for i, batch in enumerate(self.loader):
                if limit is not None and i >= limit:
                    break
                loss_sum += self.step(batch, i)
                n += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / n:.4f}", lr=f"{self.opt.param_groups[0]['lr']:.3g}")
        finally:
            if bar is not None:
                bar.close()
        if pdist.collective():
            pdist.sync_buffers(self.model)  # BatchNorm statistics: rank 0's, as DDP has them before a forward
            loss_sum, n = pdist.all_reduce_sum([loss_sum, n])  # the mean over every process's batches
        sparse.reapply_masks(pdist.unwrap(self.model))  # e.g. a GradScaler that skipped the last step
        return loss_sum / max(n, 1)

    def state_dict(self) -> dict:
        out = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state)
    sparse.reapply_masks(model)


def _signature(model: nn.Module, cfg: FinetuneConfig, teacher: nn.Module | None = None) -> dict:
    """What a checkpoint must match to be resumed: architecture, plan, options (and the teacher)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    plan = sparse.get_plan(model).to_dict()["pruned"] if sparse.is_sparse(model) else {}
    opts = {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "device")}
    out = {"shapes": shapes, "plan": plan, "config": opts}
    if teacher is not None and cfg.distill_weight > 0:
        out["teacher"] = model_fingerprint(teacher)
    return out


@dataclass
class _Run:
    """Where one fine-tuning run stands: what a checkpoint holds besides the weights."""

    lr: float
    trial: dict[float, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int = 0
    best_state: dict | None = None
    start: int = 0


@dataclass
class _Setup:
    """What every epoch uses: the model (and its DDP wrapper), the loop, the workspace."""

    model: nn.Module
    net: nn.Module
    cfg: FinetuneConfig
    loader: Iterable | None
    eval_fn: Callable | None
    ws: Workspace | None
    signature: dict
    lower: bool
    log: Callable[[str], None]
    trainer: _Trainer | None = None
    train_fn: Callable | None = None


def finetune(
    model: nn.Module,
    train_loader: Iterable | None,
    eval_fn: Callable[[nn.Module], float] | None,
    config: FinetuneConfig | None = None,
    *,
    workspace: str | Workspace | None = None,
    train_fn: Callable[[nn.Module, int], Any] | None = None,
    loss_fn: Callable | None = None,
    teacher: nn.Module | None = None,
    lower_is_better: bool = False,
    example_inputs: Any = None,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune ``model`` (usually sparse) in place; resumable when given a ``workspace``.

    Args:
        model: The model; pruned channels stay at zero through training.
        train_loader: Re-iterable ``(inputs, target)`` batches (not needed with ``train_fn``).
        eval_fn: ``eval_fn(model) -> number`` run after every epoch (e.g.
            :func:`prunekit.workflow.evaluation.make_eval_fn` over a validation split); ``None``:
            no evaluation, the last epoch is kept.
        config: :class:`FinetuneConfig` (defaults if ``None``).
        workspace: Directory for ``checkpoint.pt`` (per epoch) and ``best.pt``.
        train_fn: Your own training for one epoch, ``train_fn(model, epoch)`` (epoch is
            0-based); it replaces the built-in loop, while evaluation, the best weights and
            the per-epoch checkpoints stay (your optimizer's state is yours to keep). Under
            ``torchrun`` it gets the ``DistributedDataParallel`` model; split your data with
            :func:`prunekit.workflow.distributed.shard_loader`.
        loss_fn: ``loss_fn(output, target) -> scalar`` for the built-in loop (default:
            cross-entropy with ``label_smoothing``).
        teacher: The unpruned model, for knowledge distillation when ``config.distill_weight``
            is above 0: the loss becomes ``(1 - w) * loss + w * distillation_loss(...)``. It runs in
            eval mode without gradients and is never changed (its train/eval mode is restored at
            the end; where it lives on another device than the training, a copy runs there).
        lower_is_better: The metric is a loss.
        example_inputs: Inputs on which the slim model of the sparse ``model`` must run and match it
            before any epoch is spent (default: the first training batch's inputs); see
            :func:`prunekit.workflow.validation.check_sparse_model`.
        log: Where messages go (one line per epoch when no progress bar is shown).

    Example:
        >>> import copy, torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> cfg = FinetuneConfig(epochs=1, distill_weight=0.5, progress=False)
        >>> len(finetune(copy.deepcopy(net), data, None, cfg, teacher=net).history)
        1
    """
    cfg = _checked(config, train_loader, train_fn, teacher)
    if cfg.device:
        model.to(check_device(cfg.device, "finetune.device"))
    check_sparse_model(model, example_inputs if example_inputs is not None else first_inputs(train_loader, model))
    pdist.init_if_needed()
    on, main = pdist.collective(), pdist.is_main()  # several processes; this one writes and prints
    if on and not main:
        cfg = FinetuneConfig(**{**cfg.to_dict(), "progress": False})
        log = lambda m: None  # noqa: E731
    ws = workspace if isinstance(workspace, Workspace) or workspace is None else Workspace(workspace)
    signature = _signature(model, cfg, teacher)
    state = pdist.broadcast_object(_load_checkpoint(ws, signature, log, on) if main else None)
    net = pdist.wrap_ddp(model) if on else model  # trains; `model` (unwrapped) is evaluated and saved
    loader = pdist.shard_loader(train_loader, cfg.seed) if on and train_fn is None else train_loader
    setup = _Setup(model, net, cfg, loader, eval_fn, ws, signature, lower_is_better, log, train_fn=train_fn)
    teach = (
        _Teacher(
            teacher,
            cfg.distill_weight,
            cfg.distill_temperature,
            torch.device(cfg.device) if cfg.device else _model_device(model),
        )
        if teacher is not None and cfg.distill_weight > 0
        else None
    )
    try:
        run = _start(setup, state, loss_fn, teach)
        _train_epochs(setup, run)
    finally:
        if teach is not None:
            teach.close()
    if cfg.restore_best and run.best_state is not None and run.best_epoch != len(run.history):
        _restore(model, run.best_state)
    model.eval()
    pdist.barrier()  # rank 0's files are written when any process returns
    return FinetuneResult(run.best_metric, run.best_epoch, run.history, run.lr, run.trial, run.start)


def _checked(config: FinetuneConfig | None, train_loader, train_fn, teacher) -> FinetuneConfig:
    """The config, after checking that the arguments fit it."""
    cfg = config or FinetuneConfig()
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(cfg).__name__}")
    if train_fn is None and train_loader is None:
        raise ValueError("give a train_loader for the built-in training loop, or your own train_fn")
    if train_fn is not None and not callable(train_fn):
        raise TypeError(f"train_fn must be callable as train_fn(model, epoch), got {type(train_fn).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be the unpruned nn.Module, got {type(teacher).__name__}")
    if cfg.distill_weight > 0 and (teacher is None or train_fn is not None):
        raise ValueError(
            f"finetune.distill_weight={cfg.distill_weight} distils from a teacher in the built-in "
            "loop: pass finetune(..., teacher=unpruned_model) and no train_fn, or set "
            "distill_weight to 0"
        )
    return cfg


def _start(s: _Setup, state: dict | None, loss_fn: Callable | None, teacher: _Teacher | None) -> _Run:
    """Resume from ``state`` (a checkpoint), or start: learning-rate trial, score of the start."""
    cfg, model = s.cfg, s.model
    if state is not None:
        run = _Run(
            state["lr"],
            {float(k): v for k, v in state["trial"].items()},
            state["history"],
            state["best_metric"],
            state["best_epoch"],
            start=state["epoch"],
        )
    elif cfg.lr_trial and s.train_fn is None:
        trial, lr = _lr_trial(model, s.loader, s.eval_fn, cfg, loss_fn, s.lower, s.log, s.net, teacher)
        run = _Run(lr, trial)
    else:
        run = _Run(cfg.lr)
    if s.train_fn is None:
        s.trainer = _Trainer(s.net, s.loader or [], cfg, run.lr, loss_fn, teacher)
    main, on = pdist.is_main(), pdist.collective()
    if state is not None:
        _restore(model, state["model"])
        if s.trainer is not None:
            s.trainer.load_state_dict(state["trainer"])
        run.best_state = pdist.broadcast_object(
            torch_load(
                s.ws.path(artifacts.BEST),
                "best fine-tuned weights",
                f"delete {s.ws.path(CHECKPOINT)} to redo this fine-tuning",
                map_location="cpu" if on else None,
            )
            if main and s.ws and s.ws.exists(artifacts.BEST)
            else None
        )
        s.log(f"resuming fine-tuning after epoch {run.start} of {cfg.epochs} ({s.ws.root})")
    elif s.eval_fn is not None:
        run.best_metric = _score_all(s.eval_fn, model)  # the starting point counts: never end worse than it
        run.best_state = _snapshot(model) if cfg.restore_best else None
        if s.ws is not None and run.best_state is not None and main:
            atomic_torch_save(run.best_state, s.ws.path(artifacts.BEST))
    return run


def _train_epochs(s: _Setup, run: _Run) -> None:
    """Epochs ``run.start + 1 .. cfg.epochs``: train, evaluate, keep the best, checkpoint."""
    cfg = s.cfg
    bar = progress_bar(
        cfg.epochs, "finetune", "epoch", enabled=cfg.progress and cfg.epochs > run.start, initial=run.start
    )
    try:
        for epoch in range(run.start, cfg.epochs):
            row = _epoch(s, epoch)
            run.history.append(row)
            metric = row["metric"]
            if metric is not None and _better(metric, run.best_metric, s.lower):
                run.best_metric, run.best_epoch = metric, epoch + 1
                if cfg.restore_best:
                    run.best_state = _snapshot(s.model)
                    if s.ws is not None and pdist.is_main():
                        atomic_torch_save(run.best_state, s.ws.path(artifacts.BEST))
            _save_checkpoint(s, run, epoch + 1)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    metric=f"{metric:.4g}" if metric is not None else "-",
                    best=f"{run.best_metric:.4g}" if run.best_metric is not None else "-",
                )
            else:  # no bar (progress off, or no terminal): one line per epoch
                s.log(_epoch_line(row, cfg.epochs, run.best_metric))
    finally:
        if bar is not None:
            bar.close()


def _epoch_line(row: dict, epochs: int, best: float | None) -> str:
    """``finetune epoch 3/5: loss 0.4121, metric 0.9012 (best 0.9100), lr 0.005, 1.2 s``."""
    parts = [
        f"loss {row['loss']:.4f}" if row["loss"] is not None else None,
        f"metric {row['metric']:.4f}" + (f" (best {best:.4f})" if best is not None else "")
        if row["metric"] is not None
        else None,
        f"lr {row['lr']:.3g}" if row["lr"] is not None else None,
        f"{row['seconds']:.1f} s",
    ]
    return f"finetune epoch {row['epoch']}/{epochs}: " + ", ".join(p for p in parts if p)


def _epoch(s: _Setup, epoch: int) -> dict:
    """Train one epoch (seeded with ``seed + epoch``) and evaluate; the history row."""
    cfg = s.cfg
    torch.manual_seed(cfg.seed + epoch)
    if hasattr(s.loader, "set_epoch"):
        s.loader.set_epoch(epoch)  # DistributedSampler: shuffle with seed + epoch
    t0 = time.perf_counter()
    if s.train_fn is not None:
        s.net.train()
        s.train_fn(s.net, epoch)
        sparse.reapply_masks(s.model)
        loss = None
    else:
        loss = s.trainer.train_batches(cfg.max_batches, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress)
    metric = _score_all(s.eval_fn, s.model) if s.eval_fn is not None else None
    return {
        "epoch": epoch + 1,
        "loss": loss,
        "metric": metric,
        "lr": s.trainer.opt.param_groups[0]["lr"] if s.trainer else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _save_checkpoint(s: _Setup, run: _Run, epoch: int) -> None:
    if s.ws is None or not pdist.is_main():
        return
    atomic_torch_save(
        {
            "format": FORMAT,
            "signature": s.signature,
            "epoch": epoch,
            "model": s.model.state_dict(),
            "trainer": s.trainer.state_dict() if s.trainer else {},
            "history": run.history,
            "best_metric": run.best_metric,
            "best_epoch": run.best_epoch,
            "lr": run.lr,
            "trial": {str(k): v for k, v in run.trial.items()},
        },
        s.ws.path(CHECKPOINT),
    )


def _load_checkpoint(ws: Workspace | None, signature: dict, log, cpu: bool = False) -> dict | None:
    if ws is None or not ws.exists(CHECKPOINT):
        return None
    try:
        state = torch.load(ws.path(CHECKPOINT), weights_only=True, map_location="cpu" if cpu else None)
    except Exception as exc:  # noqa: BLE001  (atomic writes: only a foreign file gets here)
        log(f"cannot read {ws.path(CHECKPOINT)} ({type(exc).__name__}: {exc}); starting fine-tuning over")
        return None
    if state.get("format") != FORMAT or state.get("signature") != signature:
        log(f"the fine-tuning checkpoint in {ws.root} is for another model, plan or configuration; starting over")
        for name in (CHECKPOINT, artifacts.BEST):
            if ws.exists(name):
                ws.path(name).unlink()
        return None
    return state


def _lr_trial(
    model,
    loader,
    eval_fn,
    cfg: FinetuneConfig,
    loss_fn,
    lower: bool,
    log,
    net: nn.Module | None = None,
    teacher: _Teacher | None = None,
) -> tuple[dict, float]:
    """Train a few batches from the same start with each candidate LR; keep the best.
    ``net`` is what trains (the DDP wrapper of ``model`` under torchrun)."""
    if eval_fn is None:
        raise ValueError("the learning-rate trial (lr_trial) needs an eval_fn to compare the candidates")
    start = _snapshot(model)
    results: dict[float, float] = {}
    for lr in cfg.lr_trial:
        torch.manual_seed(cfg.seed)
        trial_cfg = FinetuneConfig(**{**cfg.to_dict(), "epochs": 1, "schedule": "constant", "warmup_epochs": 0.0})
        trainer = _Trainer(net if net is not None else model, loader, trial_cfg, lr, loss_fn, teacher)
        try:
            trainer.train_batches(cfg.trial_batches, f"lr trial {lr:g}", cfg.progress)
            results[lr] = _score_all(eval_fn, model)
        except FloatingPointError:
            results[lr] = math.inf if lower else -math.inf
        _restore(model, start)
    best = min(results, key=results.get) if lower else max(results, key=results.get)
    log("learning-rate trial: " + ", ".join(f"{k:g} -> {v:.4g}" for k, v in results.items()) + f"; using {best:g}")
    return results, best
