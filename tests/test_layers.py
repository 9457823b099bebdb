"""The package's layers import only downward: utils <- graph <- engine <- workflow <- deploy <- cli.

Every ``import prunekit.X`` / ``from prunekit.X import ...`` in every module (also inside functions)
is checked against the layer order; ``prunekit/__init__.py`` (the public re-exports), ``__main__``
and deprecated aliases are outside the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "prunekit"

#: rank of every subpackage; a module may import its own rank or lower (integrations: loaded lazily by the
#: engine's registries by name, so they sit above the engine; workflow and integrations do not import each other)
LAYERS = {
    "utils": 0,
    "nn": 1,
    "models": 1,
    "graph": 1,
    "engine": 2,
    "workflow": 3,
    "integrations": 3,
    "deploy": 4,
    "cli": 5,
}
OUTSIDE = {"__init__.py", "__main__.py", "hf.py"}  # public re-exports, entry point, deprecated alias


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "prunekit" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "prunekit":  # from prunekit import engine, __version__
                found += [(node.lineno, f"prunekit.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.parent != ROOT or p.name not in OUTSIDE)


def test_every_subpackage_has_a_layer():
    packages = {p.parent.name for p in ROOT.rglob("*.py") if p.parent != ROOT}
    assert packages <= set(LAYERS), f"subpackages without a layer in tests/test_layers.py: {packages - set(LAYERS)}"
    loose = {p.name for p in ROOT.glob("*.py")} - OUTSIDE
    assert not loose, f"modules outside the layers (put them in a subpackage): {sorted(loose)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down(path):
    own = path.relative_to(ROOT).parts[0]
    for line, module in _imports(path):
        pkg = _package(module)
        if pkg is None or pkg == own or pkg == "__version__":
            continue
        assert pkg in LAYERS, f"{path.name}:{line} imports {module}, which is in no layer"
        assert LAYERS[pkg] < LAYERS[own] or (LAYERS[pkg] == LAYERS[own] and LAYERS[own] == 1), (
            f"{path.relative_to(ROOT)}:{line} ({own}, layer {LAYERS[own]}) imports {module} "
            f"({pkg}, layer {LAYERS[pkg]})"
        )


def test_no_private_names_across_modules():
    """``from prunekit.a import _b`` couples two modules through a name that promises nothing."""
    bad = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prunekit"):
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_import_prunekit_is_lean():
    import subprocess
    import sys

    code = (
        "import sys, prunekit; heavy = [m for m in ('yaml', 'torchvision', 'transformers', 'onnx', 'timm', "
        "'ultralytics') if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import prunekit loads {out}"
