"""Measure the real speed-up: latency of several models (original and slim) in one run.

All models are timed on the same inputs, in the same process, interleaved: every repeat times
each model once, in alternating order, so load from other processes hits all of them alike.
``speedup`` is the median over repeats of ``time(reference) / time(model)`` paired within a
repeat (the reference is the first model), which is robust to a machine whose load drifts.

Example:
    >>> import torch, torchvision  # doctest: +SKIP
    >>> rows = bench({"original": model, "slim": slim}, lambda b: torch.randn(b, 3, 224, 224))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn as nn

__all__ = ["bench", "format_table", "environment", "BACKENDS"]

BACKENDS = ("eager", "onnxruntime")


def environment(threads: int | None = None) -> dict:
    """Where the numbers come from: versions, CPU, thread counts, GPU."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": _cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
    except ImportError:
        env["onnxruntime"] = None
    return env


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _eager_runner(model: nn.Module, x: torch.Tensor, device: str) -> Callable[[], Any]:
    x = x.to(device)

    def run():
        with torch.inference_mode():
            out = model(x)
        _sync(device)
        return out

    return run


def _ort_runner(session, x: torch.Tensor) -> Callable[[], Any]:
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feeds)


def _time_round(
    runners: dict[str, Callable[[], Any]], order: list[str], cpu: dict[str, list[float]] | None = None
) -> dict[str, float]:
    """Wall time of one call per model; with ``cpu``, also append the process CPU time."""
    out = {}
    for name in order:
        c = time.process_time()
        t = time.perf_counter()
        runners[name]()
        out[name] = time.perf_counter() - t
        if cpu is not None:
            cpu[name].append(time.process_time() - c)
    return out


def bench(
    models: dict[str, nn.Module],
    example_input_fn: Callable[[int], torch.Tensor],
    batch_sizes: Iterable[int] = (1, 32),
    backends: Iterable[str] = BACKENDS,
    *,
    warmup: int = 3,
    repeats: int = 10,
    min_repeats: int = 3,
    time_budget: float | None = None,
    threads: int | None = None,
    devices: Iterable[str] | None = None,
    onnx_dir: str | Path | None = None,
    out: TextIO | None = sys.stdout,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Latency and throughput of ``models``, measured together, interleaved.

    Args:
        models: ``{name: model}``; the first one is the reference for ``speedup``.
        example_input_fn: ``batch -> input tensor`` (one positional input, batch on dim 0).
        batch_sizes: Batch sizes to time.
        backends: ``'eager'`` (PyTorch, ``inference_mode``) and/or ``'onnxruntime'`` (each model
            exported to ONNX with a dynamic batch axis and checked against PyTorch first).
        warmup: Untimed calls per model before each configuration (a warm-up round of all
            models that takes over a second ends the warm-up).
        repeats: Timed calls per model and configuration (at most).
        min_repeats: Fewest timed calls when ``time_budget`` cuts ``repeats``.
        time_budget: Seconds one configuration (all models) may take; the repeat count is cut
            to fit, estimated from the warm-up, but never below ``min_repeats``.
        threads: CPU threads for torch and ONNX Runtime's intra-op pool (default: torch's current).
        devices: ``'cpu'`` and/or ``'cuda'``; default ``cpu`` plus ``cuda`` where available
            (eager only on CUDA, unless onnxruntime has its CUDA provider).
        onnx_dir: Where to keep the ONNX files (default: a temporary directory).
        out: Stream for the printed table (``None``: print nothing).
        log: Progress messages (default: none).

    Returns:
        One JSON-able dict per (model, backend, device, batch): ``median_ms``, ``p25_ms``,
        ``p75_ms``, ``iqr_ms``, ``min_ms``, ``max_ms``, ``throughput`` (items/s at the median),
        ``speedup`` (vs the first model), ``cpu_median_ms`` and ``cpu_speedup`` (the same from
        the process CPU time: with one thread, unaffected by other processes taking turns on
        the cores; with several, it counts idle spinning too), ``repeats``, ``torch_threads``,
        ``ort_intra_op_threads``, ``device``, ``gpu``.
    """
    backends, batch_sizes = _check_bench(models, backends, batch_sizes, repeats, warmup)
    threads = threads or torch.get_num_threads()
    devices = list(devices) if devices is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    timing = Timing(list(models), warmup, repeats, min_repeats, time_budget, log or (lambda s: None))
    for m in models.values():
        m.eval()
    rows: list[dict] = []
    with (
        _torch_threads(threads),
        _onnx_sessions(models, backends, example_input_fn, threads, onnx_dir, timing.log) as (
            sessions,
            providers,
        ),
    ):
        for backend in backends:
            for device in devices:
                if backend == "onnxruntime" and device != "cpu" and "CUDAExecutionProvider" not in providers:
                    timing.log(f"skipping onnxruntime on {device}: no CUDAExecutionProvider")
                    continue
                rows += _bench_device(models, sessions, example_input_fn, batch_sizes, backend, device, threads, timing)
    if out is not None:
        print(format_table(rows), file=out)
    return rows


@dataclass
class Timing:
    """How every configuration is timed (see :func:`bench`); ``names[0]`` is the reference."""

    names: list[str]
    warmup: int
    repeats: int
    min_repeats: int
    time_budget: float | None
    log: Callable[[str], None]


def _check_bench(models, backends, batch_sizes, repeats: int, warmup: int) -> tuple[list[str], list[int]]:
    """The backends and batch sizes as lists; a clear error for anything :func:`bench` cannot time."""
    if not models:
        raise ValueError("bench needs at least one model")
    backends = list(backends)
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"unknown backend(s) {bad}; choose from {list(BACKENDS)}")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    return backends, batch_sizes


@contextlib.contextmanager
def _onnx_sessions(models, backends, example_input_fn, threads: int, onnx_dir, log) -> Iterator[tuple[dict, list]]:
    """``({name: ONNX Runtime session}, providers)``: each model exported and checked first (none without ONNX)."""
    if "onnxruntime" not in backends:
        yield {}, []
        return
    import onnxruntime as ort

    from prunekit.deploy.export import check_export, export_onnx, onnx_session

    sessions: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if onnx_dir is None:
            onnx_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="prunekit-bench-"))
        for name, model in models.items():
            path = Path(onnx_dir) / f"{_safe(name)}.onnx"
            log(f"exporting {name} to ONNX ({path})")
            export_onnx(model, example_input_fn(1), path)
            check_export("onnx", path, model, example_input_fn(1))
            sessions[name] = onnx_session(path, threads)
        try:
            yield sessions, ort.get_available_providers()
        finally:
            sessions.clear()


def _bench_device(models, sessions, example_input_fn, batch_sizes, backend: str, device: str, threads: int,
                  timing: Timing) -> list[dict]:  # fmt: skip
    """Every batch size of one backend on one device (the models moved there and back)."""
    rows = []
    dev_models = {n: (m.to(device) if device != "cpu" else m) for n, m in models.items()}
    try:
        for batch in batch_sizes:
            x = example_input_fn(batch)
            if backend == "eager":
                runners = {n: _eager_runner(m, x, device) for n, m in dev_models.items()}
            else:
                runners = {n: _ort_runner(sessions[n], x) for n in timing.names}
            where = {
                "backend": backend,
                "device": device,
                "batch": batch,
                "torch_threads": torch.get_num_threads(),
                "ort_intra_op_threads": threads if backend == "onnxruntime" else None,
                "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            }
            rows += _measure(
                runners,
                timing.names,
                timing.names[0],
                timing.warmup,
                timing.repeats,
                timing.min_repeats,
                timing.time_budget,
                where,
                timing.log,
            )
    finally:
        if device != "cpu":
            for m in models.values():
                m.to("cpu")
    return rows


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def _measure(
    runners: dict[str, Callable[[], Any]],
    names: list[str],
    ref: str,
    warmup: int,
    repeats: int,
    min_repeats: int,
    time_budget: float | None,
    config: dict,
    log: Callable[[str], None],
) -> list[dict]:
    last = {n: 0.0 for n in names}
    for i in range(max(warmup, 1 if time_budget else 0)):
        last = _time_round(runners, names if i % 2 == 0 else names[::-1])
        if sum(last.values()) > 1.0:
            break  # slow configuration: after one long round, allocators and thread pools are warm
    n_rep = repeats
    if time_budget is not None:
        per_round = max(sum(last.values()), 1e-9)
        n_rep = max(min(min_repeats, repeats), min(repeats, int(time_budget / per_round)))
    log(f"{config['backend']} {config['device']} batch {config['batch']}: {n_rep} repeats")
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(n_rep):
        got = _time_round(runners, names if r % 2 == 0 else names[::-1], cpu)
        for n, t in got.items():
            times[n].append(t)
    rows = []
    for n in names:
        ts = times[n]
        q1, med, q3 = _quantiles(ts)
        ratios = [a / b for a, b in zip(times[ref], ts)]
        rows.append(
            {
                "model": n,
                **{k: config[k] for k in ("backend", "device", "batch")},
                "median_ms": med * 1e3,
                "p25_ms": q1 * 1e3,
                "p75_ms": q3 * 1e3,
                "iqr_ms": (q3 - q1) * 1e3,
                "min_ms": min(ts) * 1e3,
                "max_ms": max(ts) * 1e3,
                "throughput": config["batch"] / med,
                "speedup": statistics.median(ratios),
                "cpu_median_ms": statistics.median(cpu[n]) * 1e3,
                "cpu_speedup": statistics.median(a / max(b, 1e-9) for a, b in zip(cpu[ref], cpu[n])),
                "reference": ref,
                "repeats": n_rep,
                "warmup": warmup,
                **{k: config[k] for k in ("torch_threads", "ort_intra_op_threads", "gpu")},
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of :func:`bench` rows (latency = wall clock; CPU = process CPU time)."""
    head = [
        "model",
        "backend",
        "device",
        "batch",
        "median ms",
        "IQR ms",
        "min-max ms",
        "items/s",
        "speed-up",
        "CPU ms",
        "CPU speed-up",
        "repeats",
        "threads",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "--:" for i in range(len(head))) + "|"]
    for r in rows:
        ort_thr = r["ort_intra_op_threads"]
        thr = f"torch {r['torch_threads']}" + (f", ort {ort_thr}" if ort_thr else "")
        cells = [
            r["model"],
            r["backend"],
            r["device"] + (f" ({r['gpu']})" if r.get("gpu") else ""),
            str(r["batch"]),
            f"{r['median_ms']:.2f}",
            f"{r['iqr_ms']:.2f}",
            f"{r['min_ms']:.2f}-{r['max_ms']:.2f}",
            f"{r['throughput']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['cpu_median_ms']:.2f}",
            f"{r['cpu_speedup']:.2f}x",
            str(r["repeats"]),
            thr,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
