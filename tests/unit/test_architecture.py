"""The project's structure, read from its source with `ast` (docs/architecture.md): no import cycle
between files, module-level imports and imports inside functions alike; the layers of the design
(models without torch.distributed, parallel without MoCo, data without models); and the tables that
name the backends agree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("scale", "benchmarks")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imported_names(path: Path) -> set[str]:
    """Every module name an `import` or `from ... import` anywhere in the file names (inside
    functions too), with `from a import b` also giving `a.b` (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """File -> the project's files it imports (a package's __init__ only when imported itself)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        targets = {resolve(n) for n in imported_names(path) if n.split(".")[0] in PACKAGES}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_files():
    found = cycles(import_graph())
    assert not found, "import cycles (each a set of files importing each other): " + "; ".join(map(str, found))


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("scale.models", ("torch.distributed", "scale.parallel", "scale.train", "scale.data", "scale.eval")),
        ("scale.parallel", ("scale.models", "scale.train", "scale.data", "scale.eval", "scale.config")),
        ("scale.hardware", ("scale.config", "scale.parallel", "scale.models", "scale.train", "scale.data")),
        ("scale.optim", ("scale.models", "scale.parallel", "scale.train", "scale.data", "scale.config")),
        ("scale.data", ("scale.models", "scale.parallel", "scale.train", "scale.eval", "scale.entry")),
        ("scale.config", ("torch", "scale.models", "scale.train", "scale.data")),
        ("scale.train", ("scale.eval",)),
        ("scale.errors", ("torch", "scale.")),
    ],
)
def test_layers_import_nothing_above_them(layer, forbidden):
    """The design's boundaries (docs/architecture.md): models know nothing of torch.distributed,
    parallel nothing of MoCo, data nothing of models; the config and the errors import no torch
    (the commands check a command line before torch is imported)."""
    bad = []
    for name, path in modules().items():
        if name == layer or name.startswith(layer + "."):
            bad += [f"{name} imports {n}" for n in imported_names(path) if n.startswith(forbidden)]
    assert not bad, bad


def test_the_backend_tables_agree():
    from scale.config import RULES
    from scale.parallel.memory import THEORY
    from scale.parallel.registry import BACKEND_CHOICES, BACKENDS, backend_class

    assert RULES["parallel.backend"].choices == BACKEND_CHOICES
    assert set(THEORY) == set(BACKENDS)
    for name in BACKENDS:
        assert backend_class(name).name == name


def test_the_command_line_is_read_before_torch_is_imported():
    """`scale.pretrain` installs its preemption handler before torch is imported (a signal during the
    minutes of start-up is recorded, not fatal): the config, the registry and the errors are torch-free."""
    import subprocess
    import sys

    code = "import sys, scale.pretrain, scale.config, scale.plot; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
