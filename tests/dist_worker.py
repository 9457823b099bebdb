"""Run by tests/workflow/test_distributed.py under ``python -m torch.distributed.run --nproc_per_node 2``.

``python dist_worker.py finetune SPARSE_DIR WORKSPACE OUT``: fine-tune the sparse model of
SPARSE_DIR (save_sparse) in WORKSPACE with DDP, then check the unwrap -> transform -> re-wrap
helper by training the slim model on; every rank writes what it holds to OUT/rank<r>.pt.

Also the config-named pieces of the CLI tests: :func:`dying_accuracy` (a metric that makes
one rank exit in the middle of ana).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

EPOCHS = 3


def finetune_config():
    from prunekit.workflow.finetune import FinetuneConfig

    return FinetuneConfig(epochs=EPOCHS, lr=0.05, progress=False)


def eval_fn():
    """Accuracy on tinyjob's eval data (4 batches), split over the ranks when run together."""
    from prunekit.workflow import distributed
    from prunekit.workflow.evaluation import make_eval_fn
    from tinyjob import loaders

    _, evald = loaders(n_eval=64)
    batches = [(x[i : i + 16], y[i : i + 16]) for x, y in evald for i in range(0, len(x), 16)]
    return distributed.shard_eval_fn(batches, lambda b: make_eval_fn(b, "accuracy"))


def run_finetune(sparse_dir: str, workspace: str, out: str, log=print) -> dict:
    import prunekit
    from prunekit.workflow import distributed
    from prunekit.workflow.finetune import finetune
    from tinyjob import TinyNet, loaders

    model = prunekit.load_sparse(TinyNet(), sparse_dir)
    train, _ = loaders()
    res = finetune(model, train, eval_fn(), finetune_config(), workspace=workspace, log=log)
    rank = distributed.rank()
    record = {
        "world_size": distributed.world_size(),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "history": res.history,
        "best_metric": res.best_metric,
        "resumed_from": res.resumed_from,
        "plan": prunekit.get_plan(model).to_dict(),
    }
    if distributed.active():
        record["after_transform"] = _train_on_after_transform(model)
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(record, Path(out) / f"rank{rank}.pt")
    return record


def _train_on_after_transform(model) -> dict:
    """Wrap, train a step, transform inside the wrapper, train on: the ranks must stay equal."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from prunekit.workflow import distributed

    g = torch.Generator().manual_seed(100 + distributed.rank())  # other data on every rank
    batch = lambda: (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))  # noqa: E731
    net = distributed.wrap_ddp(model.train())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(2):
        x, y = batch()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    sparse_state = {k: v.clone() for k, v in distributed.unwrap(net).state_dict().items()}
    net = distributed.transform_ddp(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)  # the old optimizer's parameters are gone
    for _ in range(3):
        x, y = batch()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    inner = distributed.unwrap(net)
    distributed.sync_buffers(inner)
    return {
        "wrapped": isinstance(net, DDP),
        "sparse_state": sparse_state,
        "slim_shapes": {k: list(v.shape) for k, v in inner.state_dict().items()},
        "slim_state": {k: v.clone() for k, v in inner.state_dict().items()},
    }


_CALLS = {"n": 0}


def dying_accuracy(output, target):
    """Top-1 accuracy; the rank named by PRUNEKIT_TEST_DIE_RANK exits after PRUNEKIT_TEST_DIE_AFTER calls."""
    _CALLS["n"] += 1
    if os.environ.get("RANK") == os.environ.get("PRUNEKIT_TEST_DIE_RANK", "-1") and _CALLS["n"] > int(
        os.environ.get("PRUNEKIT_TEST_DIE_AFTER", "0")
    ):
        os._exit(17)  # like a killed process: no clean-up, no exception
    return (output.argmax(1) == target).double().mean()


if __name__ == "__main__":
    if sys.argv[1] == "finetune":
        run_finetune(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown scenario {sys.argv[1]!r}")
