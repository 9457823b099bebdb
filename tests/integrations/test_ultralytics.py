"""Ultralytics YOLO end to end: prune after a forward pass, slim == sparse, export, reload, fine-tune.

Skipped without ``ultralytics`` (``pip install "prunekit[yolo]"``). Models come from the Ultralytics
YAMLs (no weights, no network: ``YOLO_OFFLINE=1``); the data set is generated (a few images of shapes).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: never wait on the network
ultralytics = pytest.importorskip("ultralytics")

import numpy as np  # noqa: E402

import prunekit  # noqa: E402
from helpers import assert_equivalent, run  # noqa: E402
from prunekit.engine.equivalence import TOLERANCE  # noqa: E402
from prunekit.integrations import ultralytics as pu  # noqa: E402

IMGSZ = 64
#: channel groups that must stay, by reason (the image input, the head's outputs, the DFL integral, and
#: YOLO11's C2PSA whose attention cuts its width at fixed sizes); every other group prunes
KEPT = (
    "model output channels are kept",
    "its input channels come from a tensor that cannot be pruned",
    "'softmax' mixes values across channels",
    "'split' cuts the channels at fixed sizes",
)


def _model(cfg: str, nc: int = 3, seed: int = 0):
    """A YOLO DetectionModel from its YAML, BatchNorm statistics set on one batch (outputs of a healthy
    scale, so slim == sparse is not vacuous), after an eval forward (the head caches its anchors)."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    net = DetectionModel(cfg, nc=nc, verbose=False)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, IMGSZ, IMGSZ))
    for m in bns:
        m.momentum = 0.03
    x = torch.randn(1, 3, IMGSZ, IMGSZ)
    net.eval()(x)
    assert net.model[-1].anchors.numel(), "the head should have cached its anchors"
    return net, x


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return pu.shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=8, imgsz=IMGSZ)


_PRUNED: dict[str, tuple] = {}


def _check_prunes(cfg: str):
    """Prune ``cfg`` (50% of every group, round_to=8) and check it; once per model and test session."""
    if cfg not in _PRUNED:
        _PRUNED[cfg] = _prune_and_check(cfg)
    return _PRUNED[cfg]


def _prune_and_check(cfg: str):
    net, x = _model(cfg)
    full = len(prunekit.Pruner(net, x).prunable_groups)  # eval outputs: the neck's feature maps are outputs too
    pu.export_mode(net)  # the deployed outputs: decoded predictions only
    pruner = prunekit.Pruner(net, x)
    frozen = pruner.validate(0.5)
    assert frozen == [], f"{cfg}: validation froze {[g.reasons[0] for g in frozen]}"
    for g in pruner.groups:
        if not g.prunable:
            assert any(k in g.reasons[0] for k in KEPT), f"{cfg}: group {g.id} kept for {g.reasons[0]!r}"
    assert len(pruner.prunable_groups) > full >= 40, pruner.summary()
    pruner.prune(0.5, round_to=8)
    slim = pruner.transform().eval()  # raises unless slim == sparse on the example inputs
    before, after = prunekit.count(net, x), prunekit.count(slim, x)
    assert after.macs < 0.5 * before.macs and after.params < 0.5 * before.params
    assert_equivalent(run(net, x), run(slim, x), f"{cfg}: slim vs sparse predictions")
    for m in (net, slim):
        pu.export_mode(m, on=False)
    sparse_out, slim_out = run(net, x), run(slim, x)
    for key in ("boxes", "scores"):  # the raw head outputs, before decoding
        assert prunekit.max_error(sparse_out[1][key], slim_out[1][key]) <= TOLERANCE, key
        assert float(sparse_out[1][key].std()) > 0.05, f"{key}: outputs without spread make the check vacuous"
    for a, b in zip(sparse_out[1]["feats"], slim_out[1]["feats"]):  # the neck's outputs (head inputs) pruned
        assert b.shape[1] < a.shape[1] and b.shape[1] % 8 == 0
    for m in (net, slim):
        pu.export_mode(m)
    return net, slim, x


def _check_attributes(slim: torch.nn.Module, x: torch.Tensor) -> None:
    head = slim.model[-1]
    assert head.no == head.nc + 4 * head.reg_max and head.nc == 3
    for box, cls in zip(head.cv2, head.cv3):
        assert box[-1].out_channels == 4 * head.reg_max and cls[-1].out_channels == head.nc
    blocks = [m for m in slim.modules() if hasattr(m, "forward_split")]
    assert blocks
    for m in blocks:  # C2f / C3k2 keep c in line with cv1: Ultralytics' exporter runs forward_split
        assert m.c * 2 == m.cv1.conv.out_channels, f"{type(m).__name__}.c = {m.c} vs cv1 {m.cv1.conv.out_channels}"
    for m in slim.modules():
        if type(m).__name__ in ("Conv2d", "BatchNorm2d"):
            n = m.out_channels if hasattr(m, "out_channels") else m.num_features
            assert n == m.weight.shape[0]
    split = copy.deepcopy(slim)
    for m in split.modules():
        if hasattr(m, "forward_split"):
            m.forward = m.forward_split
    assert_equivalent(run(slim, x), run(split, x), "forward_split of the slim model")


@pytest.mark.parametrize(
    "cfg",
    [
        "yolov8n.yaml",
        "yolo11n.yaml",
        pytest.param("yolov8s.yaml", marks=pytest.mark.slow),
        pytest.param("yolo11s.yaml", marks=pytest.mark.slow),
    ],
)
def test_yolo_prunes_after_a_forward_pass(cfg):
    _, slim, x = _check_prunes(cfg)
    _check_attributes(slim, x)


def test_slim_yolo_exports_and_loads_back_into_ultralytics(shapes, tmp_path):
    from prunekit.deploy.export import export

    _, slim, x = _check_prunes("yolov8n.yaml")
    paths = export(slim, x, tmp_path / "onnx", formats=["onnx"])  # checked with onnxruntime
    assert paths["onnx"].stat().st_size > 0
    ckpt = pu.save_checkpoint(slim, tmp_path / "slim.pt")
    yolo = ultralytics.YOLO(ckpt)
    assert pu.detection_model(yolo) is yolo.model
    with pytest.raises(TypeError, match="DetectionModel or YOLO"):
        pu.detection_model(str(ckpt))
    assert yolo.model.model[-1].cv2[0][0].conv.out_channels == slim.model[-1].cv2[0][0].conv.out_channels
    img = (np.random.default_rng(0).random((IMGSZ, IMGSZ, 3)) * 255).astype(np.uint8)
    result = yolo.predict(img, imgsz=IMGSZ, verbose=False, device="cpu")
    assert result[0].boxes is not None
    metrics = yolo.val(data=str(shapes), imgsz=IMGSZ, batch=8, plots=False, verbose=False, device="cpu")
    assert 0.0 <= metrics.box.map <= 1.0
    onnx = yolo.export(format="onnx", imgsz=IMGSZ, simplify=False, device="cpu")  # runs C2f.forward_split
    assert ultralytics.YOLO(onnx, task="detect").predict(img, imgsz=IMGSZ, verbose=False)[0].boxes is not None
    with pytest.raises(ValueError, match="sparse"):
        net, _ = _model("yolov8n.yaml")
        prunekit.Pruner(net, x).prune(0.3)
        pu.save_checkpoint(net, tmp_path / "sparse.pt")


def test_map_eval_fn_leaves_the_model_alone(shapes):
    net, x = _model("yolov8n.yaml")
    pu.export_mode(net)
    prunekit.Pruner(net, x).prune(0.3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    eval_fn = pu.make_map_eval_fn(shapes, imgsz=IMGSZ, batch=8)
    a, b = eval_fn(net), eval_fn(net)
    assert a == b and 0.0 <= a <= 1.0 and eval_fn.lower_is_better is False
    assert net.model[-1].export is True and isinstance(run(net, x), torch.Tensor)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), (
        "validation fused or changed the model"
    )
    assert prunekit.get_plan(net).pruned
    with pytest.raises(ValueError, match="metric must be one of"):
        pu.make_map_eval_fn(shapes, metric="mAP")
    with pytest.raises(FileNotFoundError, match="data.yaml"):
        pu.make_map_eval_fn(shapes.parent / "missing.yaml")


def test_train_sparse_keeps_the_masks_through_ultralytics_training(shapes, tmp_path):
    """Optimizer steps, the EMA deep copy and the pickled checkpoints: the pruned channels stay zero,
    best.pt carries the plan, and the fine-tuned model still equals its slim model."""
    net, x = _model("yolov8n.yaml")
    net.requires_grad_(False)  # as a model loaded from an Ultralytics checkpoint (its EMA) comes
    pu.export_mode(net)
    pruner = prunekit.Pruner(net, x)
    pruner.prune(0.3, round_to=8)
    plan = prunekit.get_plan(net)
    eval_fn = pu.make_map_eval_fn(shapes, imgsz=IMGSZ, batch=8)
    before = eval_fn(net)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    out = pu.train_sparse(
        net,
        shapes,
        epochs=1,
        imgsz=IMGSZ,
        batch=8,
        project=tmp_path,
        name="ft",
        quiet=True,
        seed=0,
        deterministic=False,
    )
    assert out.mask_checks and set(out.mask_checks) == {0}, "the EMA lost zeros at a checkpoint"
    assert pu.pruned_slices_off(out.trainer.model, plan) == 0 and pu.pruned_slices_off(out.model, plan) == 0
    assert any(not torch.equal(start[k], v) for k, v in net.state_dict().items()), "training changed nothing"
    params = dict(net.named_parameters())
    moments = 0
    for name, dims in plan.pruned.items():  # the gradients were masked: the optimizer never saw them
        state = out.trainer.optimizer.state.get(params.get(name), {})
        for key in ("exp_avg", "momentum_buffer"):
            if key in state:
                for d, idx in dims.items():
                    assert not state[key].index_select(d, torch.tensor(idx)).any(), f"{name}: {key} of pruned slice"
                    moments += 1
    assert moments, "no optimizer state to check"
    assert prunekit.get_plan(out.model).pruned == plan.pruned  # best.pt carried the plan
    raw = torch.load(out.best, weights_only=False)  # the final best.pt: Ultralytics moved the EMA to "model"
    assert isinstance((raw["ema"] or raw["model"])._prunekit_sparse, dict), "best.pt should hold the plan as a dict"
    after = eval_fn(out.model)
    assert math.isfinite(before) and math.isfinite(after) and out.metrics
    assert out.model.model[-1].export is True and net.model[-1].export is True, "export_mode lost in training"
    slim = prunekit.to_slim(out.model).eval()
    assert_equivalent(run(out.model, x), run(slim, x), "fine-tuned sparse vs its slim model")
    with pytest.raises(ValueError, match="classes"):
        pu.train_sparse(_model("yolov8n.yaml", nc=80)[0], shapes, epochs=1, imgsz=IMGSZ, project=tmp_path)
