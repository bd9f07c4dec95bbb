"""docs/api.md promises every public name (each module's `__all__`): a name added to the code shows up there."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import nm_hf

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def public_names() -> dict[str, list[str]]:
    """module name -> its `__all__`, for nm_hf and every submodule that declares one."""
    found = {"nm_hf": list(nm_hf.__all__)}
    for info in pkgutil.walk_packages(nm_hf.__path__, "nm_hf."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "__all__"):
            found[info.name] = list(module.__all__)
    return found


def test_api_doc_names_every_public_name():
    text = API_DOC.read_text()
    documented = {name for span in re.findall(r"`([^`]+)`", text) for name in re.findall(r"[A-Za-z_]\w*", span)}
    missing = sorted(f"{module}.{name}" for module, names in public_names().items() for name in names
                     if name not in documented)
    assert not missing, f"docs/api.md does not name: {missing}"
