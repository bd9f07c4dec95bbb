"""The package's import structure: imports run downward only, no cycles, no private names across modules.

Levels (a module may import from its own level or below; `nm_hf/__init__.py` re-exports and is exempt):
core (masks, files, methods, redact) -> config -> record -> layers -> injection -> report / tracker / plot /
save_warning / peft / prune -> trainer / arguments -> checkpoint, hub, card, CUDA path, CLI -> recipe
support. Data loaders and tokenizers stand apart (only recipe support uses them). Imports inside
functions count too; imports under `if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nm_hf"

LEVELS = [
    {"nm_hf._files", "nm_hf.native", "nm_hf.masks", "nm_hf.methods", "nm_hf.optim", "nm_hf.data", "nm_hf.tokenization",
     "nm_hf.redact", "nm_hf.cpu_memory"},
    {"nm_hf.config"},
    {"nm_hf.record"},
    {"nm_hf.layers"},
    {"nm_hf.injection"},
    {"nm_hf.report", "nm_hf.tracker", "nm_hf.plot", "nm_hf.save_warning", "nm_hf.peft", "nm_hf.prune"},
    {"nm_hf.trainer", "nm_hf.arguments"},
    {"nm_hf.checkpoint", "nm_hf.compressed", "nm_hf.hub", "nm_hf.card", "nm_hf.cuda", "nm_hf.semi_structured",
     "nm_hf.cli"},
    {"nm_hf.recipe"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def group_of(module: str) -> str:
    """The level-table entry a module belongs to: the longest listed prefix."""
    parts = module.split(".")
    for k in range(len(parts), 1, -1):
        prefix = ".".join(parts[:k])
        if any(prefix in level for level in LEVELS):
            return prefix
    raise AssertionError(f"{module} is in no level of tests/test_layering.py: add it")


def level_of(module: str) -> int:
    group = group_of(module)
    return next(i for i, level in enumerate(LEVELS) if group in level)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return skipped


def imports_of(path: Path, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(imported nm_hf module, names imported from it) for every import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("nm_hf")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("nm_hf"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            found += [(sub, []) for sub in submodules]
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest or not submodules:
                found.append((target, rest))
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_imports_run_downward_without_private_names():
    modules = all_modules()
    problems = []
    for name, path in sorted(modules.items()):
        if name == "nm_hf":
            continue
        own = level_of(name)
        for target, names in imports_of(path, set(modules)):
            if target == "nm_hf":
                problems.append(f"{name} imports the top-level package nm_hf (import the module it needs)")
                continue
            if level_of(target) > own:
                problems.append(f"{name} (level {own}) imports {target} (level {level_of(target)}): upward")
            if group_of(target) != group_of(name):
                private = [n for n in names if n.startswith("_")]
                if private:
                    problems.append(f"{name} imports private name(s) {private} from {target}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    modules = all_modules()
    graph = {name: {t for t, _ in imports_of(path, set(modules)) if t in modules and t != name}
             for name, path in modules.items() if name != "nm_hf"}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize("core", ["nm_hf.injection", "nm_hf.trainer", "nm_hf.hub"])
def test_the_library_core_never_imports_recipe_support(core):
    modules = all_modules()
    for name, path in modules.items():
        if name.startswith(core):
            assert not any(t.startswith("nm_hf.recipe") for t, _ in imports_of(path, set(modules))), name
