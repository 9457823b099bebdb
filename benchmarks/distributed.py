"""ana wall time on 1 vs 2 processes (``torchrun``, gloo on CPU), measured in one run.

Model: torchvision ``resnet18(num_classes=10)`` (random weights, seed 0; 12 prunable channel
groups), metric: cross-entropy on 4 fixed batches of 32 random 3x32x32 images, ratios
0.1..0.9 with ``collapse=None``: 108 points, every one evaluated. Both settings are launched
the same way (``python -m torch.distributed.run --nproc_per_node N``, ``OMP_NUM_THREADS=1``)
and alternate (1, 2, 1, 2, ...) so that a change of machine load hits both. Each launch
reports the time of the ``ana`` call itself (rank 0, from a barrier to the merged result) and
the wall time of the whole launch (interpreter start, imports, tracing included). The two
sensitivity tables are checked to be the same. Results: ``benchmarks/results/distributed.json``.

Usage:
    python benchmarks/distributed.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distributed.json"
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def worker(workspace: str, out: str) -> None:
    import torch
    import torchvision

    from prunekit.workflow import distributed
    from prunekit.workflow.ana import ana
    from prunekit.workflow.evaluation import make_eval_fn

    distributed.init_if_needed()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(4)]
    eval_fn = make_eval_fn(batches, "loss")
    distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    sens = ana(
        model,
        torch.randn(1, 3, 32, 32),
        eval_fn,
        workspace=workspace,
        ratios=RATIOS,
        collapse=None,
        lower_is_better=True,
        progress=False,
        log=lambda m: None,
    )
    seconds = time.perf_counter() - t0
    cpu = [0.0] * distributed.world_size()
    cpu[distributed.rank()] = time.process_time() - c0
    cpu = distributed.all_reduce_sum(cpu)  # every rank's CPU seconds in ana
    if distributed.is_main():
        Path(out).write_text(
            json.dumps(
                {
                    "ana_seconds": seconds,
                    "cpu_seconds_per_rank": cpu,
                    "points": sum(len(c) for c in sens.curves.values()),
                    "world_size": distributed.world_size(),
                    "sensitivity": sens.to_dict(),
                }
            )
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, tmp: Path, tag: str) -> dict:
    out = tmp / f"{tag}.json"
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
        __file__,
        "worker",
        str(tmp / f"ws-{tag}"),
        str(out),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    return {**json.loads(out.read_text()), "launch_seconds": wall}


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="launches of each setting, alternating")
    args = ap.parse_args()
    import torch

    runs: dict[int, list[dict]] = {1: [], 2: []}
    load_before = _load()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i in range(args.repeat):
            for n in (1, 2):
                r = launch(n, tmp, f"n{n}-{i}")
                print(
                    f"{n} process(es): ana {r['ana_seconds']:.1f} s, launch {r['launch_seconds']:.1f} s, "
                    f"CPU s per rank {[round(c, 1) for c in r['cpu_seconds_per_rank']]}, {r['points']} points",
                    flush=True,
                )
                runs[n].append(r)
    load_after = _load()
    ref = runs[1][0]["sensitivity"]
    same = all(r["sensitivity"]["curves"] == ref["curves"] for rs in runs.values() for r in rs)
    med = {n: statistics.median(r["ana_seconds"] for r in rs) for n, rs in runs.items()}
    med_launch = {n: statistics.median(r["launch_seconds"] for r in rs) for n, rs in runs.items()}
    result = {
        "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "points": runs[1][0]["points"],
        "same_sensitivity_tables": same,
        "ana_seconds": {n: [round(r["ana_seconds"], 2) for r in rs] for n, rs in runs.items()},
        "launch_seconds": {n: [round(r["launch_seconds"], 2) for r in rs] for n, rs in runs.items()},
        "cpu_seconds_per_rank": {
            n: [[round(c, 2) for c in r["cpu_seconds_per_rank"]] for r in rs] for n, rs in runs.items()
        },
        "median_ana_seconds": {n: round(v, 2) for n, v in med.items()},
        "speedup_ana": round(med[1] / med[2], 2),
        "speedup_launch": round(med_launch[1] / med_launch[2], 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
