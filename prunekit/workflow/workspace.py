"""A workspace directory: every stage's artifacts, written atomically, readable as JSON.

Example:
    >>> import tempfile
    >>> ws = Workspace(tempfile.mkdtemp())
    >>> ws.write_json("ana.json", {"points": {}})
    >>> ws.read_json("ana.json")
    {'points': {}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit.utils.files import atomic_write

__all__ = ["Workspace", "model_fingerprint"]


class Workspace:
    """Files of one pruning job under ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def read_json(self, name: str) -> Any:
        p = self.path(name)
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:  # never written by us: atomic writes
            raise ValueError(f"{p} is not valid JSON ({exc}); delete it to start over") from exc

    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.path(name), json.dumps(data, indent=1, sort_keys=False))

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern)) if self.root.exists() else []

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's tensor names, shapes and values (changes when weights change)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            if t.numel() and t.is_floating_point():
                flat = t.detach().reshape(-1)
                step = max(1, flat.numel() // 64)
                h.update(f"{float(flat.double().sum()):.6e}".encode())
                h.update(flat[::step][:64].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
