"""Fault injection: ``prunekit run`` killed at random points, and every workspace artifact damaged in turn.

A run killed with SIGKILL (no clean-up at all) and started again, several times, must end with exactly the
result of an uninterrupted run: the same slim weights and the same summary. A workspace file that is
truncated or overwritten with garbage must give a one-line error that names it (and says what to do), or a
clean restart of that stage that again ends with the uninterrupted result: never a different result and
never a traceback. The default suite kills a few times and damages the files a resumed run reads;
``-m slow`` kills more often and damages every file in both ways, also while the steps are replayed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.cli.main import main
from tinyjob import trained, write_config

TESTS = Path(__file__).resolve().parents[1]  # tests/, where the shared helpers live
ROOT = TESTS.parent


@dataclass
class Job:
    """The tiny run, its config and the uninterrupted result."""

    config: Path
    reference: Path  # the workspace of the uninterrupted run
    seconds: float  # how long its work took (in this process)


def _argv(job: Job, ws: Path) -> list[str]:
    return ["run", "-c", str(job.config), "-w", str(ws), "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Job:
    tmp = tmp_path_factory.mktemp("faults")
    ckpt = tmp / "tiny.pt"
    torch.save(trained().state_dict(), ckpt)
    cfg = write_config(
        tmp, model={"checkpoint": str(ckpt)}, finetune={"epochs": 2}, run={"schedule": [0.3, 0.5], "max_drop": 0.9}
    )
    job = Job(cfg, tmp / "reference", 0.0)
    t0 = time.perf_counter()
    rc, out, err = _run_here(job, job.reference)
    job.seconds = time.perf_counter() - t0
    assert rc == 0, out + err
    return job


def _run_here(job: Job, ws: Path) -> tuple[int, str, str]:
    """``prunekit run`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(_argv(job, ws))
    return rc, out.getvalue(), err.getvalue()


def _result(ws: Path) -> tuple[dict, dict]:
    summary = json.loads((ws / "summary.json").read_text())
    keep = ("metric", "macs", "params")
    steps = [{k: a[k] for k in ("step", "try", "ratio", "accepted", *keep)} for a in summary["attempts"]]
    return {"final": {k: summary["final"][k] for k in keep}, "steps": steps}, load_file(
        ws / "final" / "model.safetensors"
    )


def _assert_same(ws: Path, ref: Path, what: str) -> None:
    got, weights = _result(ws)
    want, ref_weights = _result(ref)
    assert got == want, f"{what}: another result than the uninterrupted run:\n{got}\n{want}"
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights), (
        f"{what}: the slim weights differ from the uninterrupted run's"
    )


# ----- kills -------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _killed(job: Job, ws: Path, kills: int, seed: int) -> list[str]:
    """Start the run ``kills`` times and SIGKILL it at a random moment of its work; returns what happened."""
    rng = random.Random(seed)
    log = ws.parent / f"{ws.name}.log"
    events = []
    for i in range(kills):
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prunekit", *_argv(job, ws)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=_env(),
                cwd=ws.parent,
            )
        t0 = time.monotonic()
        while proc.poll() is None and "validation:" not in log.read_text() and time.monotonic() - t0 < 300:
            time.sleep(0.05)  # until torch is imported and the work begins
        delay = rng.uniform(0.0, 1.2 * job.seconds)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            events.append(f"kill {i + 1} after {delay:.2f} s of work")
        else:
            events.append(f"run {i + 1} finished (rc {proc.returncode}) before its kill at {delay:.2f} s")
            assert proc.returncode == 0, log.read_text()
    return events


def _kill_and_finish(job: Job, tmp_path: Path, kills: int, seed: int) -> None:
    ws = tmp_path / "killed"
    events = _killed(job, ws, kills, seed)
    proc = subprocess.run(
        [sys.executable, "-m", "prunekit", *_argv(job, ws)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same(ws, job.reference, "; ".join(events))


def test_run_killed_at_random_points_ends_as_if_never_killed(job, tmp_path):
    _kill_and_finish(job, tmp_path, kills=2, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_run_killed_many_times(job, tmp_path, seed):
    _kill_and_finish(job, tmp_path, kills=8, seed=seed)


# ----- damaged files -----------------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # garbage of the same length
        path.write_bytes(random.Random(len(data)).randbytes(max(len(data), 16)))


def _artifacts(ws: Path) -> list[str]:
    return sorted(
        str(p.relative_to(ws))
        for p in ws.rglob("*")
        if p.is_file() and p.name != "report.html" and "previous" not in p.parts
    )


def _check_damaged(job: Job, tmp_path: Path, name: str, how: str, replay: bool) -> None:
    """Damage ``name`` in a copy of the finished workspace (``replay``: without iterative.json, so every step
    is replayed from its files) and run again: a one-line error naming the file, or the reference result."""
    ws = tmp_path / "ws"
    shutil.copytree(job.reference, ws)
    if replay:
        (ws / "iterative.json").unlink()
    _damage(ws / name, how)
    rc, out, err = _run_here(job, ws)
    what = f"{name} {how}{' (steps replayed)' if replay else ''}"
    if rc == 0:
        _assert_same(ws, job.reference, what)
        return
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("prunekit run: error: "), f"{what}: rc {rc}\n{err}"
    assert str(ws / name) in lines[0], f"{what}: the error does not name the file: {lines[0]}"
    fix = re.search(r"\); delete (it|\S+) and run", lines[0])
    assert fix, f"{what}: the error does not say what to do: {lines[0]}"
    target = ws / name if fix.group(1) == "it" else Path(fix.group(1))
    target.unlink()  # do what it says: then the run must end as if nothing had happened
    rc, out, err = _run_here(job, ws)
    assert rc == 0, f"{what}: following the fix ({lines[0]}) did not help:\n{err}"
    _assert_same(ws, job.reference, f"{what}, after the fix")


#: the files a resumed run reads (the default suite); the slow tests damage every file
READ_ON_RESUME = [
    "iterative.json",
    "ana.json",
    "steps/step2-try0/model/model.safetensors",
    "steps/step2-try0/model/plan.json",
]
READ_ON_REPLAY = ["steps/step1-try0/finetune/checkpoint.pt", "steps/step1-try0/finetune/best.pt"]


@pytest.mark.parametrize("name", READ_ON_RESUME)
def test_a_damaged_file_is_an_error_or_a_clean_restart(job, tmp_path, name):
    _check_damaged(job, tmp_path, name, "truncate", replay=False)


@pytest.mark.parametrize("name", READ_ON_REPLAY)
def test_a_damaged_checkpoint_is_an_error_or_a_clean_restart(job, tmp_path, name):
    _check_damaged(job, tmp_path, name, "truncate", replay=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "garbage"])
@pytest.mark.parametrize("replay", [False, True])
def test_every_damaged_file(job, tmp_path, how, replay):
    for i, name in enumerate(_artifacts(job.reference)):
        if replay and name == "iterative.json":
            continue
        _check_damaged(job, tmp_path / str(i), name, how, replay)
