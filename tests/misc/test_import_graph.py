"""The package's structure: no import cycles, no upward imports across the layers, small rooms.

Layers, top to bottom (docs/architecture.md): entry points -> run wiring -> trainers (and what
drives engines: evaluation, the embedded build) -> engines and rewards -> core. A module may import
its own layer and the layers below it, never a layer above; ``rlspec`` imports inside functions
are kept for the optional heavy dependencies only (none of rlspec's own modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rlspec"

LAYERS = {  # module-name prefix -> layer (0 = core); the longest matching prefix wins
    "rlspec.train": 4, "rlspec.eval": 4, "rlspec.export": 4, "rlspec.compare": 4, "rlspec.merging": 4,
    "rlspec.warmup_drafter": 4,
    "rlspec.session": 3, "rlspec.ray_runtime": 3,
    "rlspec.trainers": 2, "rlspec.evals": 2, "rlspec.embedded": 2, "rlspec.embedded_build": 2,
    "rlspec.embedded_eval": 2, "rlspec.embedded_sft": 2, "rlspec.embedded_config": 2,
    "rlspec.rollout": 1, "rlspec.rewards": 1,
    "rlspec": 0,  # errors, registry, schema, config(s), cli, models, data, checkpoint, tracking, tasks
}
LAYER_NAMES = ["core", "engines and rewards", "trainers", "run wiring", "entry points"]
MAX_MODULE_LINES = 600
MAX_TRAINER_LINES = 450


def modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every import of a module in ``known``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([child.module] if child.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in child.names]
            for target in targets:
                if target in known and target != name:
                    found.append((target, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    mods = modules(package)
    return {name: {t for t, _ in imports(name, path, set(mods))} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def layer_of(name: str) -> int:
    matches = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    return LAYERS[max(matches, key=len)]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYER_NAMES[layer_of(a)]}) imports {b} ({LAYER_NAMES[layer_of(b)]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_upward_imports_across_the_layers():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_no_rlspec_imports_inside_functions():
    mods = modules(PACKAGE)
    inside = sorted(f"{name} imports {target} inside a function" for name, path in mods.items()
                    for target, in_function in imports(name, path, set(mods)) if in_function)
    assert inside == []


def test_every_module_is_small():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules(PACKAGE).items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_trainer_class_reads_in_one_sitting():
    source = (PACKAGE / "trainers" / "grpo.py").read_text(encoding="utf-8")
    (trainer,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "GRPOTrainer"]
    assert trainer.end_lineno - trainer.lineno + 1 <= MAX_TRAINER_LINES


@pytest.fixture()
def planted(tmp_path: Path) -> Path:
    """A stand-in package ``rlspec`` with a cycle (``a -> b -> c -> a``, the last edge hidden in a
    function) and an upward import (core -> engines)."""
    pkg = tmp_path / "rlspec"
    (pkg / "rollout").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rollout" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from rlspec.rollout import a\n")  # core importing an engine: upward
    (pkg / "rollout" / "a.py").write_text("from rlspec.rollout import b\n")
    (pkg / "rollout" / "b.py").write_text("import rlspec.rollout.c\n")
    (pkg / "rollout" / "c.py").write_text("def f():\n    from rlspec.rollout.a import X\n")
    return pkg


def test_the_checks_catch_a_planted_cycle_and_upward_import(planted):
    graph = import_graph(planted)
    assert cycles(graph) == [["rlspec.rollout.a", "rlspec.rollout.b", "rlspec.rollout.c"]]
    assert upward_imports(graph) == ["rlspec.errors (core) imports rlspec.rollout (engines and rewards)",
                                     "rlspec.errors (core) imports rlspec.rollout.a (engines and rewards)"]
