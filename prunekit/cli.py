"""The ``prunekit`` command line.

Only ``prunekit demo`` exists so far: it prunes a small built-in ResNet-style CNN and
prints what changed. Usage::

    prunekit --version
    prunekit demo                      # digits (8x8) if scikit-learn is installed, else random data
    prunekit demo --data random --image-size 3x32x32 --ratio 0.3
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

__all__ = ["main", "build_parser"]


def _version() -> str:
    from prunekit import __version__

    return __version__


# ----- formatting ------------------------------------------------------------------------
def _human(n: float) -> str:
    """``1234567 -> '1.23 M'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], align: str | None = None) -> str:
    """Plain-text table; ``align`` has one ``l`` or ``r`` per column (default: ``l`` then ``r``)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths).rstrip(), *(line(r) for r in rows)])


def _pct_change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else ""


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _group_label(group) -> str:
    """``'stage2.0.conv2 (+7 more)'``: the first layer producing the group's channels, if any."""
    modules = list(dict.fromkeys(m.module for m in group.members if m.name.endswith("weight")))
    producers = [m.module for m in group.members if m.name.endswith("weight") and m.dim == 0]
    if not modules:
        return "-"
    first = producers[0] if producers else modules[0]
    return first + (f" (+{len(modules) - 1} more)" if len(modules) > 1 else "")


# ----- demo ------------------------------------------------------------------------------
@dataclass
class _Data:
    name: str
    x_train: object  # torch.Tensor; typed loosely so importing the CLI does not import torch
    y_train: object
    x_test: object
    y_test: object

    @property
    def labelled(self) -> bool:
        return self.y_test is not None


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 1x8x8 or 3x32x32, got {text!r}") from None
    if min(c, h, w) < 1 or min(h, w) < 2:
        raise argparse.ArgumentTypeError(f"image size must have C >= 1 and H, W >= 2, got {text!r}")
    return c, h, w


def _have_sklearn() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def _load_data(kind: str, shape: tuple[int, int, int] | None, seed: int) -> _Data:
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

        if shape not in (None, (1, 8, 8)):
            raise SystemExit("prunekit demo: --image-size applies to --data random only (digits are 1x8x8)")
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - x.mean()) / x.std()
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=g)
        n_test = len(x) // 5
        te, tr = perm[:n_test], perm[n_test:]
        return _Data("digits", x[tr], y[tr], x[te], y[te])
    c, h, w = shape or (1, 8, 8)
    return _Data(f"random {c}x{h}x{w}", None, None, torch.randn(64, c, h, w, generator=g), None)


def _accuracy(model, data: _Data) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = model(data.x_test).argmax(1)
    return float((pred == data.y_test).float().mean())


def _train(model, data: _Data, epochs: int, seed: int, lr: float = 3e-3, batch: int = 64) -> None:
    import torch
    import torch.nn.functional as F

    if epochs <= 0 or not data.labelled:
        return
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(data.x_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    import torch

    if not 0.0 <= args.ratio < 1.0:
        print(f"prunekit demo: --ratio must be in [0, 1), got {args.ratio}", file=sys.stderr)
        return 2
    kind = args.data
    if kind == "auto":
        kind = "digits" if _have_sklearn() else "random"
        if kind == "random":
            print("note: scikit-learn is not installed, so the demo runs on random inputs without "
                  "accuracy numbers (pip install 'prunekit[demo]' for the digits data set)", file=out)
    elif kind == "digits" and not _have_sklearn():
        print("prunekit demo: --data digits needs scikit-learn (pip install 'prunekit[demo]')", file=sys.stderr)
        return 2

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args, kind, out)
    finally:
        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace, kind: str, out: TextIO) -> int:
    import torch

    import prunekit
    from prunekit.demo_model import DemoNet, randomize_batchnorm
    from prunekit.pruner import ABS_TOL, REL_TOL

    torch.manual_seed(args.seed)
    data = _load_data(kind, args.image_size, args.seed)
    model = DemoNet(in_channels=data.x_test.shape[1], num_classes=10, width=args.width, blocks=args.blocks)
    t0 = time.perf_counter()
    if data.labelled:
        _train(model, data, args.epochs, args.seed)
    else:  # untrained weights: make BatchNorm non-trivial so the equivalence check means something
        randomize_batchnorm(model, torch.Generator().manual_seed(args.seed))
    model.eval()
    train_s = time.perf_counter() - t0

    one = data.x_test[:1]  # MACs per image
    before = prunekit.count(model, one)
    acc_before = _accuracy(model, data) if data.labelled else None

    # the prunekit workflow: groups -> plan -> sparse model (in place) -> slim model
    pruner = prunekit.Pruner(model, data.x_test[:8], criterion=args.criterion)
    widths = {g.id: g.n_units for g in pruner.groups}
    plan = pruner.plan(args.ratio)
    pruner.prune(plan)
    t1 = time.perf_counter()
    slim = pruner.transform(check=False)  # checked below, on every evaluation input
    transform_s = time.perf_counter() - t1
    after = prunekit.count(slim, one)

    with torch.no_grad():
        sparse_out = model(data.x_test)
        slim_out = slim(data.x_test)
    diff = float((slim_out.double() - sparse_out.double()).abs().max())
    bound = ABS_TOL + REL_TOL * float(sparse_out.double().abs().max())
    equivalent = diff <= bound
    acc_sparse = _accuracy(model, data) if data.labelled else None
    acc_slim = _accuracy(slim, data) if data.labelled else None
    acc_tuned, tune_s = None, 0.0
    if data.labelled and args.finetune_epochs > 0:
        t2 = time.perf_counter()
        _train(slim, data, args.finetune_epochs, args.seed + 1)
        acc_tuned, tune_s = _accuracy(slim, data), time.perf_counter() - t2

    print(f"prunekit {_version()} demo: DemoNet(width={args.width}, blocks={args.blocks}) on {data.name}; "
          f"remove {args.ratio:.0%} of the channels of every prunable group (criterion {args.criterion})", file=out)
    if data.labelled:
        print(f"trained {args.epochs} epochs on {len(data.x_train)} images in {train_s:.1f} s, "
              f"tested on {len(data.x_test)} images", file=out)
    print(file=out)
    rows = [["MACs / image", _human(before.macs), _human(after.macs), _pct_change(before.macs, after.macs)],
            ["parameters", _human(before.params), _human(after.params), _pct_change(before.params, after.params)]]
    if data.labelled:
        rows.append(["test accuracy", f"{acc_before:.1%}", f"{acc_slim:.1%}", ""])
        if acc_tuned is not None:
            rows.append([f"  after {args.finetune_epochs} fine-tuning epochs", "", f"{acc_tuned:.1%}", ""])
    print(_table(rows, ["", "original", "slim", "change"]), file=out)

    print(file=out)
    print(f"{len(pruner.groups)} channel groups, {len(pruner.prunable_groups)} prunable, "
          f"found in {pruner.build_seconds:.2f} s", file=out)
    grows = []
    for g in pruner.groups:
        kept = widths[g.id] - len(plan.meta["groups"].get(g.id, []))
        note = "" if g.prunable else "kept: " + _shorten(g.reasons[0] if g.reasons else "not prunable", 60)
        grows.append([str(g.id), _group_label(g), str(widths[g.id]), str(kept), note])
    print(_table(grows, ["group", "layers", "channels", "kept", ""], align="llrrl"), file=out)
    for w in pruner.warnings:
        print(f"warning: {w}", file=out)

    print(file=out)
    print(f"slim vs sparse on {len(data.x_test)} inputs: max |slim - sparse| = {diff:.2e}, "
          f"bound {ABS_TOL:g} + {REL_TOL:g} * max|sparse| = {bound:.2e}: {'OK' if equivalent else 'FAILED'}",
          file=out)
    if data.labelled:
        print(f"accuracy of the sparse model {acc_sparse:.1%}, of the slim model {acc_slim:.1%}", file=out)
    timing = f"sparse -> slim in {transform_s:.2f} s"
    if acc_tuned is not None:
        timing += f"; fine-tuning took {tune_s:.1f} s"
    print(timing, file=out)

    if args.output:
        path = prunekit.save_slim(slim, args.output)
        print(f"slim model saved to {path} (model.safetensors + spec.json); load it with "
              f"prunekit.load_slim(DemoNet(in_channels={data.x_test.shape[1]}, width={args.width}, "
              f"blocks={args.blocks}), {str(path)!r})", file=out)
    if not equivalent:
        print("prunekit demo: the slim model does not compute what the sparse model computes", file=sys.stderr)
        return 1
    return 0


# ----- entry point -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit", description="Channel pruning for PyTorch models: sparse -> slim.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="prune a small built-in ResNet-style CNN and show what changed",
        description="Train a small ResNet-style CNN (on the scikit-learn digits if installed), prune "
                    "every channel group, turn the sparse model into a slim one and compare them.")
    demo.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to remove per group (0.5)")
    demo.add_argument("--data", choices=["auto", "digits", "random"], default="auto",
                      help="digits (8x8, needs scikit-learn), random inputs, or auto (digits if available)")
    demo.add_argument("--image-size", type=_parse_shape, default=None, metavar="CxHxW",
                      help="input shape for --data random (default 1x8x8), e.g. 3x32x32")
    demo.add_argument("--width", type=int, default=16, help="channels of the first stage (16)")
    demo.add_argument("--blocks", type=int, default=2, help="residual blocks per stage (2)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs before pruning (digits only, 8)")
    demo.add_argument("--finetune-epochs", type=int, default=4,
                      help="fine-tuning epochs of the slim model (digits only, 4; 0 to skip)")
    demo.add_argument("--criterion", default="l2", help="importance criterion (l1, l2, fpgm, bn_scale, random)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (1: the model is so small that more threads mostly add overhead)")
    demo.add_argument("--output", metavar="DIR", default=None, help="save the slim model into DIR")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 1
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        from prunekit.criteria import CRITERIA

        if args.criterion not in CRITERIA or CRITERIA[args.criterion].needs_grads:
            usable = sorted(n for n, c in CRITERIA.items() if not c.needs_grads)
            print(f"prunekit demo: unknown or unsupported criterion {args.criterion!r}; choose one of {usable}",
                  file=sys.stderr)
            return 2
    try:
        return args.func(args, sys.stdout)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return exc.code if isinstance(exc.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
