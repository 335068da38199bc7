"""The packages are layered (see ``blvit_apps/__init__.py``): each imports only what lies below
it. Walked two ways: every import statement in the source, lazy ones inside functions included
(static), and what importing every module of a layer actually loads (at run time)."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["blvit_deploy", "blvit", "sam_adapter", "eval", "blvit_apps"]  # bottom to top (blvit_deploy: no torch)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: str) -> List[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.lineno, node.module or ""


def _layer(module: str) -> Optional[int]:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else (len(LAYERS) if top == "tools" else None)


def test_every_import_points_down():
    upward = []
    for package in LAYERS:
        for path in _modules(package):
            own = LAYERS.index(package)
            for line, target in _imports(path):
                layer = _layer(target)
                if layer is not None and layer > own:
                    upward.append(f"{path.relative_to(ROOT)}:{line} ({package}) imports {target} ({LAYERS[layer] if layer < len(LAYERS) else 'tools'})")
    assert not upward, "library packages import what lies above them:\n" + "\n".join(upward)


def test_the_walk_finds_upward_imports(tmp_path, monkeypatch):
    """The walk itself can fail: a lazy upward import inside a function is caught."""
    bad = ROOT / "blvit" / "_layer_probe_tmp.py"
    bad.write_text("def f():\n    from blvit_apps.demo import core\n    from ..eval import cli\n")
    try:
        with pytest.raises(AssertionError, match="_layer_probe_tmp.py:2 .blvit. imports blvit_apps.demo"):
            test_every_import_points_down()
    finally:
        bad.unlink()


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_importing_a_layer_loads_nothing_above_it(layer):
    below = LAYERS[: LAYERS.index(layer) + 1]
    modules = [_module_name(p) for pkg in below for p in _modules(pkg)]
    above = LAYERS[LAYERS.index(layer) + 1:]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {above!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
