"""Atomic file writes (a killed process never leaves a half-written file) and checked reads (a
truncated or corrupt file is a one-line :class:`ArtifactError` naming the file and the fix).

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a" / "x.txt"
    >>> atomic_write(p, "hello"); p.read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_torch_save",
    "atomic_path",
    "ArtifactError",
    "reading",
    "read_json",
    "check_safetensors",
    "load_safetensors",
    "load_weights",
    "torch_load",
    "FIX",
]


def atomic_path(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it to ``path``.

    The temp file is removed if ``write`` fails or the process is interrupted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically, flushed to disk."""

    def write(tmp: str) -> None:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_path(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically."""
    import torch

    atomic_path(path, lambda tmp: torch.save(obj, tmp))


# ----- reading back: one helper for every artifact, one-line errors -----------------------------------
#: what to do about a damaged file when the caller knows nothing better
FIX = "restore it, or write it again with the command that made it"


class ArtifactError(ValueError):
    """A file prunekit reads is truncated or corrupt; the message names the file and the fix.

    Attributes:
        path: The file.
        what: What it holds (``'pruning plan'``, ``'checkpoint'`` ...).
        reason: What the parser said.
    """

    def __init__(
        self, message: str, path: str | os.PathLike | None = None, what: str = "file", reason: str = ""
    ) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.what, self.reason = what, reason

    @classmethod
    def of(cls, path: str | os.PathLike, what: str, reason: str, fix: str) -> ArtifactError:
        return cls(f"cannot read the {what} {path} (truncated or corrupt: {reason}); {fix}", path, what, reason)

    def with_fix(self, fix: str) -> ArtifactError:
        """The same error with another fix (the caller knows better what rewrites the file)."""
        return ArtifactError.of(self.path, self.what, self.reason, fix) if self.path is not None else self


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def reading(
    path: str | os.PathLike, what: str = "file", fix: str = FIX, errors: tuple[type[BaseException], ...] = (Exception,)
) -> Iterator[None]:
    """Turn ``errors`` raised while parsing ``path`` into a one-line :class:`ArtifactError`.

    A missing file stays a ``FileNotFoundError`` (the caller says which command writes it).

    Example:
        >>> import json
        >>> with reading("x.json", "analysis", "delete it"):  # doctest: +IGNORE_EXCEPTION_DETAIL
        ...     json.loads("{")
        Traceback (most recent call last):
        ArtifactError: cannot read the analysis x.json (truncated or corrupt: Expecting ...); delete it
    """
    try:
        yield
    except (ArtifactError, FileNotFoundError):
        raise
    except errors as exc:
        raise ArtifactError.of(path, what, _reason(exc), fix) from exc


def read_json(path: str | os.PathLike, what: str = "JSON file", fix: str = FIX) -> Any:
    """``json.loads`` of a file, with :func:`reading`'s one-line error."""
    path = Path(path)
    text = path.read_bytes()
    with reading(path, what, fix):
        return json.loads(text)


def check_safetensors(path: str | os.PathLike, what: str = "weights", fix: str = FIX) -> None:
    """Raise :class:`ArtifactError` unless ``path`` is a complete safetensors file (reads the header only)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with reading(path, what, fix):
        with safe_open(str(path), "pt"):
            pass


def load_safetensors(path: str | os.PathLike, what: str = "weights", fix: str = FIX) -> dict:
    """``safetensors.torch.load_file`` with the one-line error."""
    from safetensors.torch import load_file

    check_safetensors(path, what, fix)
    with reading(path, what, fix):
        return load_file(str(path))


def load_weights(model: Any, path: str | os.PathLike, what: str = "weights", fix: str = FIX) -> None:
    """``safetensors.torch.load_model(model, path)``: a damaged file is an :class:`ArtifactError`; weights
    that do not fit the model stay the ``RuntimeError`` of ``load_state_dict``."""
    from safetensors.torch import load_model

    check_safetensors(path, what, fix)
    load_model(model, str(path))


def torch_load(path: str | os.PathLike, what: str = "checkpoint", fix: str = FIX, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)`` with the one-line error."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with reading(path, what, fix, errors=(RuntimeError, EOFError, OSError, ValueError)):
            return torch.load(path, weights_only=True, **kwargs)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001  (pickle.UnpicklingError and the like: whole, but not plain tensors)
        import zipfile

        if not zipfile.is_zipfile(path):  # garbage, not a pickle
            raise ArtifactError.of(path, what, "not a torch.save archive", fix) from exc
        if "weights only" not in str(exc).lower():
            raise ArtifactError.of(path, what, _reason(exc), fix) from exc
        raise ArtifactError(
            f"cannot read the {what} {path}: it holds pickled Python objects, which "
            f"torch.load(weights_only=True) refuses to run; {fix}",
            path,
            what,
            "pickled objects",
        ) from exc
