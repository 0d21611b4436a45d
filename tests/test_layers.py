"""The package's layers, enforced on its imports (every import statement, function-level ones
included, parsed from the source: nothing is imported to check).

    base (atomic, device, faults)  <  schemas  <  models  <  transforms  <  pipeline  <  report, trainer, demo  <  cli

A module imports only from its own layer or below; bench/ sits above everything it uses. And no
import circles between modules, at any level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("base", ("prep", "prep.atomic", "prep.device", "prep.faults")),
    ("schemas", ("prep.schemas",)),
    ("models", ("prep.models",)),
    ("transforms", ("prep.transforms",)),
    ("pipeline", ("prep.pipeline",)),
    ("apps", ("prep.report", "prep.trainer", "prep.demo")),
    ("cli", ("prep.cli",)),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["prep", *parts])


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    skip = {"tests", "bench", "docs", "shared", ".venv", "build", "dist"}
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or rel.parts[0].startswith(".") or any(p.endswith(".egg-info") for p in rel.parts):
            continue
        found[module_name(path, root)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported prep module, line) for every import in the file; `from X import y` counts as
    X.y where X.y is a module, else X."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer: add it to LAYERS"
    return index


def violations(modules: dict[str, Path]) -> list[str]:
    found = []
    root = Path(min((str(p) for p in modules.values()), key=len)).parent  # the package's __init__.py
    for name, path in modules.items():
        for target, line in imports_of(name, path, modules):
            if layer_of(target) > layer_of(name):
                found.append(f"{path.relative_to(root)}:{line}: {name} ({LAYERS[layer_of(name)][0]}) imports "
                             f"{target} ({LAYERS[layer_of(target)][0]})")
    return found


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {name: sorted({t for t, _ in imports_of(name, path, modules)}) for name, path in modules.items()}
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_every_import_goes_down_the_layers():
    modules = package_modules()
    assert {"prep.cli", "prep.schemas.records", "prep.transforms.caption", "prep.pipeline.config"} <= set(modules)
    assert violations(modules) == []


def test_no_import_circles():
    assert cycles(package_modules()) == []


def test_bench_uses_the_package_from_above():
    """bench/ may import anything of prep; prep never imports bench."""
    modules = package_modules()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "bench" or n.startswith("bench.") for n in names), f"{name} imports bench"


@pytest.mark.parametrize("plant, expect", [
    ("transforms/caption.py", "prep.transforms.caption (transforms) imports prep.pipeline.config (pipeline)"),
    ("schemas/records.py", "prep.schemas.records (schemas) imports prep.pipeline.config (pipeline)"),
])
def test_a_planted_violation_fails(tmp_path, plant, expect):
    """The checks can fail: a copy of the package with one upward import planted."""
    import shutil

    copy = tmp_path / "prep"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "bench", "docs", "shared",
                                                                "*.egg-info", "__pycache__", "demo", "out"))
    target = copy / plant
    target.write_text(target.read_text() + "\n\ndef _planted():\n    from prep.pipeline.config import RunConfig\n"
                      "    return RunConfig\n")
    modules = package_modules(copy)
    found = violations(modules)
    circles = cycles(modules)
    assert any(expect in v for v in found), found
    if plant == "transforms/caption.py":  # config imports the stages' options; caption back up to config
        assert circles == [] or all("prep.transforms.caption" in c or "prep.pipeline.config" in c for c in circles)


def test_a_planted_circle_fails(tmp_path):
    """The circle check can fail: a copy of the package where transforms/options.py (which the
    stages import) imports transforms/caption.py back, within its own layer."""
    import shutil

    copy = tmp_path / "prep"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "bench", "docs", "shared",
                                                                "*.egg-info", "__pycache__", "demo", "out"))
    target = copy / "transforms" / "options.py"
    target.write_text(target.read_text() + "\n\ndef _planted():\n    from prep.transforms.caption import STAGE\n"
                      "    return STAGE\n")
    modules = package_modules(copy)
    assert violations(modules) == []  # one layer: only the circle check can see it
    circles = cycles(modules)
    assert any({"prep.transforms.options", "prep.transforms.caption"} <= set(c) for c in circles), circles
