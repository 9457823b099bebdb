"""Deployment: exports (safetensors, torch.export .pt2, ONNX) reload and match; bench; CLI verbs."""

from __future__ import annotations

import copy
import importlib.util
import io
import json

import pytest
import torch
import torch.nn as nn

import prunekit
from helpers import randomize_batchnorm
from prunekit.cli.main import main
from prunekit.deploy.bench import bench, format_table
from prunekit.deploy.export import FORMATS, ExportCheckError, ExportError, check_export, export, export_onnx, export_pt2
from prunekit.engine.equivalence import TOLERANCE as TOL
from prunekit.models.demo import DemoNet

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnx/onnxruntime not installed (pip install 'prunekit[deploy]')",
)

DEMO_KWARGS = {"in_channels": 3, "width": 8, "blocks": 1}


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = DemoNet(**DEMO_KWARGS).eval()
    randomize_batchnorm(m, torch.Generator().manual_seed(0))
    return m


class TinyAttention(nn.Module):
    """Token embedding, multi-head self-attention with a residual, LayerNorm, MLP, mean-pool head."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        return self.head(h.mean(1))


def slim_of(factory, x, ratio=0.5, ignore=()):
    model = factory().eval()
    pruner = prunekit.Pruner(model, x, excludes=ignore)
    pruner.prune(ratio)
    return model, pruner.transform().eval()


CASES = {
    "cnn": (small_cnn, lambda b: torch.randn(b, 3, 16, 16), ()),
    "attention": (TinyAttention, lambda b: torch.randn(b, 6, 8), ()),
    # residual stream kept, heads pruned: PrunedMultiheadAttention (inner width != embed_dim)
    "attention-heads": (TinyAttention, lambda b: torch.randn(b, 6, 8), ("embed",)),
}


@needs_ort
@pytest.mark.parametrize("case", list(CASES))
def test_all_formats_reload_and_match(case, tmp_path):
    factory, inputs, ignore = CASES[case]
    x = inputs(1)
    _, slim = slim_of(factory, x, ignore=ignore)
    if case == "attention-heads":
        assert type(slim.attn).__name__ == "PrunedMultiheadAttention"
    paths = export(slim, x, tmp_path, factory=factory)
    assert set(paths) == set(FORMATS) and all(p.exists() for p in paths.values())
    manifest = json.loads((tmp_path / "export.json").read_text())
    for fmt in FORMATS:
        res = manifest["check"]["results"][fmt]
        assert res["max_error"] <= TOL == res["tol"]
    assert manifest["check"]["results"]["onnx"]["batch_sizes"] == [1, 2]

    # independent reloads, at a batch size the export never saw (the batch axis is dynamic)
    x3 = inputs(3)
    with torch.no_grad():
        ref = slim(x3)
    program = torch.export.load(str(paths["pt2"])).module()
    with torch.no_grad():
        assert prunekit.max_error(ref, program(x3)) <= TOL
    import onnxruntime as ort

    sess = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": x3.numpy()})[0])
    assert prunekit.max_error(ref, got) <= TOL
    rebuilt = prunekit.load_slim(factory(), tmp_path).eval()
    with torch.no_grad():
        assert prunekit.max_error(ref, rebuilt(x3)) <= TOL


def test_sparse_model_asks_for_transform(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    model = small_cnn()
    prunekit.Pruner(model, x).prune(0.5)
    assert prunekit.engine.sparse.is_sparse(model)
    for call in (
        lambda: export(model, x, tmp_path, formats=["pt2"]),
        lambda: export_pt2(model, x, tmp_path / "m.pt2"),
        lambda: export_onnx(model, x, tmp_path / "m.onnx"),
    ):
        with pytest.raises(ValueError, match="sparse.*transform it first"):
            call()
    assert not any(tmp_path.iterdir())


def test_safetensors_needs_a_slim_model(tmp_path):
    with pytest.raises(ValueError, match="not made by prunekit.to_slim"):
        export(nn.Linear(4, 2), torch.randn(1, 4), tmp_path, formats=["safetensors"])
    with pytest.raises(ValueError, match="unknown export format"):
        export(nn.Linear(4, 2), torch.randn(1, 4), tmp_path, formats=["tflite"])


class SVD(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[0]


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return x
        return -x


def test_unsupported_op_is_named(tmp_path):
    with pytest.raises(ExportError, match="aten::linalg_svd") as info:
        export_onnx(SVD(), torch.randn(2, 3, 3), tmp_path / "svd.onnx")
    assert info.value.op == "aten::linalg_svd" and info.value.format == "onnx"
    with pytest.raises(ExportError, match="aten::item") as info:
        export_pt2(DataDependent(), torch.randn(2, 3), tmp_path / "dd.pt2")
    assert "test_export.py" in info.value.op  # points at the offending line


@needs_ort
def test_check_catches_a_mismatch(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 4)
    path = export_onnx(model, x, tmp_path / "m.onnx")
    assert check_export("onnx", path, model, x)["max_error"] <= TOL
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].bias += 0.1
    with pytest.raises(ExportCheckError, match="differs from the PyTorch model") as info:
        check_export("onnx", path, other, x)
    assert info.value.error > TOL


ROW_FIELDS = {
    "model",
    "backend",
    "device",
    "batch",
    "median_ms",
    "p25_ms",
    "p75_ms",
    "iqr_ms",
    "min_ms",
    "max_ms",
    "throughput",
    "speedup",
    "cpu_median_ms",
    "cpu_speedup",
    "repeats",
    "torch_threads",
    "ort_intra_op_threads",
    "gpu",
}


@needs_ort
def test_bench_rows(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    original = small_cnn()
    _, slim = slim_of(small_cnn, x)
    buf = io.StringIO()
    rows = bench(
        {"original": original, "slim": slim},
        lambda b: torch.randn(b, 3, 16, 16),
        batch_sizes=(1, 2),
        warmup=1,
        repeats=2,
        threads=1,
        devices=["cpu"],
        out=buf,
    )
    assert len(rows) == 2 * 2 * 2  # models x batch sizes x backends
    json.dumps(rows)
    for r in rows:
        assert ROW_FIELDS <= set(r)
        assert r["repeats"] == 2 and r["torch_threads"] == 1 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["ort_intra_op_threads"] == (1 if r["backend"] == "onnxruntime" else None)
        assert r["throughput"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))
    assert all(r["speedup"] == 1.0 for r in rows if r["model"] == "original")
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in ("eager", "onnxruntime") for n in (1, 2)}
    assert "| original | eager | cpu | 1 |" in buf.getvalue() and buf.getvalue().strip() == format_table(rows)


def test_bench_eager_only_and_bad_arguments():
    m = nn.Linear(4, 2)
    rows = bench(
        {"a": m}, lambda b: torch.randn(b, 4), batch_sizes=[3], backends=["eager"], warmup=0, repeats=1, out=None
    )
    assert [(r["model"], r["backend"], r["batch"]) for r in rows] == [("a", "eager", 3)]
    with pytest.raises(ValueError, match="unknown backend"):
        bench({"a": m}, lambda b: torch.randn(b, 4), backends=["tvm"], out=None)
    with pytest.raises(ValueError, match="at least one model"):
        bench({}, lambda b: torch.randn(b, 4), out=None)


# ----- command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["transform", "bench"])
def test_cli_help(verb, capsys):
    assert main([verb, "--help"]) == 0
    assert "usage: prunekit " + verb in capsys.readouterr().out


@needs_ort
def test_cli_transform_then_bench(tmp_path, capsys):
    x = torch.randn(1, 3, 16, 16)
    model = small_cnn()
    prunekit.Pruner(model, x).prune(0.5)
    prunekit.save_sparse(model, tmp_path / "sparse")
    common = [
        "--factory",
        "prunekit.models.demo:DemoNet",
        "--kwargs",
        json.dumps(DEMO_KWARGS),
        "--input-shape",
        "3x16x16",
    ]
    rc = main(["transform", str(tmp_path / "sparse"), *common, "-o", str(tmp_path / "slim")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert all(
        (tmp_path / "slim" / f).exists()
        for f in ("model.safetensors", "spec.json", "model.pt2", "model.onnx", "export.json")
    )
    assert out.count("checked: max error") == 3

    rc = main(
        [
            "bench",
            *common,
            "--slim",
            str(tmp_path / "slim"),
            "--removal-ratio",
            "0.3",
            "--batch-sizes",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "bench.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["model"] for r in data["rows"]} == {"original", "slim-30%", "slim"}
    assert all(r["macs_ratio"] > 1 for r in data["rows"] if r["model"] != "original")
    assert "MACs per item" in out


def test_cli_transform_errors(tmp_path, capsys):
    assert main(["transform", str(tmp_path), "--factory", "prunekit.models.demo:DemoNet", "-o", str(tmp_path)]) == 2
    assert "not a sparse model directory" in capsys.readouterr().err
    assert main(["bench", "--factory", "prunekit.models.demo:DemoNet"]) == 2  # nothing to compare with
    assert main(["bench", "--factory", "no_such_module:x", "--removal-ratio", "0.5"]) == 2
    assert "cannot build the model" in capsys.readouterr().err
