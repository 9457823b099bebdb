"""The deployment verbs of the ``prunekit`` command: ``transform`` and ``bench``.

Usage::

    # sparse model (save_sparse / 'prunekit prune') -> slim model in three checked formats
    prunekit transform ws/pruned --factory torchvision.models:resnet18 --output resnet18-slim

    # a torchvision model pruned on the fly to 30% and 50% fewer MACs, timed against the original
    prunekit bench --model resnet18 --removal-ratio 0.3 0.5

    # your original model against slim models saved by transform (or prunekit.save_slim)
    prunekit bench --factory mypkg.models:build --slim resnet18-slim --batch-sizes 1 32
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import TextIO

from prunekit.cli.errors import CliError, guard
from prunekit.utils import artifacts
from prunekit.utils.refs import resolve

__all__ = ["register", "cmd_transform", "cmd_bench", "load_factory"]


def load_factory(ref: str, kwargs: dict | None = None):
    """``'package.module:callable'`` -> a zero-argument function building the model."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # factories in the current directory, like python -m
    obj = resolve(ref, f"--factory {ref}")
    if not callable(obj):
        raise ValueError(f"--factory {ref} is not callable")
    kwargs = dict(kwargs or {})
    return lambda: obj(**kwargs)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape such as 3x224x224, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return dims


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--kwargs must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--kwargs must be a JSON object, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"a removal ratio is a fraction of MACs in (0, 1), got {text!r}")
    return v


def _model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--factory",
        metavar="MODULE:CALLABLE",
        required=required,
        help="builds the original (unpruned) model, e.g. torchvision.models:resnet18",
    )
    p.add_argument(
        "--kwargs",
        type=_json_dict,
        default={},
        metavar="JSON",
        help="keyword arguments for the factory, e.g. '{\"num_classes\": 10}'",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        metavar="CxHxW",
        help="shape of one input without the batch axis, any rank, e.g. 16 or 3x32x32 (default: the "
        "example input recorded in SPARSE_DIR/plan.json, else the workspace's config.yaml "
        "model.input_shape; refused when neither has one)",
    )
    p.add_argument(
        "--device",
        metavar="DEVICE",
        help="where to build and check the slim model (cpu, cuda; default cpu); exports are written from the CPU",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``transform`` and ``bench`` sub-commands to ``sub``."""
    from prunekit.deploy.export import DEFAULT_OPSET, FORMATS, ONNX_EXPORTERS

    p = sub.add_parser(
        "transform",
        help="turn a saved sparse model into a slim one and export it (safetensors, pt2, onnx)",
        description="Load a sparse model saved by prunekit.save_sparse or 'prunekit prune' (model.safetensors + "
        "plan.json) into a fresh model from --factory, remove the pruned channels, and export the "
        "slim model in each format. Every export is reloaded and compared with the PyTorch slim "
        "model (max|export - model| <= 1e-4 * (1 + max|model|)) on a batch of --batch and one twice "
        "as large (the batch axis is dynamic).",
        epilog="example: prunekit transform ws/pruned --factory torchvision.models:resnet18 --output resnet18-slim",
    )
    p.add_argument("sparse_dir", metavar="SPARSE_DIR", help="directory with model.safetensors + plan.json")
    _model_args(p, required=True)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for the exported files")
    p.add_argument(
        "--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="export formats (default: all three)"
    )
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input (1)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({DEFAULT_OPSET})")
    p.add_argument(
        "--onnx-exporter",
        choices=ONNX_EXPORTERS,
        default="torchscript",
        help="torch.onnx exporter: torchscript (default) or dynamo (needs onnxscript)",
    )
    p.add_argument("--static-batch", action="store_true", help="fix the batch size in pt2 and onnx")
    p.add_argument("--no-check", action="store_true", help="do not reload and compare the exports")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser(
        "bench",
        help="time the original model against slim models (PyTorch eager and ONNX Runtime)",
        description="Measure latency and throughput of the original model and its slim versions in one run, "
        "interleaved (each repeat times every model once, in alternating order), and print the "
        "MACs ratio next to the measured speed-up. The original comes from --model (a torchvision "
        "model with random weights) or --factory; the slim models are pruned on the fly "
        "(--removal-ratio) and/or loaded from --slim directories.",
        epilog="examples: prunekit bench --model resnet18 --removal-ratio 0.3 0.5;  "
        "prunekit bench --factory torchvision.models:resnet18 --slim resnet18-slim --batch-sizes 1",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME", help="torchvision model name, e.g. resnet50 (random weights)")
    _bench_args(p, src)
    p.set_defaults(func=cmd_bench)


def _bench_args(p: argparse.ArgumentParser, src) -> None:
    from prunekit.deploy.bench import BACKENDS

    src.add_argument(
        "--factory",
        metavar="MODULE:CALLABLE",
        help="builds the original model instead of --model, e.g. mypkg.models:build",
    )
    p.add_argument(
        "--kwargs",
        type=_json_dict,
        default={},
        metavar="JSON",
        help="keyword arguments for --factory or the torchvision model, e.g. '{\"num_classes\": 10}'",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        default=(3, 224, 224),
        metavar="CxHxW",
        help="shape of one input without the batch axis (3x224x224)",
    )
    p.add_argument(
        "--removal-ratio",
        type=_ratio,
        nargs="+",
        default=[],
        metavar="R",
        help="prune the original on the fly to remove this fraction of MACs (uniform allocation); "
        "several values give several slim models",
    )
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this (1)")
    p.add_argument(
        "--slim",
        nargs="+",
        default=[],
        metavar="DIR",
        help="slim models saved by 'prunekit transform' or prunekit.save_slim (needs the original's "
        "factory: --factory or --model)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], metavar="N", help="batch sizes (1 32)")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        help="eager (PyTorch) and/or onnxruntime (default: both)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model and configuration (3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per model and configuration (10)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="seconds per configuration; cuts --repeats for slow models (at least 3 repeats)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and ONNX Runtime (default: torch's current count)",
    )
    p.add_argument(
        "--device",
        metavar="DEVICE",
        default=None,
        help="time on this device only (cpu, cuda; default: cpu, plus cuda where available)",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON")


def _transform_shape(args: argparse.Namespace, src: Path, out: TextIO) -> tuple[int, ...]:
    """``--input-shape``, else the example input recorded with the sparse model or in its workspace's config."""
    if args.input_shape is not None:
        return tuple(args.input_shape)
    from prunekit.engine.plan import PruningPlan

    shape = PruningPlan.load(src / artifacts.PLAN).meta.get("input_shape")
    where = f"{src / 'plan.json'} (the example input prune saw)"
    config = src.parent / artifacts.CONFIG
    if not shape and config.is_file():
        import yaml

        from prunekit.utils.files import reading

        with reading(config, "workspace config", "give --input-shape, or run the verb that wrote it again"):
            data = yaml.safe_load(config.read_text()) or {}
        shape = (data.get("model") or {}).get("input_shape") if isinstance(data, dict) else None
        where = f"{config} (model.input_shape)"
    if not shape or len(shape) < 2:
        raise CliError(
            f"give --input-shape, the shape of one input without the batch axis (e.g. 3x32x32): "
            f"{src}/plan.json records no example input and {config} has no model.input_shape"
        )
    print(f"input shape {'x'.join(map(str, shape[1:]))} from {where}", file=out)
    return tuple(int(d) for d in shape[1:])


@guard("transform")
def cmd_transform(args: argparse.Namespace, out: TextIO) -> int:
    import torch

    from prunekit.deploy.export import export
    from prunekit.engine.counting import count
    from prunekit.engine.equivalence import TOLERANCE, checked_slim
    from prunekit.engine.sparse import load_sparse
    from prunekit.utils.devices import check_device
    from prunekit.utils.files import ArtifactError

    if args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")
    device = check_device(args.device, "--device") or torch.device("cpu")
    src = Path(args.sparse_dir)
    if not (src / artifacts.PLAN).exists() or not (src / artifacts.WEIGHTS).exists():
        raise CliError(
            f"{src} is not a sparse model directory (model.safetensors + plan.json, written by "
            "prunekit.save_sparse or 'prunekit prune')"
        )
    shape = _transform_shape(args, src, out)
    try:
        factory = load_factory(args.factory, args.kwargs)
        model = factory().eval()
    except Exception as exc:  # noqa: BLE001  (the user's factory)
        raise CliError(f"cannot build the model: {' '.join(str(exc).split())}") from exc
    try:
        load_sparse(model, src)
    except ArtifactError:
        raise  # a damaged file, not the wrong architecture
    except (RuntimeError, ValueError) as exc:
        raise CliError(f"{src} does not load into {args.factory}(): {' '.join(str(exc).split())[:300]}") from exc
    model.to(device)
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    slim, err = checked_slim(model, x)  # EquivalenceError: a one-line error naming the input shape
    one = x[:1]
    before, after = count(model, one), count(slim, one)
    print(
        f"slim model of {src}: MACs {before.macs / 1e6:.2f} M -> {after.macs / 1e6:.2f} M "
        f"({before.macs / max(after.macs, 1):.2f}x fewer), params {before.params:,} -> {after.params:,}; "
        f"slim vs sparse error {err:.2e} (<= {TOLERANCE:g}) on input {tuple(x.shape)}",
        file=out,
    )
    paths = export(
        slim.cpu(),
        x.cpu(),
        args.output,
        args.formats,
        check=not args.no_check,
        opset=args.opset,
        dynamic_batch=not args.static_batch,
        onnx_exporter=args.onnx_exporter,
        factory=factory,
    )
    manifest = json.loads((Path(args.output) / artifacts.EXPORT_MANIFEST).read_text())
    checks = (manifest.get("check") or {}).get("results", {})
    for fmt, path in paths.items():
        c = checks.get(fmt)
        verdict = (
            (
                f"checked: max error {c['max_error']:.2e} <= {c['tol']:g} at batch "
                f"{', '.join(map(str, c['batch_sizes']))}"
            )
            if c
            else "not checked"
        )
        print(f"  {fmt:12s} {path}  ({verdict})", file=out)
    return 0


def _torchvision_factory(name: str, kwargs: dict):
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    return lambda: torchvision.models.get_model(name, weights=None, **kwargs)


@guard("bench")
def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    import torch

    from prunekit.deploy.bench import bench, environment
    from prunekit.engine.counting import count
    from prunekit.engine.slim import load_slim
    from prunekit.utils.devices import check_device
    from prunekit.utils.files import ArtifactError
    from prunekit.workflow.prune import prune

    if not args.removal_ratio and not args.slim:
        raise CliError("give --removal-ratio and/or --slim: something to compare the original with")
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1 or args.round_to < 1:
        raise CliError("--repeats, --batch-sizes and --round-to must be >= 1, --warmup >= 0")
    devices = [str(check_device(args.device, "--device"))] if args.device else None
    try:
        factory = (
            _torchvision_factory(args.model, args.kwargs) if args.model else load_factory(args.factory, args.kwargs)
        )
        original = factory().eval()
    except Exception as exc:  # noqa: BLE001  (the user's factory)
        raise CliError(f"cannot build the model: {' '.join(str(exc).split())}") from exc
    threads = args.threads or torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    shape = tuple(args.input_shape)

    def inputs(batch: int) -> torch.Tensor:
        return torch.randn(batch, *shape, generator=gen)

    one = inputs(1)
    models = {"original": original}
    for r in args.removal_ratio:
        res = prune(
            copy.deepcopy(original), one, removal_ratio=r, mode="slim", round_to=args.round_to, log=lambda s: None
        )
        models[f"slim-{r:.0%}" + (f"-r{args.round_to}" if args.round_to > 1 else "")] = res.model.eval()
    for d in args.slim:
        try:
            models[Path(d).name or d] = load_slim(factory(), d).eval()
        except (ArtifactError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise CliError(
                f"cannot load the slim model {d} into the original architecture: {' '.join(str(exc).split())[:300]}"
            ) from exc
    macs = {}
    for name, m in models.items():
        try:
            macs[name] = count(m, one).macs
        except Exception as exc:  # noqa: BLE001
            raise CliError(
                f"{name} does not run on an input of shape {tuple(one.shape)} (--input-shape): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    print(
        "MACs per item: "
        + ", ".join(
            f"{n} {v / 1e6:.1f} M ({macs['original'] / max(v, 1):.2f}x fewer)"
            if n != "original"
            else f"{n} {v / 1e6:.1f} M"
            for n, v in macs.items()
        ),
        file=out,
    )
    env = environment(threads)
    print(
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, {env['cpu_count']} CPUs, {threads} threads"
        + (f", GPU {env['gpu']}" if env["gpu"] else ""),
        file=out,
    )
    rows = bench(
        models,
        inputs,
        args.batch_sizes,
        args.backends,
        warmup=args.warmup,
        repeats=args.repeats,
        time_budget=args.time_budget,
        threads=threads,
        devices=devices,
        out=out,
    )
    for r in rows:
        r["macs"] = macs[r["model"]]
        r["macs_ratio"] = macs["original"] / max(macs[r["model"]], 1)
    if args.json:
        from prunekit.utils.files import atomic_write

        atomic_write(args.json, json.dumps({"environment": env, "rows": rows}, indent=1))
        print(f"rows written to {args.json}", file=out)
    return 0
