"""``'package.module:name'`` references: resolve them with errors that say what to fix.

Example:
    >>> resolve("math:sqrt")(4.0)
    2.0
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["resolve", "lazy_attr"]


def resolve(
    ref: str, what: str = "object", search: Iterable[str | Path] = (), error: type = ValueError, where: str = ""
) -> Any:
    """The object ``ref`` names; ``search`` directories go on ``sys.path`` first.

    ``where`` is appended to the import hint (e.g. which directories were searched).

    Raises:
        error: (``ValueError`` by default) naming ``what``, the reference and the fix.
    """
    module, sep, name = str(ref).partition(":")
    if not sep or not module or not name:
        raise error(f"the {what} must look like 'package.module:name', got {ref!r}")
    for d in search:
        d = str(Path(d).resolve())
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise error(
            f"cannot import the {what} {ref!r}: {exc}. Check the module name, and that its package is "
            f"installed or its directory is on PYTHONPATH{where}"
        ) from exc
    except Exception as exc:  # noqa: BLE001  (the user's module fails while importing)
        raise error(f"importing module {module!r} for the {what} failed: {type(exc).__name__}: {exc}") from exc
    for part in name.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise error(f"cannot import the {what} {ref!r}: {module!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def lazy_attr(module: str, attr: str):
    """A function that imports ``module`` on first call and calls its ``attr`` with the same arguments."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__qualname__ = f"lazy({module}:{attr})"
    return call
