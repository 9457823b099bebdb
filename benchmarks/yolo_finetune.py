"""YOLO end to end on a generated data set: train, ana (mAP), prune -50% MACs, fine-tune with Ultralytics, export.

The data set is :func:`prunekit.integrations.ultralytics.shapes_dataset` (rectangles, ellipses and
triangles on noisy backgrounds, Ultralytics format; ``--train``/``--val`` images at ``--imgsz``). Steps,
each one measured with Ultralytics' own validator (mAP50-95 and mAP50 on the val split):

1. train YOLOv8n from its YAML (``train_sparse`` on a dense model is plain Ultralytics training),
2. ``prunekit.ana`` with ``make_map_eval_fn`` (mAP50-95) as the metric,
3. ``prunekit.prune(removal_ratio=0.5, round_to=8)`` guided by those curves (in ``export_mode``: the
   deployed outputs), the sparse model measured before any fine-tuning (MACs and parameters: those of
   its slim model),
4. ``train_sparse``: Ultralytics' trainer on the sparse model (masks kept through optimizer steps, EMA and
   checkpoints; checked at every checkpoint),
5. the slim model: ``to_slim`` of the fine-tuned model, ONNX export checked with onnxruntime, saved as an
   Ultralytics checkpoint and validated again through ``YOLO(path).val``.

Results in ``benchmarks/results/yolo_finetune.json``; the table is printed.

Usage:
    YOLO_OFFLINE=1 python benchmarks/yolo_finetune.py                      # 300/60 images, 128 px
    python benchmarks/yolo_finetune.py --epochs 30 --ft-epochs 15 --work /tmp/yolo-ft
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "yolo_finetune.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="yolov8n")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20, help="training of the dense model")
    ap.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning of the sparse model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--removal-ratio", type=float, default=0.5)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="ana ratios")
    ap.add_argument("--work", default="/tmp/prunekit-yolo-finetune")
    args = ap.parse_args(argv)
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        print("skipped: ultralytics is not installed (pip install 'prunekit[yolo]')")
        return 0
    result = run(args)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def run(args) -> dict:
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    import prunekit
    from prunekit.deploy.export import export
    from prunekit.engine.equivalence import checked_slim
    from prunekit.engine.sparse import is_sparse
    from prunekit.integrations import ultralytics as pu

    work = Path(args.work)
    data = pu.shapes_dataset(work / "shapes", n_train=args.train, n_val=args.val, imgsz=args.imgsz, seed=0)
    x = torch.randn(1, 3, args.imgsz, args.imgsz)
    common = {"imgsz": args.imgsz, "batch": args.batch, "project": work / "runs", "quiet": True, "seed": 0}
    map50_95 = pu.make_map_eval_fn(data, imgsz=args.imgsz, batch=args.batch)
    map50 = pu.make_map_eval_fn(data, imgsz=args.imgsz, batch=args.batch, metric="map50")
    stages, t = [], time.time()

    def record(stage: str, model, seconds: float, **extra) -> None:
        c = prunekit.count(prunekit.to_slim(model) if is_sparse(model) else model, x)  # what it will cost
        stages.append(
            {
                "stage": stage,
                "map50_95": map50_95(model),
                "map50": map50(model),
                "macs": c.macs,
                "params": c.params,
                "seconds": round(seconds, 1),
                **extra,
            }
        )
        print(stages[-1], flush=True)

    torch.manual_seed(0)
    dense = pu.train_sparse(
        DetectionModel(f"{args.model}.yaml", nc=3, verbose=False), data, epochs=args.epochs, name="dense", **common
    ).model
    record(f"dense, trained {args.epochs} epochs", dense, time.time() - t)
    pu.export_mode(dense)  # prune for the deployed outputs: the neck's feature maps prune too
    t = time.time()
    ws = work / "ws"
    sens = prunekit.ana(dense, x, map50_95, workspace=ws, ratios=args.ratios, progress=False, log=lambda s: None)
    res = prunekit.prune(dense, x, removal_ratio=args.removal_ratio, round_to=8, workspace=ws, log=lambda s: None)
    record(
        f"pruned -{res.macs_reduction:.1%} MACs (sparse, no fine-tuning)",
        dense,
        time.time() - t,
        ana_groups=len(sens.curves),
        ana_baseline=sens.baseline,
        method=res.method,
    )
    t = time.time()
    ft = pu.train_sparse(dense, data, epochs=args.ft_epochs, name="finetune", **common)
    record(
        f"fine-tuned {args.ft_epochs} epochs (sparse)",
        ft.model,
        time.time() - t,
        mask_checks=ft.mask_checks,
        slices_off=pu.pruned_slices_off(ft.model, prunekit.get_plan(ft.model)),
    )
    t = time.time()
    slim, err = checked_slim(ft.model, x)
    paths = export(slim, x, work / "export", formats=["onnx"])
    ckpt = pu.save_checkpoint(slim, work / "slim.pt")
    val = YOLO(ckpt).val(data=str(data), imgsz=args.imgsz, batch=args.batch, plots=False, verbose=False, device="cpu")
    record(
        "slim (to_slim of the fine-tuned model)",
        slim,
        time.time() - t,
        equiv_err=err,
        onnx=str(paths["onnx"]),
        ultralytics_val_map50_95=float(val.box.map),
        ultralytics_val_map50=float(val.box.map50),
    )
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "stages": stages,
        "torch": torch.__version__,
        "ultralytics": __import__("ultralytics").__version__,
    }


def table(result: dict) -> str:
    lines = ["| stage | mAP50-95 | mAP50 | MACs (G) | params (M) | seconds |", "|---|--:|--:|--:|--:|--:|"]
    for s in result["stages"]:
        lines.append(
            f"| {s['stage']} | {s['map50_95']:.3f} | {s['map50']:.3f} | {s['macs'] / 1e9:.3f} | "
            f"{s['params'] / 1e6:.2f} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
