"""Ultralytics YOLO support: slim attributes, a detection metric, fine-tuning with Ultralytics' trainer.

A YOLO ``DetectionModel`` (``ultralytics.YOLO("yolov8n.yaml").model``, YOLOv8 and YOLO11 tested) prunes
like any other model: ``prunekit.Pruner(model, torch.randn(1, 3, 640, 640))``. The model outputs (the
``Detect`` head's box and class convolutions, the fixed DFL integral) keep their channels, so ``Detect``'s
``nc``, ``reg_max`` and ``no`` never change. What this module adds:

- :func:`export_mode`: the heads return only their decoded predictions, as in a deployment; otherwise
  the neck's feature maps, which an eval-mode head echoes for the loss, count as model outputs and keep
  every channel.
- :func:`update_module`, the slim updater of every ``ultralytics.*`` module (registered by package in
  :data:`prunekit.engine.slim.PACKAGE_UPDATERS`, imported on first use): the CSP blocks' hidden width
  ``c`` (``C2f``, ``C3k2``, ``C2PSA``, ... split their ``cv1`` output as ``(c, c)``; Ultralytics' own
  exporter switches ``C2f`` to that ``split``) follows the pruned ``cv1``, and ``Detect``'s ``nc`` / ``no``
  follow its weights.
- :func:`make_map_eval_fn`: ``eval_fn(model) -> mAP50-95`` with Ultralytics' ``DetectionValidator`` (on a
  copy: Ultralytics fuses Conv+BN in place), for :func:`prunekit.ana` and ``prune(search=...)``.
- :func:`train_sparse`: fine-tune a sparse (or slim) model with Ultralytics' ``DetectionTrainer``; the
  pruned channels stay exactly zero through its optimizer steps, its EMA and its checkpoints, and
  ``best.pt`` carries the plan (a plain dict), so the model loaded from it is sparse again.
- :func:`save_checkpoint`: an Ultralytics checkpoint of a slim model; ``YOLO(path)`` loads it for
  ``predict`` / ``val`` / ``export`` without prunekit.
- :func:`shapes_dataset`: a small synthetic detection data set (shapes on noisy backgrounds) in the
  Ultralytics format, for examples and tests.

Ultralytics downloads fonts and weights on demand; set ``YOLO_OFFLINE=1`` where there is no network (the
helpers here pass ``plots=False``, and models built from YAML need no weights). Install with
``pip install "prunekit[yolo]"``.

Example:
    >>> import torch, prunekit  # doctest: +SKIP
    >>> from ultralytics import YOLO  # doctest: +SKIP
    >>> model = export_mode(YOLO("yolov8n.yaml").model.eval())  # doctest: +SKIP
    >>> x = torch.randn(1, 3, 640, 640)  # doctest: +SKIP
    >>> pruner = prunekit.Pruner(model, x); pruner.validate()  # doctest: +SKIP
    >>> pruner.prune(0.3, round_to=8); slim = pruner.transform()  # doctest: +SKIP
    >>> save_checkpoint(slim, "yolov8n-slim.pt"); YOLO("yolov8n-slim.pt").predict("bus.jpg")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from prunekit.engine import sparse

__all__ = [
    "update_module",
    "export_mode",
    "make_map_eval_fn",
    "train_sparse",
    "SparseTraining",
    "save_checkpoint",
    "shapes_dataset",
    "detection_model",
    "pruned_slices_off",
    "METRICS",
    "SHAPES",
]

#: metric names of :func:`make_map_eval_fn` -> the key in Ultralytics' validation results
METRICS = {
    "map": "metrics/mAP50-95(B)",
    "map50": "metrics/mAP50(B)",
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
}
#: class names of :func:`shapes_dataset`
SHAPES = ("rectangle", "ellipse", "triangle")


# ----- slim updater --------------------------------------------------------------------------------


def update_module(mod: nn.Module, old: dict) -> None:
    """Slim updater for every module of the ``ultralytics`` package (children first).

    Args:
        mod: The module, already sliced.
        old: Shapes before pruning of its own and its descendants' tensors (``"cv1.conv.weight"``).
    """
    cv1 = getattr(getattr(mod, "cv1", None), "conv", None)
    c = getattr(mod, "c", None)
    if isinstance(cv1, nn.Conv2d) and isinstance(c, int) and "cv1.conv.weight" in old:
        if old["cv1.conv.weight"][0] == 2 * c:  # cv1's output splits into (c, c); chunk() halves stay equal
            mod.c = cv1.out_channels // 2
    if isinstance(getattr(mod, "reg_max", None), int) and isinstance(getattr(mod, "cv3", None), nn.ModuleList):
        _update_detect(mod)  # Detect and its subclasses (Segment, Pose, OBB, v10Detect)


def _update_detect(mod: nn.Module) -> None:
    """``nc`` / ``no`` from the class convolutions (the model outputs: pruning keeps them, so this holds)."""
    first = mod.cv3[0] if len(mod.cv3) else None
    last = first[-1] if isinstance(first, nn.Sequential) else None
    if isinstance(last, nn.Conv2d) and isinstance(getattr(mod, "nc", None), int):
        mod.nc = last.out_channels
        mod.no = mod.nc + 4 * mod.reg_max


# ----- models and data -----------------------------------------------------------------------------


def _heads(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(getattr(m, "reg_max", None), int) and hasattr(m, "export")]


def export_mode(model: Any, on: bool = True) -> nn.Module:
    """Make the detection heads return only their decoded predictions (or, ``on=False``, everything again).

    In eval mode a ``Detect`` head returns ``(predictions, raw)``, where ``raw`` also echoes the neck's
    feature maps (``raw["feats"]``, which the loss reads only for their shapes); as model outputs their
    channels would all be kept. With ``export = True`` (what Ultralytics' exporter sets, what an ONNX or
    TensorRT deployment runs) the head returns the ``(batch, 4 + classes, anchors)`` predictions alone,
    so the neck prunes too. Training (:func:`train_sparse`) and validation (:func:`make_map_eval_fn`)
    switch the full outputs back on while they run. Returns the ``DetectionModel``.

    Example:
        >>> model = export_mode(YOLO("yolov8n.yaml").model.eval())  # doctest: +SKIP
        >>> model(torch.randn(1, 3, 640, 640)).shape  # doctest: +SKIP
        torch.Size([1, 84, 8400])
    """
    net = detection_model(model)
    for head in _heads(net):
        head.export = on
    return net


@contextlib.contextmanager
def _full_outputs(net: nn.Module):
    """The heads' training/validation outputs on (``export = False``) inside the block, restored after."""
    heads = _heads(net)
    saved = [h.__dict__.get("export") for h in heads]
    for h in heads:
        h.export = False
    try:
        yield
    finally:
        for h, v in zip(heads, saved):
            if v is None:
                h.__dict__.pop("export", None)
            else:
                h.export = v


def detection_model(model: Any) -> nn.Module:
    """The ``DetectionModel`` of a ``YOLO`` object (or ``model`` itself when it is one).

    Raises:
        TypeError: ``model`` is neither (e.g. a path: load it with ``YOLO(path)`` first).
    """
    from ultralytics.nn.tasks import BaseModel

    if isinstance(model, BaseModel):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, BaseModel):  # a YOLO object
        return inner
    raise TypeError(
        f"expected an Ultralytics DetectionModel or YOLO object, got {type(model).__name__}; "
        "build one with ultralytics.YOLO('yolov8n.yaml') or YOLO('weights.pt')"
    )


def shapes_dataset(
    root: str | Path, n_train: int = 200, n_val: int = 50, imgsz: int = 128, seed: int = 0, max_objects: int = 3
) -> Path:
    """Write a synthetic detection data set in the Ultralytics format; returns its ``data.yaml``.

    Each image is a noisy background of a random colour with 1..``max_objects`` filled shapes of
    contrasting colours (classes :data:`SHAPES`); labels are ``class cx cy w h`` in [0, 1].

    Example:
        >>> import tempfile
        >>> path = shapes_dataset(tempfile.mkdtemp(), n_train=2, n_val=1, imgsz=32)
        >>> path.name, sorted(p.name for p in (path.parent / "labels" / "val").iterdir())
        ('data.yaml', ['00000.txt'])
    """
    from PIL import Image, ImageDraw

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            bg = rng.integers(0, 256, 3)
            pixels = np.clip(bg + rng.normal(0, 25, (imgsz, imgsz, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            lines = [_draw_shape(ImageDraw.Draw(img), rng, imgsz, bg) for _ in range(rng.integers(1, max_objects + 1))]
            img.save(root / "images" / split / f"{i:05d}.png")
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(SHAPES))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return data


def _draw_shape(draw, rng: np.random.Generator, size: int, bg: np.ndarray) -> str:
    cls = int(rng.integers(0, len(SHAPES)))
    w, h = (int(v) for v in rng.integers(max(size // 8, 2), size // 2, 2))
    x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
    colour = tuple(int(v) for v in (255 - bg + rng.integers(-40, 41, 3)) % 256)
    box = [x0, y0, x0 + w, y0 + h]
    if cls == 0:
        draw.rectangle(box, fill=colour)
    elif cls == 1:
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(x0, y0 + h), (x0 + w, y0 + h), (x0 + w // 2, y0)], fill=colour)
    return f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}"


# ----- evaluation ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(enabled: bool = True):
    """Ultralytics' per-run tables and bars off (its LOGGER to WARNING) while a helper runs."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def make_map_eval_fn(
    data: str | Path,
    *,
    imgsz: int = 640,
    batch: int = 16,
    metric: str = "map",
    split: str = "val",
    device: str = "cpu",
    quiet: bool = True,
    **val_args: Any,
) -> Callable[[nn.Module], float]:
    """``eval_fn(model) -> float``: a detection metric of ``model`` on ``data`` with Ultralytics' validator.

    The model is validated as it is (sparse, slim or dense; a deep copy, since Ultralytics fuses
    Conv+BatchNorm in place); the data loader is built once and reused by every call.

    Args:
        data: An Ultralytics ``data.yaml``.
        imgsz, batch, split, device: As for ``YOLO.val``.
        metric: One of :data:`METRICS` (``"map"``: mAP50-95, ``"map50"``, ``"precision"``, ``"recall"``).
        quiet: Silence Ultralytics' per-run output.
        val_args: More ``YOLO.val`` arguments (``conf``, ``iou``, ``max_det``, ...).

    Example:
        >>> eval_fn = make_map_eval_fn("shapes/data.yaml", imgsz=128)  # doctest: +SKIP
        >>> sens = prunekit.ana(model, x, eval_fn, workspace="ws")  # doctest: +SKIP
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if not Path(data).is_file():
        raise FileNotFoundError(f"no Ultralytics data.yaml at {data}; write one (or use shapes_dataset(dir))")
    from ultralytics.models.yolo.detect import DetectionValidator

    args = {
        "data": str(data),
        "imgsz": imgsz,
        "batch": batch,
        "split": split,
        "device": device,
        "plots": False,
        "save_json": False,
        "verbose": False,
        **val_args,
    }
    validator = DetectionValidator(args=args)

    def eval_fn(model: nn.Module) -> float:
        was = model.training
        twin = copy.deepcopy(detection_model(model))
        export_mode(twin, on=False)
        with _quiet(quiet):
            stats = validator(model=twin)
        model.train(was)
        return float(stats[METRICS[metric]])

    eval_fn.lower_is_better = False
    return eval_fn


# ----- fine-tuning ---------------------------------------------------------------------------------


@dataclass
class SparseTraining:
    """What :func:`train_sparse` did.

    Attributes:
        model: The best checkpoint's (EMA) model, float32, in eval mode; sparse again (its masks
            attached) when the trained model was sparse.
        metrics: Ultralytics' final validation of ``best.pt`` (``"metrics/mAP50-95(B)"``, ...).
        best, last: The checkpoints Ultralytics wrote.
        trainer: The ``DetectionTrainer`` (``trainer.model`` holds the last, non-EMA weights).
        mask_checks: Pruned slices found non-zero in the EMA at each checkpoint (always 0).
    """

    model: nn.Module
    metrics: dict[str, float]
    best: Path
    last: Path
    trainer: Any = None
    mask_checks: list[int] = field(default_factory=list)


def pruned_slices_off(model: nn.Module, plan) -> int:
    """How many pruned slices of ``plan`` hold anything but their pruned value (0, or 1 for ``running_var``)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    off = 0
    for name, dims in plan.pruned.items():
        t = tensors.get(name)
        if t is None:
            continue
        for d, idx in dims.items():
            got = t.detach().index_select(d, torch.as_tensor(idx, dtype=torch.long, device=t.device))
            off += int(not bool((got == (1.0 if name.endswith("running_var") else 0.0)).all()))
    return off


def train_sparse(
    model: Any,
    data: str | Path,
    *,
    epochs: int = 10,
    imgsz: int = 640,
    batch: int = 16,
    device: str = "cpu",
    project: str | Path = "runs/prunekit",
    name: str = "finetune",
    quiet: bool = False,
    **train_args: Any,
) -> SparseTraining:
    """Fine-tune a sparse (or slim) YOLO model with Ultralytics' own ``DetectionTrainer``.

    The trainer gets ``model`` itself (``YOLO.train`` would rebuild the model from its YAML and
    lose the pruning). The pruned channels stay exactly zero: their gradients are masked and
    every optimizer step re-applies the masks; the EMA copy and every checkpoint carry the plan
    as a plain dict (``best.pt`` loads without prunekit); the model this returns is sparse again.
    Each checkpoint's EMA is checked (``SparseTraining.mask_checks``).

    Args:
        model: A ``DetectionModel`` or ``YOLO`` object whose head has the data set's classes
            (``DetectionModel("yolov8n.yaml", nc=3)``).
        data: An Ultralytics ``data.yaml``.
        epochs, imgsz, batch, device, project, name: As for ``YOLO.train``.
        quiet: Silence Ultralytics' per-epoch output.
        train_args: More ``YOLO.train`` arguments (``lr0``, ``optimizer``, ``mosaic``, ...).

    Raises:
        ValueError: The head's class count differs from the data set's.

    Example:
        >>> run = train_sparse(model, "shapes/data.yaml", epochs=5, imgsz=128)  # doctest: +SKIP
        >>> slim = prunekit.to_slim(run.model)  # doctest: +SKIP
    """
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import load_checkpoint

    net = detection_model(model)
    plan = sparse.get_plan(net) if sparse.is_sparse(net) else None
    cfg = (getattr(net, "yaml", None) or {}).get("yaml_file") or "yolov8n.yaml"  # only names the run
    overrides = {
        "model": cfg,
        "data": str(data),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "device": device,
        "project": str(Path(project).resolve()),
        "name": name,
        "exist_ok": True,
        "plots": False,
        "workers": 0,
        "amp": device != "cpu",
        **train_args,
    }
    with _quiet(quiet):
        trainer = DetectionTrainer(overrides=overrides)
        if trainer.ddp:
            raise ValueError(
                f"train_sparse trains the model in this process, on one device; got device={device!r} "
                "(Ultralytics would start new processes that rebuild the model from its YAML)"
            )
        _check_classes(net, trainer.data)
        trainer.model = net  # train this very model: masks, hooks and weights as they are
        checks: list[int] = []
        if plan is not None:
            # the trainer has just set requires_grad on every parameter: attach the gradient masks again
            trainer.add_callback("on_pretrain_routine_end", lambda tr: sparse.apply_plan(_unwrap(tr.model), plan))
            trainer.add_callback("on_model_save", lambda tr: checks.append(pruned_slices_off(tr.ema.ema, plan)))
        exporting = [h.export for h in _heads(net)]
        with _full_outputs(net):
            trainer.train()
        best_path = trainer.best if trainer.best.exists() else trainer.last
        best, _ = load_checkpoint(best_path)
    for head, on in zip(_heads(best), exporting):
        head.export = on  # the outputs the model had (export_mode)
    if plan is not None:
        sparse.reapply_masks(best)  # attaches the plan best.pt carries
    metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
    return SparseTraining(best.eval(), metrics, Path(trainer.best), Path(trainer.last), trainer, checks)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel / compiled wrappers


def _check_classes(net: nn.Module, data: dict) -> None:
    head = net.model[-1]
    nc = getattr(head, "nc", None)
    if nc is not None and nc != data["nc"]:
        raise ValueError(
            f"the model's Detect head has {nc} classes but the data set has {data['nc']}; build "
            f"the model for it (DetectionModel(cfg, nc={data['nc']})) before pruning"
        )


def save_checkpoint(model: Any, path: str | Path, **extra: Any) -> Path:
    """Write ``model`` (a slim ``DetectionModel``) as an Ultralytics checkpoint that ``YOLO(path)`` loads.

    The checkpoint is Ultralytics' own format (``{"model": fp16 module, "train_args": ..., ...}``);
    loading it needs Ultralytics only. A sparse model is refused: transform it first.

    Example:
        >>> save_checkpoint(slim, "yolov8n-slim.pt")  # doctest: +SKIP
        >>> YOLO("yolov8n-slim.pt").val(data="shapes/data.yaml")  # doctest: +SKIP
    """
    import ultralytics

    net = detection_model(model)
    if sparse.is_sparse(net):
        raise ValueError(
            "this model is sparse; save its slim model (prunekit.to_slim(model)), or fine-tune it "
            "with train_sparse, whose best.pt keeps the plan"
        )
    args = getattr(net, "args", None)
    args = vars(args) if hasattr(args, "__dict__") else dict(args or {})
    twin = export_mode(copy.deepcopy(net), on=False)  # Ultralytics' own state: full outputs in eval mode
    ckpt = {
        "model": twin.half(),
        "train_args": args,
        "date": datetime.now().isoformat(),
        "version": ultralytics.__version__,
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path
