"""The folder layout is the architecture: each subpackage is a layer (``reslab.LAYERS``, in order), and a module
imports only from its own layer or those before it. Every import counts, those inside functions and type-only ones
included; the README's layer table is checked against the same list."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import reslab

ROOT = Path(reslab.__file__).parent
TOP = ("__init__", "__main__")  # the package's API and ``python -m reslab``: above every layer


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")


def _exists(dotted: str) -> bool:
    base = ROOT.parent / dotted.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """The reslab modules ``path`` imports (a submodule where the import names one, else the package)."""
    name = _module_name(path)
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
            found.add(f"{target}.{alias.name}" if _exists(f"{target}.{alias.name}") else target)
    return found - {name}


GRAPH = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_lives_in_a_layer():
    for module in GRAPH:
        layer = _layer(module)
        assert layer in reslab.LAYERS or layer in TOP, f"{module} is in no layer of reslab.LAYERS"


def test_no_module_imports_from_a_later_layer():
    order = list(reslab.LAYERS)
    upward = []
    for module, targets in GRAPH.items():
        if _layer(module) in TOP:
            continue
        for target in targets:
            if _layer(target) in TOP or order.index(_layer(target)) > order.index(_layer(module)):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a later layer: " + ", ".join(sorted(upward))


def test_no_import_cycles_between_modules():
    def visit(node: str, stack: list[str]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for nxt in GRAPH.get(node, ()):
            visit(nxt, [*stack, node])

    for module in GRAPH:
        if module != "reslab":  # the package __init__ imports the API lazily; nothing inside imports it back
            visit(module, [])


def test_the_training_layer_imports_one_way():
    """Inside training: loop <- hooks <- build <- train; the loop knows no hook, the hooks no builder."""
    order = ["reslab.training.loop", "reslab.training.hooks", "reslab.training.build", "reslab.training.train"]
    rank = lambda m: next((i for i, o in enumerate(order) if m == o or m.startswith(o + ".")), None)
    for module, targets in GRAPH.items():
        if rank(module) is None:
            continue
        for target in targets:
            assert rank(target) is None or rank(target) <= rank(module), f"{module} -> {target}"


def test_the_readme_layer_table_is_the_package_list():
    text = (ROOT.parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)/` \|", text.split("## Architecture", 1)[1], re.M)
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
