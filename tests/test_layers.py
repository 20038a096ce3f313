"""The modules form layers that point one way: every import (function-level ones included) goes to the same
layer or one below, and no modules or components import each other in a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "alignkit"

# bottom to top; a module belongs to the first entry that is it or a package above it
LAYERS = [
    ["alignkit.errors", "alignkit.io", "alignkit"],
    ["alignkit.config", "alignkit.data", "alignkit.models", "alignkit.adapters", "alignkit.objectives",
     # the BitDelta format: packing, the artifact on disk, its linear layer and applying it to a base
     "alignkit.bitdelta.pack", "alignkit.bitdelta.artifact", "alignkit.bitdelta.linear", "alignkit.bitdelta.apply",
     "alignkit.bitdelta.compress", "alignkit.bitdelta.__init__"],
    ["alignkit.forward"],
    ["alignkit.generation"],
    ["alignkit.scoring"],
    ["alignkit.session", "alignkit.methods"],
    ["alignkit.runs"],
    ["alignkit.train", "alignkit.eval", "alignkit.bitdelta", "alignkit.export", "alignkit.recipe"],
    ["alignkit.cli", "alignkit.launch", "alignkit.__main__"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """alignkit modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name.rsplit(".", 1)[0] if not name.endswith(".__init__") else name.removesuffix(".__init__")
    if path.name != "__init__.py":
        package = name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import dist`: the module alias names, when it is one
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known or f"{sub}.__init__" in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    out = set()
    for target in found:
        if not target.startswith("alignkit"):
            continue
        out.add(target if target in known else f"{target}.__init__" if f"{target}.__init__" in known else target)
    return out - {name}


def layer_of(name: str) -> tuple[int, str]:
    """(layer, component): the most specific entry of LAYERS that is the module or a package above it."""
    best = None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if name == entry or name.startswith(entry + "."):
                if best is None or len(entry) > len(best[1]):
                    best = (i, entry)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and the README's layout)"
    return best


def component(name: str) -> str:
    layer, entry = layer_of(name)
    return entry if entry != "alignkit" else name


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports(name, path, known) for name, path in modules().items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_point_down_or_sideways():
    upward = []
    for name, targets in graph().items():
        for target in targets:
            if target in modules() and layer_of(target)[0] > layer_of(name)[0]:
                upward.append(f"{name} (layer {layer_of(name)[0]}) imports {target} (layer {layer_of(target)[0]})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles_between_modules_or_components():
    modules_graph = {k: {t for t in v if t in modules()} for k, v in graph().items()}
    assert not cycles(modules_graph), cycles(modules_graph)
    components: dict[str, set[str]] = {}
    for name, targets in modules_graph.items():
        for target in targets:
            if component(target) != component(name):
                components.setdefault(component(name), set()).add(component(target))
    assert not cycles(components), cycles(components)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checks can fail: a lower module importing a higher one inside a function is found."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from ..train import run_train\n")
    assert imports("alignkit.data.x", path, {"alignkit.train"}) == {"alignkit.train"}
    assert layer_of("alignkit.data.x")[0] < layer_of("alignkit.train")[0]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_checking_a_config_loads_nothing_heavy():
    """The registry is read to compose and check a config before any model code: a bad override fails in a
    second. Method and adapter files import torch (and the layers that need it) inside their functions."""
    import subprocess
    import sys

    code = ("import sys; from alignkit.methods import METHODS, compose, validate; "
            "[validate(compose([f'method={m}', 'reward=gold'])) for m in METHODS]; "
            "print(sorted(k for k in ('torch', 'transformers', 'peft', 'bitsandbytes') if k in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
