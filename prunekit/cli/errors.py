"""One error guard for every verb of the ``prunekit`` command.

:func:`guard` wraps a verb's ``cmd_<verb>(args, out) -> int``: a known error (a config or flag
problem, a damaged file, an unusable device, a model that validation or the slim == sparse check
refuses, a failed export) becomes one line on stderr, ``prunekit <verb>: error: ...``, and exit
status 2; Ctrl-C is status 130 with how to resume. Anything else is a bug and keeps its traceback
(as do known errors with ``PRUNEKIT_DEBUG=1``). Under ``torchrun`` it also starts the process
group for the verbs that run distributed and leaves the others to rank 0; ``--threads`` is
applied and restored around the verb.

Example:
    >>> @guard("hello")
    ... def cmd_hello(args, out):
    ...     raise CliError("say what to greet: --name NAME")
    >>> import argparse, sys
    >>> cmd_hello(argparse.Namespace(), sys.stdout)  # prints: prunekit hello: error: say what to greet: ...
    2
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from prunekit.utils.files import ArtifactError
from prunekit.workflow.options import ConfigError

__all__ = ["guard", "CliError", "known_errors", "use_workspace", "one_line"]

Verb = Callable[[argparse.Namespace, TextIO], int]

#: the workspace the running verb works in: a damaged file inside it gets the workspace's own fix
_WORKSPACE: contextvars.ContextVar = contextvars.ContextVar("prunekit_cli_workspace", default=None)


class CliError(ConfigError):
    """A problem with the command line or what it names; the message says what to change."""


def known_errors() -> tuple[type[BaseException], ...]:
    """The exceptions :func:`guard` turns into one line: every user-fixable error of prunekit."""
    from prunekit.engine.equivalence import EquivalenceError

    found: list[type[BaseException]] = [
        ValueError,
        EquivalenceError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ]
    try:
        from prunekit.deploy.export import ExportError

        found.append(ExportError)
    except ImportError:  # pragma: no cover  (deploy extras missing: nothing can raise it)
        pass
    return tuple(found)


def use_workspace(ws) -> None:
    """Tell the guard the running verb's workspace (:class:`~prunekit.workflow.workspace.Workspace`)."""
    _WORKSPACE.set(ws)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; a damaged workspace file gets the workspace's fix for it."""
    ws = _WORKSPACE.get()
    if isinstance(exc, ArtifactError) and ws is not None and exc.path is not None:
        try:
            rel = exc.path.resolve().relative_to(Path(ws.root).resolve())
        except ValueError:
            rel = None
        if rel is not None:
            exc = exc.with_fix(ws.fix(str(rel)))
    text = " ".join(str(exc).split())
    if (
        isinstance(exc, (FileNotFoundError, PermissionError))
        and getattr(exc, "filename", None)
        and str(exc.filename) not in text
    ):
        text = f"{text}: {exc.filename}"
    return text or type(exc).__name__


def guard(verb: str, distributed: bool = False, resumable: bool = False) -> Callable[[Verb], Verb]:
    """Decorate ``cmd_<verb>``: known errors -> ``prunekit <verb>: error: ...`` and exit status 2.

    Args:
        verb: The sub-command's name (for the messages).
        distributed: Under ``torchrun``, start the process group and print on rank 0 only;
            otherwise only rank 0 runs the verb.
        resumable: Ctrl-C says that the same command resumes.
    """

    def deco(fn: Verb) -> Verb:
        @functools.wraps(fn)
        def wrapper(args: argparse.Namespace, out: TextIO) -> int:
            import torch

            from prunekit.workflow import distributed as pdist

            if not distributed and os.environ.get("RANK", "0") != "0":
                return 0  # torchrun: one process is enough
            threads = torch.get_num_threads()
            token = _WORKSPACE.set(None)
            try:
                if distributed and pdist.init_if_needed() and not pdist.is_main():
                    out = open(os.devnull, "w")  # noqa: SIM115  (closed at exit)
                if getattr(args, "threads", None):
                    if args.threads < 1:
                        raise CliError(f"--threads must be >= 1, got {args.threads}")
                    torch.set_num_threads(args.threads)
                return fn(args, out)
            except known_errors() as exc:
                if os.environ.get("PRUNEKIT_DEBUG"):
                    raise
                print(f"prunekit {verb}: error: {one_line(exc)}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                hint = "; run the same command again to resume" if resumable else ""
                print(f"prunekit {verb}: interrupted{hint}", file=sys.stderr)
                return 130
            finally:
                _WORKSPACE.reset(token)
                torch.set_num_threads(threads)

        return wrapper

    return deco
