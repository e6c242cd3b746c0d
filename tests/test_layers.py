"""The folder layout is the architecture: each subpackage is a layer (``reslab.LAYERS``, in order), and a module
imports only from its own layer or those before it. Every import counts, those inside functions and type-only ones
included; the manual's layer table (docs/architecture.md) is checked against the same list."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import reslab

ROOT = Path(reslab.__file__).parent
TOP = ("__init__", "__main__")  # the package's API and ``python -m reslab``: above every layer


def _module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")


def _exists(dotted: str, root: Path) -> bool:
    base = root.parent / dotted.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path, root: Path) -> set[str]:
    """The reslab modules ``path`` imports (a submodule where the import names one, else the package)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "reslab":
            target = node.module
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "reslab"}
            continue
        else:
            continue
        for alias in node.names:
            found.add(f"{target}.{alias.name}" if _exists(f"{target}.{alias.name}", root) else target)
    return found - {name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the reslab modules it imports, for the package at ``root``."""
    return {_module_name(p, root): _imports(p, root) for p in root.rglob("*.py")}


GRAPH = import_graph()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_lives_in_a_layer():
    for module in GRAPH:
        layer = _layer(module)
        assert layer in reslab.LAYERS or layer in TOP, f"{module} is in no layer of reslab.LAYERS"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a later layer (or from the package's top), as ``module -> target``."""
    order = list(reslab.LAYERS)
    upward = []
    for module, targets in graph.items():
        if _layer(module) in TOP:
            continue
        for target in targets:
            if _layer(target) in TOP or order.index(_layer(target)) > order.index(_layer(module)):
                upward.append(f"{module} -> {target}")
    return sorted(upward)


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (the package ``__init__``, which imports the API lazily, left out), or None."""
    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return [*stack, node]
        for nxt in graph.get(node, ()):
            if (cycle := visit(nxt, [*stack, node])) is not None:
                return cycle
        return None

    return next((c for m in graph if m != "reslab" and (c := visit(m, [])) is not None), None)


def test_no_module_imports_from_a_later_layer():
    assert not upward_imports(GRAPH), "imports from a later layer: " + ", ".join(upward_imports(GRAPH))


def test_no_import_cycles_between_modules():
    cycle = import_cycle(GRAPH)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_layering_checks_fail_on_a_wrong_import(tmp_path):
    """A copy of the package with an import from a later layer inside a function, and with a cycle, is caught."""
    copy = tmp_path / "reslab"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    errors = copy / "core" / "errors.py"
    original = errors.read_text()
    errors.write_text(original + "\n\ndef _late():\n    from ..cli import commands  # noqa\n")
    assert upward_imports(import_graph(copy)) == ["reslab.core.errors -> reslab.cli.commands"]
    assert import_cycle(GRAPH) is None
    log = copy / "core" / "log.py"
    log.write_text(log.read_text() + "\n\ndef _cycle():\n    from .errors import UserError  # noqa\n")
    errors.write_text(original + "\n\ndef _back():\n    from .log import say  # noqa\n")
    cycle = import_cycle(import_graph(copy))
    assert cycle is not None and {"reslab.core.errors", "reslab.core.log"} <= set(cycle), cycle


def test_the_training_layer_imports_one_way():
    """Inside training: loop <- hooks <- build <- train; the loop knows no hook, the hooks no builder."""
    order = ["reslab.training.loop", "reslab.training.hooks", "reslab.training.build", "reslab.training.train"]
    rank = lambda m: next((i for i, o in enumerate(order) if m == o or m.startswith(o + ".")), None)
    for module, targets in GRAPH.items():
        if rank(module) is None:
            continue
        for target in targets:
            assert rank(target) is None or rank(target) <= rank(module), f"{module} -> {target}"


def test_the_manual_layer_table_is_the_package_list():
    text = (ROOT.parents[1] / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `(\w+)/` \|", text.split("# Architecture", 1)[1], re.M)
    assert rows == list(reslab.LAYERS), rows


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{_module_name(path)}.{node.name} ({length} lines)")
    assert not long, ", ".join(long)
