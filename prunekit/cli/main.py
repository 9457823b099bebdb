"""The ``prunekit`` command line.

Usage::

    prunekit --version
    prunekit demo                          # the whole workflow on a small CNN and the digits
    prunekit ana -c config.yaml            # sensitivity analysis
    prunekit prune -c config.yaml --removal-ratio 0.5
    prunekit finetune -c config.yaml       # fine-tune the pruned sparse model
    prunekit run -c config.yaml            # ana -> (prune -> finetune) x steps -> slim
    prunekit report WORKSPACE              # HTML report + terminal summary

The workflow verbs live in :mod:`prunekit.cli.verbs`, the demo in :mod:`prunekit.cli.demo`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


# ----- the workflow verbs (prunekit.cli.verbs) and the demo (prunekit.cli.demo) ----------------
def _register_workflow(sub: argparse._SubParsersAction) -> None:
    from prunekit.cli import demo, verbs

    verbs.register(sub)
    demo.register(sub)


# ----- the deployment verbs: transform and bench (prunekit.cli.deploy) ---------------------
def _register_deploy(sub: argparse._SubParsersAction) -> None:
    from prunekit.cli import deploy

    deploy.register(sub)


# ----- entry point -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit", description="Channel pruning for PyTorch models: sparse -> slim.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _register_workflow(sub)
    _register_deploy(sub)
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
    try:
        return args.func(args, sys.stdout)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return exc.code if isinstance(exc.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
