"""Export a slim model for deployment, and prove every export computes what the model does.

Three formats, each written into one directory:

``safetensors``
    ``model.safetensors`` + ``spec.json`` (:func:`prunekit.save_slim`): weights without pickles;
    load with ``prunekit.load_slim(build_original_model(), directory)``.
``pt2``
    ``model.pt2``: a :func:`torch.export.export` program (``torch.export.load(path).module()``);
    no Python model code needed to run it.
``onnx``
    ``model.onnx`` (opset 17 by default) for ONNX Runtime, TensorRT, OpenVINO, ...

The batch axis (dim 0 of every input) is dynamic in ``pt2`` and ``onnx``. With ``check=True``
(the default) every file is loaded back and its outputs compared with the PyTorch model's on
the example inputs and on a batch of another size:

    max|export(x) - model(x)| <= tol * (1 + max|model(x)|),  tol = 1e-4 (:data:`prunekit.engine.equivalence.TOLERANCE`)

A file that fails the check raises :class:`ExportCheckError`; an op an exporter cannot handle
raises :class:`ExportError` naming the op.

Example:
    >>> import torch, torchvision  # doctest: +SKIP
    >>> pruner = Pruner(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))  # doctest: +SKIP
    >>> pruner.prune(0.5); slim = pruner.transform()  # doctest: +SKIP
    >>> export(slim, torch.randn(1, 3, 224, 224), "resnet18-slim")  # doctest: +SKIP
    {'safetensors': ..., 'pt2': PosixPath('resnet18-slim/model.pt2'), 'onnx': PosixPath('resnet18-slim/model.onnx')}
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit.engine import sparse
from prunekit.engine.equivalence import TOLERANCE, max_error
from prunekit.utils import artifacts
from prunekit.utils.files import atomic_write

__all__ = [
    "export",
    "export_onnx",
    "export_pt2",
    "export_safetensors",
    "check_export",
    "ExportError",
    "ExportCheckError",
    "FORMATS",
    "DEFAULT_OPSET",
    "ONNX_EXPORTERS",
]

FORMATS = ("safetensors", "pt2", "onnx")
#: ONNX opset: 17 has LayerNormalization and is read by every current runtime (ONNX Runtime >= 1.14,
#: TensorRT >= 8.6, OpenVINO >= 2023.0).
DEFAULT_OPSET = 17
#: ``"torchscript"`` (torch.onnx's tracing exporter: no extra dependency, exports the whole
#: torchvision classification zoo) or ``"dynamo"`` (the torch.export based one; needs ``onnxscript``).
ONNX_EXPORTERS = ("torchscript", "dynamo")
FILES = {"safetensors": artifacts.WEIGHTS, "pt2": "model.pt2", "onnx": "model.onnx"}


class ExportError(RuntimeError):
    """An exporter failed. ``op`` names the op it could not handle (``None`` if unknown)."""

    def __init__(self, message: str, fmt: str, op: str | None = None) -> None:
        super().__init__(message)
        self.format = fmt
        self.op = op


class ExportCheckError(ExportError):
    """A reloaded export computes something else than the PyTorch model."""

    def __init__(self, message: str, fmt: str, error: float) -> None:
        super().__init__(message, fmt)
        self.error = error


# ----- inputs --------------------------------------------------------------------------------
def _as_args(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of tensors (the positional arguments of "
        f"forward), got {type(example_inputs).__name__}"
    )


def _with_batch(args: tuple[torch.Tensor, ...], factor: int) -> tuple[torch.Tensor, ...]:
    """The inputs repeated ``factor`` times along the batch axis (dim 0)."""
    return tuple(torch.cat([t] * factor, 0) if t.dim() else t for t in args)


def _check_batched(args: tuple[torch.Tensor, ...]) -> None:
    sizes = {t.shape[0] for t in args if t.dim()}
    if len(sizes) > 1 or any(t.dim() == 0 for t in args):
        raise ValueError(
            "dynamic_batch=True needs dim 0 of every input to be the batch axis (one size), got "
            f"shapes {[tuple(t.shape) for t in args]}; pass dynamic_batch=False"
        )


def _require_exportable(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if sparse.is_sparse(model):
        raise ValueError(
            "this model is sparse (pruned channels held at zero, shapes unchanged): transform it first "
            "(slim = pruner.transform() or prunekit.to_slim(model)) and export the slim model"
        )


# ----- failing op ----------------------------------------------------------------------------
_OP_PATTERNS = (
    re.compile(r"operator '([\w.]+::[\w.]+)'"),  # TorchScript ONNX exporter
    re.compile(r"\b(aten::\w+|prim::\w+|onnx::\w+|torchvision::\w+)"),
    re.compile(r"torch\.ops\.(\w+)\.(\w+)"),  # torch.export / dynamo
    re.compile(r"\b(aten\.\w+)(?:\.\w+)?"),
    re.compile(r"\b(\w+::\w+)"),  # custom ops: namespace::name
)


def failing_op(exc: BaseException) -> str | None:
    """The op an exporter error is about (``'aten::linalg_svd'``), or ``None`` if it names none."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        for pat in _OP_PATTERNS:
            m = pat.search(text)
            if m:
                return "::".join(m.groups()) if len(m.groups()) > 1 else m.group(1)
        if "data-dependent" in text:
            where = re.search(r"The following call raised this error:\s*\n\s*(File [^\n]+)", text)
            return "aten::item (Python control flow on a tensor value)" + (f" at {where.group(1)}" if where else "")
        e = e.__cause__ or e.__context__
    return None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith(" ")]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _fail(fmt: str, what: str, exc: BaseException, hint: str = "") -> ExportError:
    op = failing_op(exc)
    where = f"the op {op}" if op else "an op it could not name"
    return ExportError(f"{what} failed at {where} ({_first_line(exc)}){hint}", fmt, op)


@contextlib.contextmanager
def _quiet():
    """Exporters print graphs and warnings (deprecations, tracer warnings); keep the console clean."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch.onnx", "torch.fx")]
    levels = [lg.level for lg in loggers]
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


# ----- the three exporters -------------------------------------------------------------------
def export_safetensors(model: nn.Module, directory: str | os.PathLike) -> Path:
    """``model.safetensors`` + ``spec.json`` of a slim model made by :func:`prunekit.to_slim`."""
    from prunekit.engine.slim import save_slim, slim_spec

    try:
        slim_spec(model)
    except ValueError:
        raise ValueError(
            "the safetensors format writes the slim spec (the new tensor shapes), but this model "
            "was not made by prunekit.to_slim / Pruner.transform; export it as 'pt2' or 'onnx'"
        ) from None
    save_slim(model, directory)
    return Path(directory) / FILES["safetensors"]


def export_pt2(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_batch: bool = True) -> Path:
    """A :func:`torch.export.export` program of ``model`` saved with :func:`torch.export.save`."""
    _require_exportable(model)
    args = _as_args(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        _check_batched(args)
        if args[0].shape[0] < 2:  # a batch of 1 would be specialised (0/1 specialisation)
            args = _with_batch(args, 2)
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    try:
        with _quiet():
            program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - every exporter error is reported with the op
        raise _fail(
            "pt2",
            "torch.export",
            exc,
            "; a shape that cannot vary with the batch size? try dynamic_batch=False"
            if dynamic_batch and "Constraints violated" in str(exc)
            else "",
        ) from exc
    finally:
        model.train(was)
    tmp = path.with_name(f".tmp.{path.name}")  # torch.export.save wants the .pt2 suffix
    with _quiet():
        torch.export.save(program, str(tmp))
    os.replace(tmp, path)
    return path


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    exporter: str = "torchscript",
    input_names: Sequence[str] | None = None,
) -> Path:
    """An ONNX file of ``model``; inputs are named ``input``, ``input_1``, ..., outputs ``output``, ...

    Args:
        opset: ONNX opset version (17 by default; 18 for the ``dynamo`` exporter).
        dynamic_batch: Dim 0 of every input and output is a symbolic ``batch`` axis.
        exporter: ``"torchscript"`` or ``"dynamo"`` (needs ``pip install onnxscript``).
    """
    _require_exportable(model)
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"exporter must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    args = _as_args(example_inputs)
    if dynamic_batch:
        _check_batched(args)
    names = list(input_names or ["input"] + [f"input_{i}" for i in range(1, len(args))])
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            n_out = len([t for t in torch.utils._pytree.tree_flatten(model(*args))[0] if isinstance(t, torch.Tensor)])
        finally:
            model.train(was)
    out_names = ["output"] + [f"output_{i}" for i in range(1, n_out)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    kwargs: dict[str, Any] = {"input_names": names, "output_names": out_names, "opset_version": opset}
    if exporter == "torchscript":
        kwargs["dynamo"] = False
        if dynamic_batch:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names + out_names}
    else:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ImportError(
                "the dynamo ONNX exporter needs onnxscript: pip install onnxscript, or use exporter='torchscript'"
            ) from None
        kwargs.update(dynamo=True, external_data=False)
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1)
            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
            if args[0].shape[0] < 2:
                args = _with_batch(args, 2)
    was = model.training
    model.eval()
    try:
        with _quiet():
            torch.onnx.export(model, args, str(tmp), **kwargs)
    except Exception as exc:  # noqa: BLE001 - every exporter error is reported with the op
        tmp.unlink(missing_ok=True)
        raise _fail(
            "onnx",
            f"ONNX export ({exporter} exporter, opset {opset})",
            exc,
            "; try another opset or exporter, or replace the op in the model",
        ) from exc
    finally:
        model.train(was)
    os.replace(tmp, path)
    try:
        import onnx
    except ImportError:
        return path
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the exported ONNX file does not pass onnx.checker: {_first_line(exc)}", "onnx") from exc
    return path


# ----- checks --------------------------------------------------------------------------------
def _reference(model: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        model.train(was)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's thread count)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("checking or running ONNX files needs onnxruntime: pip install 'prunekit[deploy]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run_onnx(session, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _loaded_runner(
    fmt: str, path: Path, model: nn.Module, factory: Callable[[], nn.Module] | None
) -> Callable[[tuple[torch.Tensor, ...]], Any]:
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda args: _run_onnx(session, args)
    if fmt == "pt2":
        module = torch.export.load(str(path)).module()
        return lambda args: module(*args)
    # safetensors: rebuild from the original architecture when we can, else reload the weights into
    # a copy of the slim model whose floating tensors were set to NaN (a missing tensor shows)
    from safetensors.torch import load_model

    from prunekit.engine.slim import load_slim

    if factory is not None:
        rebuilt = load_slim(factory(), path.parent)
    else:
        rebuilt = copy.deepcopy(model)
        with torch.no_grad():
            for t in [*rebuilt.parameters(), *rebuilt.buffers()]:
                if t.is_floating_point():
                    t.fill_(math.nan)
        load_model(rebuilt, str(path), strict=True)
    rebuilt.eval()

    def run(args):
        with torch.no_grad():
            return rebuilt(*args)

    return run


def check_export(
    fmt: str,
    path: str | os.PathLike,
    model: nn.Module,
    example_inputs: Any,
    *,
    tol: float = TOLERANCE,
    dynamic_batch: bool = True,
    factory: Callable[[], nn.Module] | None = None,
) -> dict:
    """Reload an export and compare it with ``model``; raises :class:`ExportCheckError` on a mismatch.

    Checks the example inputs and, with ``dynamic_batch``, the same inputs at twice the batch
    size. Returns ``{"max_error": ..., "tol": ..., "batch_sizes": [...]}``; the error is
    ``max|export - model| / (1 + max|model|)`` (:func:`prunekit.max_error`).
    """
    path = Path(path)
    args = _as_args(example_inputs)
    cases = [args, _with_batch(args, 2)] if dynamic_batch and fmt != "safetensors" else [args]
    try:
        run = _loaded_runner(fmt, path, model, factory)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ExportCheckError(f"the {fmt} export {path} does not load: {_first_line(exc)}", fmt, math.inf) from exc
    worst = 0.0
    for case in cases:
        ref = _reference(model, case)
        try:
            out = run(case)
        except Exception as exc:  # noqa: BLE001
            raise ExportCheckError(
                f"the {fmt} export {path} fails on inputs of shapes {[tuple(t.shape) for t in case]}: "
                f"{_first_line(exc)}",
                fmt,
                math.inf,
            ) from exc
        ref_flat = [t for t in torch.utils._pytree.tree_flatten(ref)[0] if isinstance(t, torch.Tensor)]
        out_flat = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        err = max_error(ref_flat, out_flat)
        worst = max(worst, err)
        if not err <= tol:
            raise ExportCheckError(
                f"the {fmt} export {path} differs from the PyTorch model on inputs of shapes "
                f"{[tuple(t.shape) for t in case]}: max|export - model| / (1 + max|model|) = {err:.3g} > {tol:g}",
                fmt,
                err,
            )
    return {"max_error": worst, "tol": tol, "batch_sizes": [int(c[0].shape[0]) if c[0].dim() else None for c in cases]}


# ----- front door ----------------------------------------------------------------------------
def export(
    model: nn.Module,
    example_inputs: Any,
    directory: str | os.PathLike,
    formats: Iterable[str] = FORMATS,
    *,
    check: bool = True,
    tol: float = TOLERANCE,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    onnx_exporter: str = "torchscript",
    factory: Callable[[], nn.Module] | None = None,
) -> dict[str, Path]:
    """Export a slim model into ``directory`` in each of ``formats``, checking each file.

    Args:
        model: The slim model (``Pruner.transform()`` / ``prunekit.to_slim``) or any plain model
            (then ``'safetensors'``, which stores the slim spec, is not available). A sparse model
            is refused: transform it first.
        example_inputs: A tensor or tuple of tensors; dim 0 is the batch axis.
        directory: Output directory (created). ``export.json`` there records the checks.
        formats: Any of ``'safetensors'``, ``'pt2'``, ``'onnx'``.
        check: Reload every export and compare it with ``model`` (see :func:`check_export`).
        tol: Check tolerance on ``max|export - model| / (1 + max|model|)``.
        dynamic_batch: Make the batch axis symbolic in ``pt2`` and ``onnx``.
        opset: ONNX opset version.
        onnx_exporter: ``'torchscript'`` or ``'dynamo'``.
        factory: Builds the original (unpruned) architecture; with it the safetensors check
            runs the real ``prunekit.load_slim(factory(), directory)`` round trip.

    Returns:
        ``{format: path of the written file}``.
    """
    _require_exportable(model)
    formats = list(dict.fromkeys([formats] if isinstance(formats, str) else formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    args = _as_args(example_inputs)
    if dynamic_batch:
        _check_batched(args)
    if check and "onnx" in formats:  # fail before exporting anything
        _need_onnxruntime()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    checks: dict[str, dict] = {}
    for fmt in formats:
        if fmt == "safetensors":
            paths[fmt] = export_safetensors(model, directory)
        elif fmt == "pt2":
            paths[fmt] = export_pt2(model, args, directory / FILES["pt2"], dynamic_batch=dynamic_batch)
        else:
            paths[fmt] = export_onnx(
                model, args, directory / FILES["onnx"], opset=opset, dynamic_batch=dynamic_batch, exporter=onnx_exporter
            )
        if check:
            checks[fmt] = check_export(
                fmt, paths[fmt], model, args, tol=tol, dynamic_batch=dynamic_batch, factory=factory
            )
    manifest = {
        "files": {f: p.name for f, p in paths.items()},
        "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in args],
        "dynamic_batch": dynamic_batch,
        "onnx_opset": opset if "onnx" in formats else None,
        "onnx_exporter": onnx_exporter if "onnx" in formats else None,
        "torch": torch.__version__,
        "check": {"rule": "max|export - model| <= tol * (1 + max|model|)", "results": checks} if check else None,
    }
    atomic_write(directory / artifacts.EXPORT_MANIFEST, json.dumps(manifest, indent=1))
    return paths


def _need_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImportError(
            "checking an ONNX export needs onnxruntime: pip install 'prunekit[deploy]' (or pass check=False)"
        ) from None
