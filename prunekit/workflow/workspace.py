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

from prunekit.utils import artifacts
from prunekit.utils.files import atomic_write, read_json

__all__ = ["Workspace", "model_fingerprint", "json_fingerprint", "FIXES", "DEFAULT_FIX"]


#: what to do when an artifact is truncated or corrupt, by file name (``{root}``: the workspace); a file not
#: listed gets :data:`DEFAULT_FIX`
FIXES = {
    artifacts.ANA: "delete it and run ana (or run) again: the analysis is measured again",
    artifacts.SENSITIVITY: "run 'prunekit ana' again: it rewrites sensitivity.json from ana.json",
    artifacts.ITERATIVE: "delete it and run again: the steps are redone, reusing their fine-tuning checkpoints",
    artifacts.SUMMARY: "run 'prunekit run' again: it rewrites summary.json from the finished steps",
    artifacts.PLAN: "run 'prunekit prune' again: it rewrites plan.json",
    artifacts.PRUNE: "run 'prunekit prune' again: it rewrites prune.json",
    artifacts.FINETUNE: "run 'prunekit finetune' again: it rewrites finetune.json",
    artifacts.DEMO: "run 'prunekit demo' again: it rewrites demo.json",
    artifacts.STEPS: (
        "delete {root}/iterative.json and run again: the steps are redone, reusing their fine-tuning checkpoints"
    ),
}
DEFAULT_FIX = "delete it and run the command that wrote it again"


class Workspace:
    """Files of one pruning job under ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def fix(self, name: str) -> str:
        """What to do when the artifact ``name`` (a path relative to the root) is damaged."""
        parts = Path(name).parts
        if len(parts) > 3 and parts[0] == artifacts.STEPS and parts[2] == "finetune":  # one step's fine-tuning
            return (
                f"delete {self.root.joinpath(*parts[:3], 'checkpoint.pt')} and run again: that fine-tuning starts over"
            )
        key = parts[0] if parts and parts[0] == artifacts.STEPS else Path(name).name
        return FIXES.get(key, DEFAULT_FIX).format(root=self.root)

    def read_json(self, name: str) -> Any:
        """The artifact ``name``; a truncated or corrupt one is an ``ArtifactError`` naming it and the fix."""
        return read_json(self.path(name), "workspace file", self.fix(name))

    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.path(name), json.dumps(data, indent=1, sort_keys=False))

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern)) if self.root.exists() else []

    def set_aside(self, names: list[str], label: str) -> Path | None:
        """Move the artifacts ``names`` that exist into ``previous/<label>-<n>/`` instead of deleting them.

        Returns that directory (``None`` when none of them existed).

        Example:
            >>> import tempfile
            >>> ws = Workspace(tempfile.mkdtemp()); ws.write_json("ana.json", {})
            >>> ws.set_aside(["ana.json", "sensitivity.json"], "ana").name
            'ana-1'
        """
        present = [n for n in names if self.exists(n)]
        if not present:
            return None
        n = 1
        while self.path(f"previous/{label}-{n}").exists():
            n += 1
        dest = self.path(f"previous/{label}-{n}")
        dest.mkdir(parents=True)
        for name in present:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path(name), target)
        return dest

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


def json_fingerprint(data: Any) -> str:
    """Hash of a JSON-able value (e.g. a plan's ``pruned`` dict), independent of key order.

    Example:
        >>> json_fingerprint({"a": 1, "b": [2]}) == json_fingerprint({"b": [2], "a": 1})
        True
    """
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
