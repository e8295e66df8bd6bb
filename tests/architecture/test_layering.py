"""Dependencies run one way: foundation -> checkpoint_formats -> stages -> pipelines, with no cycles.

Every import of the project is read from the source (module level and inside
functions, ``import x`` and ``from x import y``, relative ones resolved), so a
lazy import inside a function cannot hide an upward dependency or a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lower layers never import higher ones; a package may import its own layer's
# packages only where listed in SIDEWAYS.
LAYERS = {
    "foundation": 0,
    "checkpoint_formats": 1,
    "testbed": 4,  # builds the embedded model and gates it with stage 2's measurements
    "quantize": 2,
    "abliterate": 3,
    "pipelines": 4,
}
# abliterate's export may re-calibrate through stage 1's public entry points (quantize.stage, quantize.settings).
ALLOWED_INTO = {("abliterate", "quantize"): {"quantize.stage", "quantize.settings", "quantize.manifest"}}
SHIMS = ("quantize_nvfp4.py", "quantize_nvfp4_offload.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            modules[_module_name(path)] = path
    return modules


MODULES = _project_modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name refers to (``a.b.c`` may be a module or a name in ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_every_package_has_a_layer():
    assert set(LAYERS) == {_top(module) for module in MODULES}
    assert len(MODULES) > 100  # the walk found the project, not an empty tree


def test_no_upward_or_sideways_import():
    bad = []
    for module, targets in GRAPH.items():
        for target in targets:
            source_top, target_top = _top(module), _top(target)
            if source_top == target_top:
                continue
            allowed = ALLOWED_INTO.get((source_top, target_top))
            if allowed is not None and any(target == a or target.startswith(a + ".") for a in allowed):
                continue
            if LAYERS[target_top] >= LAYERS[source_top]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layering:\n  " + "\n  ".join(sorted(bad))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    # A package's __init__ importing its own submodules is how packages re-export; it is not a cycle.
    graph = {m: {t for t in ts if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, ts in GRAPH.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("shim", SHIMS)
def test_seed_shims_import_only_stage_one(shim):
    tree = ast.parse((ROOT / shim).read_text())
    tops = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    tops |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not tops & {"abliterate", "pipelines"}
