"""The ``prunekit`` command line.

Usage::

    prunekit --version
    prunekit demo                          # the whole workflow on a small CNN and the digits
    prunekit ana -c config.yaml            # sensitivity analysis
    prunekit groups -c config.yaml         # dry run: the channel groups, what is prunable and why not
    prunekit prune -c config.yaml --removal-ratio 0.5
    prunekit finetune -c config.yaml       # fine-tune the pruned sparse model
    prunekit run -c config.yaml            # ana -> (prune -> finetune) x steps -> slim
    prunekit report WORKSPACE              # HTML report + terminal summary

The workflow verbs live in :mod:`prunekit.cli.verbs`, the demo in :mod:`prunekit.cli.demo`, the
deployment verbs in :mod:`prunekit.cli.deploy`. Every verb goes through one error guard
(:func:`prunekit.cli.errors.guard`): a problem the user can fix is one line on stderr,
``prunekit <verb>: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _version() -> str:
    from prunekit import __version__

    return __version__


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
    parser = argparse.ArgumentParser(prog="prunekit", description="Channel pruning for PyTorch models: sparse -> slim.")
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
    return args.func(args, sys.stdout)  # every verb is wrapped by prunekit.cli.errors.guard: errors are one line


if __name__ == "__main__":
    sys.exit(main())
