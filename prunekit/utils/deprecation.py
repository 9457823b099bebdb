"""Renamed arguments: the old name still works for one release, with a :class:`DeprecationWarning`.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     renamed("f", "ignore", ["fc"], "excludes", ())
    ['fc']
    >>> str(caught[0].message)
    'f(ignore=...) is deprecated: use excludes=... (the same meaning); the old name goes in the next release'
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["renamed", "UNSET"]


class _Unset:
    """The default of a deprecated argument: tells "not given" from every real value (``None`` included)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def renamed(where: str, old: str, old_value: Any, new: str, new_value: Any, default: Any = ()) -> Any:
    """The value of an argument renamed from ``old`` to ``new``.

    Args:
        where: The function, for the message (``"Pruner"``, ``"prune"``).
        old: The deprecated name.
        old_value: What was passed under the old name (:data:`UNSET` when nothing).
        new: The name to use.
        new_value: What was passed under the new name.
        default: ``new``'s default: giving both names is refused unless ``new`` kept it.

    Raises:
        TypeError: Both names were given.
    """
    if old_value is UNSET:
        return new_value
    if new_value is not UNSET and new_value is not default and new_value != default:
        raise TypeError(f"{where}() got both {old}= and {new}= (the same option); pass only {new}=")
    warnings.warn(
        f"{where}({old}=...) is deprecated: use {new}=... (the same meaning); the old name goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value
