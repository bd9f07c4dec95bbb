"""The recipe-support package sits on top of the library: the core never imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file of the nm_hf package imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_core_does_not_import_recipe_support():
    core = [p for p in (ROOT / "nm_hf").rglob("*.py") if "recipe" not in p.relative_to(ROOT / "nm_hf").parts]
    assert len(core) > 10
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported_modules(p) if n.startswith("nm_hf.recipe"))
                 for p in core}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "nm_hf.recipe" in imported_modules(ROOT / "recipes" / "translation.py")  # the check sees imports


def test_sparsity_arguments_stay_public_in_nm_hf_arguments():
    import nm_hf.arguments
    from nm_hf import SparsityArguments

    assert nm_hf.arguments.SparsityArguments is SparsityArguments
    assert not hasattr(nm_hf.arguments, "TranslationDataArguments")  # recipe-only flags live in nm_hf.recipe.args
