"""Progress display: a tqdm bar on a terminal (or in a notebook), nothing elsewhere.

Without a terminal (a log file, a CI job, ``| tee``) a bar is a stream of ``\\r`` updates, so
:func:`bar` returns ``None`` there and the verbs print one line per unit of work instead (ana:
one per channel group, fine-tuning: one per epoch).

Example:
    >>> b = bar(10, "ana", "pt", enabled=False)
    >>> b is None
    True
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["bar", "interactive"]


def interactive() -> bool:
    """Whether progress bars can redraw in place: stderr is a terminal, or this is a Jupyter kernel."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def bar(total: int | None, desc: str, unit: str, *, enabled: bool = True, **kwargs: Any):
    """A ``tqdm.auto.tqdm`` bar, or ``None`` when ``enabled`` is false or nothing can redraw in place."""
    if not enabled or not interactive():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, **kwargs)
