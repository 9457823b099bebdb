"""Number formatting and plain-text tables for terminal output and reports.

Example:
    >>> human(1234567)
    '1.23 M'
    >>> print(table([["a", "1"]], ["name", "n"]))
    name  n
    ----  -
    a     1
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["human", "table", "pct_change", "file_size"]


def human(n: float, sep: str = " ") -> str:
    """``1234567 -> '1.23 M'`` (G, M, k; plain below 1000); ``sep=""`` gives ``'1.23M'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{sep}{unit}"
    return f"{n:g}"


def file_size(n: int) -> str:
    """Bytes as ``'12.3 kB'`` or ``'4.56 MB'``."""
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.2f} MB"


def pct_change(before: float, after: float) -> str:
    """``'+12.5%'`` from ``before`` to ``after`` (empty when ``before`` is 0)."""
    return f"{100.0 * (after - before) / before:+.1f}%" if before else ""


def table(rows: Sequence[Sequence[object]], header: Sequence[str], align: str | None = None) -> str:
    """Plain-text table; ``align`` has one ``l`` or ``r`` per column (default: ``l`` then ``r``)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[object]) -> str:
        return "  ".join(
            str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths).rstrip(), *(line(r) for r in rows)])
