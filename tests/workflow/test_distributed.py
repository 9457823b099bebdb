"""torch.distributed: 2 CPU processes with gloo, launched by ``python -m torch.distributed.run``.

Fine-tuning under DDP (same masks and weights on every rank, metric close to one process,
resumed from a one-process checkpoint), ``prunekit run`` under torchrun (ana split over the
ranks gives the one-process table), a rank that dies in the middle of ana and the resume,
and the helpers that need no process group.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
import tinyjob
from prunekit.cli.main import main
from prunekit.workflow import distributed
from prunekit.workflow.evaluation import make_eval_fn
from tinyjob import TinyNet, loaders, trained

TESTS = Path(__file__).resolve().parents[1]  # tests/, where the shared helpers live
TIMEOUT = 240  # seconds per launch; a launch takes ~20 s on 2 busy cores


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], tmp_path: Path, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc ARGS`` on a free local port (a second
    try on another port if the first one was taken in between)."""
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        "PRUNEKIT_DIST_TIMEOUT": "180",
        **(env or {}),
    }
    for attempt in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--nnodes",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            *args,
        ]
        try:
            proc = subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"torchrun did not finish in {TIMEOUT} s: {cmd}\n{(exc.stderr or b'')[-3000:]!r}")
        if proc.returncode == 0 or not re.search(r"address already in use|EADDRINUSE", proc.stderr, re.I) or attempt:
            return proc
    return proc


def _tail(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


def write_config(tmp_path: Path, checkpoint: Path, **sections) -> Path:
    return tinyjob.write_config(
        tmp_path, **{"model": {"checkpoint": str(checkpoint)}, "run": {"max_drop": 0.5}, **sections}
    )


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(trained().state_dict(), path)
    return path


def pruned_slices(model) -> list[tuple[str, torch.Tensor]]:
    plan = prunekit.get_plan(model)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return [
        (n, tensors[n].detach().index_select(d, torch.tensor(idx)))
        for n, dims in plan.pruned.items()
        for d, idx in dims.items()
    ]


# ----- fine-tuning -----------------------------------------------------------------------------
def test_finetune_on_two_processes_resumes_a_one_process_run(tmp_path):
    """1-process run killed after epoch 1 -> resumed on 2 processes (DDP): both ranks hold the same
    weights and masks, the metric is close to an uninterrupted 1-process run; then the unwrap ->
    transform -> re-wrap helper keeps the ranks equal while the slim model trains on."""
    import dist_worker

    model = trained()
    prunekit.Pruner(model, torch.randn(1, 1, 8, 8)).prune(0.4)
    prunekit.save_sparse(model, tmp_path / "sparse")
    plan = prunekit.get_plan(model).to_dict()
    ref = dist_worker.run_finetune(
        str(tmp_path / "sparse"), str(tmp_path / "ws1"), str(tmp_path / "out1"), log=lambda m: None
    )

    class Kill(Exception):
        pass

    calls = {"n": 0}
    inner = dist_worker.eval_fn()

    def dying(m):  # call 0: the start, 1: epoch 1, 2: epoch 2 -> killed while evaluating epoch 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise Kill
        return inner(m)

    from prunekit.workflow.finetune import finetune

    with pytest.raises(Kill):
        finetune(
            prunekit.load_sparse(TinyNet(), tmp_path / "sparse"),
            loaders()[0],
            dying,
            dist_worker.finetune_config(),
            workspace=tmp_path / "ws2",
            log=lambda m: None,
        )
    proc = torchrun(
        [
            str(TESTS / "dist_worker.py"),
            "finetune",
            str(tmp_path / "sparse"),
            str(tmp_path / "ws2"),
            str(tmp_path / "out2"),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, _tail(proc)
    r0, r1 = (torch.load(tmp_path / "out2" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["resumed_from"] == r1["resumed_from"] == 1, "the 2-process run did not resume the 1-process checkpoint"
    same = lambda d: json.loads(json.dumps(d))  # noqa: E731  (group ids: int keys -> str, as in plan.json)
    assert same(r0["plan"]) == same(r1["plan"]) == same(plan), "the masks changed or differ between the ranks"
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), f"{k} differs between rank 0 and rank 1 after DDP fine-tuning"
    for name, sl in pruned_slices(prunekit.apply_plan(_load_state(r0["state"]), prunekit.PruningPlan.from_dict(plan))):
        want = 1.0 if name.endswith("running_var") else 0.0
        assert torch.all(sl == want), f"{name}: a pruned slice moved during DDP training"
    assert r0["best_metric"] == r1["best_metric"], "the ranks disagree on the metric"
    drop_time = lambda h: {k: v for k, v in h.items() if k != "seconds"}  # noqa: E731
    assert len(r0["history"]) == 3 and drop_time(r0["history"][0]) == drop_time(ref["history"][0]), (
        "epoch 1 should come from the 1-process checkpoint"
    )
    assert abs(r0["best_metric"] - ref["best_metric"]) <= 0.1, (r0["history"], ref["history"])
    for a, b in zip(r0["history"][1:], ref["history"][1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.15), (r0["history"], ref["history"])
    # the checkpoint (written by rank 0 only) is a plain state dict: resumable anywhere
    ckpt = torch.load(tmp_path / "ws2" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])
    # the gradients DDP averaged were zero on the pruned slices: so is SGD's momentum there
    names = [n for n, _ in TinyNet().named_parameters()]
    moments = {names[i]: s["momentum_buffer"] for i, s in ckpt["trainer"]["optimizer"]["state"].items()}
    for n, dims in plan["pruned"].items():
        for d, idx in dims.items():
            if n in moments:
                assert not moments[n].index_select(int(d), torch.tensor(idx)).any(), f"{n}: gradient leaked"

    a0, a1 = r0["after_transform"], r1["after_transform"]
    assert a0["wrapped"] and a1["wrapped"], "transform_ddp did not wrap the slim model again"
    assert a0["slim_shapes"]["conv3.weight"][0] < 16, "the model inside the new wrapper is not slim"
    for k, v in a0["slim_state"].items():
        assert torch.equal(v, a1["slim_state"][k]), f"{k} differs between the ranks after training the slim model"
    assert not torch.equal(a0["slim_state"]["fc.weight"], _slim_of(a0["sparse_state"], plan)["fc.weight"]), (
        "the slim model did not train after the transform"
    )


def _load_state(state: dict) -> TinyNet:
    m = TinyNet()
    m.load_state_dict(state)
    return m


def _slim_of(state: dict, plan: dict) -> dict:
    return prunekit.to_slim(prunekit.apply_plan(_load_state(state), prunekit.PruningPlan.from_dict(plan))).state_dict()


# ----- the CLI under torchrun: run (ana split over the ranks) ----------------------------------
def _points(ws: Path) -> dict:
    return json.loads((ws / "ana.json").read_text())["points"]


def test_run_under_torchrun_matches_one_process(tmp_path, checkpoint, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    cfg = write_config(ref, checkpoint)
    assert main(["run", "-c", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    want = json.loads((ref / "ws" / "sensitivity.json").read_text())
    want_final = json.loads((ref / "ws" / "summary.json").read_text())["final"]

    cfg = write_config(tmp_path, checkpoint)
    proc = torchrun(["-m", "prunekit", "run", "-c", str(cfg), "--no-progress"], tmp_path)
    assert proc.returncode == 0, _tail(proc)
    ws = tmp_path / "ws"
    got = json.loads((ws / "sensitivity.json").read_text())
    assert got["baseline"] == pytest.approx(want["baseline"], abs=1e-6)
    assert set(got["curves"]) == set(want["curves"]) and len(got["curves"]) == 2
    for g, curve in want["curves"].items():
        assert got["curves"][g] == pytest.approx(curve, abs=1e-6), f"group {g}: 2-process ana differs"
    assert {p.name for p in ws.glob("ana.rank*.json")} == {"ana.rank0.json", "ana.rank1.json"}
    assert len(_points(ws)) == 4, "rank 0 did not merge both ranks' points"
    assert proc.stdout.count("step 1: prune") == 1 and proc.stdout.count("slim model in") == 1, (
        "only rank 0 should print: " + _tail(proc)
    )
    final = json.loads((ws / "summary.json").read_text())["final"]
    assert final["step"] == want_final["step"], (final, want_final, _tail(proc))
    assert final["macs_reduction"] == pytest.approx(want_final["macs_reduction"], abs=0.03), (final, want_final)
    assert final["metric"] == pytest.approx(want_final["metric"], abs=0.1), (final, want_final)
    assert final["equivalence_error"] <= 1e-4
    slim = prunekit.load_slim(TinyNet(), ws / "final").eval()
    assert slim(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert not list(ws.rglob("*.tmp")), "a temp file was left behind"


# ----- a rank dies in the middle of ana ------------------------------------------------------
def test_rank_that_dies_in_ana_loses_only_its_unfinished_points(tmp_path, checkpoint, capsys):
    import dist_worker

    # the full analysis: one metric call per point is what the dying metric counts (the fast one batches them)
    cfg = write_config(
        tmp_path,
        checkpoint,
        metric="dist_worker:dying_accuracy",
        ana={"ratios": [0.2, 0.4, 0.6], "collapse": None, "fast": False},
    )
    proc = torchrun(
        ["-m", "prunekit", "ana", "-c", str(cfg), "--no-progress"],
        tmp_path,
        env={"PRUNEKIT_TEST_DIE_RANK": "1", "PRUNEKIT_TEST_DIE_AFTER": "1"},
    )
    assert proc.returncode != 0, "rank 1 should have died: " + _tail(proc)
    ws = tmp_path / "ws"
    rank1 = json.loads((ws / "ana.rank1.json").read_text())
    assert len(rank1["points"]) == 1, f"rank 1 should have saved exactly its first point: {rank1['points']}"
    saved = dict(rank1["points"])
    if (ws / "ana.rank0.json").exists():
        saved.update(json.loads((ws / "ana.rank0.json").read_text())["points"])

    dist_worker._CALLS["n"] = 0  # resume on one process (no RANK variable: nobody dies)
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"reusing (\d+) analysed points", out)
    assert m and int(m.group(1)) == len(saved), out
    points = _points(ws)
    assert len(points) == 6 and all(points[k] == v for k, v in saved.items()), points
    assert dist_worker._CALLS["n"] == 6 - len(saved), "a saved point was evaluated again"

    ref = tmp_path / "ref"
    ref.mkdir()
    assert (
        main(
            [
                "ana",
                "-c",
                str(write_config(ref, checkpoint, ana={"ratios": [0.2, 0.4, 0.6], "collapse": None, "fast": False})),
                "--no-progress",
            ]
        )
        == 0
    )
    assert _points(ws) == pytest.approx(_points(ref / "ws"), abs=1e-6)


# ----- helpers without a process group --------------------------------------------------------
def test_helpers_are_no_ops_on_one_process():
    assert not distributed.init_if_needed() and not distributed.active() and distributed.is_main()
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5] and distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    m = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(m) is m and distributed.unwrap(m) is m
    assert distributed.shard_loader([1, 2, 3]) == [1, 2, 3]
    _, evald = loaders()
    plain, sharded = make_eval_fn(evald), distributed.shard_eval_fn(evald, lambda b: make_eval_fn(b))
    net = trained()
    assert sharded(net) == plain(net) and sharded.collective and sharded.lower_is_better is False


def test_sharded_loader_splits_the_data_and_keeps_the_global_batch():
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(torch.arange(20).float(), torch.arange(20))
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    shards = [distributed.ShardedLoader(loader, seed=3, num_replicas=2, rank_=r) for r in (0, 1)]
    assert [len(s) for s in shards] == [len(loader)] * 2, "the steps per epoch must not change"
    seen = [torch.cat([y for _, y in s]).tolist() for s in shards]
    assert all(len(b[1]) == 2 for s in shards for b in s), "each rank gets half of every batch"
    assert sorted(seen[0] + seen[1]) == list(range(20)), "the ranks together must see every sample once"
    shards[0].set_epoch(1)
    assert torch.cat([y for _, y in shards[0]]).tolist() != seen[0], "set_epoch should reshuffle"
    batches = [(torch.zeros(1), torch.tensor([i])) for i in range(7)]
    parts = [list(distributed.ShardedLoader(batches, num_replicas=2, rank_=r)) for r in (0, 1)]
    assert [len(p) for p in parts] == [3, 3], "a list of batches: equal counts per rank"
    with pytest.raises(ValueError, match="needs a len"):
        distributed.ShardedLoader(iter(batches), num_replicas=2, rank_=0)


def test_transform_helper_on_one_process():
    model = trained()
    prunekit.Pruner(model, torch.randn(1, 1, 8, 8)).prune(0.5)
    slim = distributed.transform_ddp(model)
    assert slim.conv3.out_channels < 16 and not isinstance(slim, torch.nn.parallel.DistributedDataParallel)
    x = torch.randn(3, 1, 8, 8)
    assert prunekit.max_error(model.eval()(x), slim.eval()(x)) <= 1e-4
