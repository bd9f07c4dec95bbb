"""The documentation's Python snippets, read from the markdown at test time: a doc edit that breaks one fails here.

Every ```python block of README.md and docs/*.md must compile. The self-contained ones (no Hub, GPU, data
files or user placeholders) also run as written: README's quick start, and the toy method and layer kind of
docs/extending.md (the layer kind with a stand-in for the user's `MyProjection`). They run in a temporary
directory, and the registries they add to are restored afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")


def python_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, section heading, code) of every ```python block of `path`."""
    blocks, heading, lines = [], "", path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        fence = _FENCE.match(lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if fence["lang"] == "python":
                indent = len(fence["indent"])
                blocks.append((i + 1, heading, "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


def snippet(path: Path, heading: str, index: int = 0) -> tuple[str, str]:
    """The `index`-th python block under the section `heading` of `path`, and its "file:line" name."""
    found = [(line, code) for line, head, code in python_blocks(path) if head == heading]
    assert len(found) > index, f"{path.name}: no python block #{index} under '## {heading}'"
    line, code = found[index]
    return code, f"{path.relative_to(ROOT)}:{line}"


def run_snippet(code: str, name: str, namespace: dict | None = None) -> dict:
    namespace = {"__name__": "__main__", **(namespace or {})}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def comment_on(code: str, text: str) -> str:
    """The comment at the end of the snippet's first line containing `text`."""
    line = next(line for line in code.splitlines() if text in line)
    return line.split("#", 1)[1].strip()

ALL_BLOCKS = [pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")
              for path in DOCS for line, _, code in python_blocks(path)]


@pytest.mark.parametrize("code", ALL_BLOCKS)
def test_every_python_block_compiles(code, request):
    compile(code, request.node.callspec.id, "exec")


def test_docs_have_python_blocks():
    assert len(ALL_BLOCKS) >= 10


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temporary directory, on one thread (tiny models on a shared machine)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.fixture
def restore_registries():
    """Undo what a snippet registers (methods, layer kinds), so other tests see the stock registries."""
    from nm_hf.layers import kinds
    from nm_hf.methods import base

    saved = [(registry, dict(registry)) for registry in (base._REGISTRY, kinds._KINDS)]
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)


def test_readme_quick_start(in_tmp, capsys):
    code, name = snippet(ROOT / "README.md", "Quick start")
    torch.manual_seed(0)
    ns = run_snippet(code, name)
    out = capsys.readouterr().out
    # the comments say what it prints: the metric keys they quote, the report's header, the last line exactly
    keys = re.findall(r"'([\w/]+)':", comment_on(code, "print(tracker.log_metrics("))
    assert keys
    metrics = next(line for line in out.splitlines() if line.startswith("{'sparsity/"))
    assert all(f"'{key}':" in metrics for key in keys), (keys, metrics)
    assert "N:M holds" in out
    assert out.rstrip().splitlines()[-1] == comment_on(code, "print(reloaded.config.nm_sparsity")
    assert (in_tmp / "out" / "config.json").is_file()
    assert type(ns["reloaded"].model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_extending_method_example(in_tmp, restore_registries):
    import nm_hf
    from nm_hf.methods import register_method

    code, name = snippet(ROOT / "docs" / "extending.md", "Adding a method")
    # the example is the file nm_hf/methods/toy_decay.py: run it inside that package (relative import)
    ns = run_snippet(code, name, {"__name__": "nm_hf.methods.toy_decay", "__package__": "nm_hf.methods"})
    register_method(ns["ToyDecayMethod"]())  # what the text after the example says to do
    config = nm_hf.SparsityConfig(method="toy-decay", method_args={"strength": 2.0})
    with pytest.raises(ValueError, match="strength must be >= 0"):
        nm_hf.SparsityConfig(method="toy-decay", method_args={"strength": -1.0})
    from tiny_models import tiny_model, train_steps

    model = tiny_model("llama")
    nm_hf.sparsify(model, config)
    train_steps(model, 1)
    nm_hf.finalize(model)
    report = nm_hf.sparsity_report(model)
    assert report.nm_ok and len(report.layers) == 14


def test_extending_layer_kind_example(in_tmp, restore_registries):
    import nm_hf

    class MyProjection(torch.nn.Module):  # the user's module the example names: weight stored [out, in]
        def __init__(self, in_features: int = 16, out_features: int = 8):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
            self.bias = None

        def forward(self, x):
            return x @ self.weight.t()

    code, name = snippet(ROOT / "docs" / "extending.md", "Adding a layer kind")
    ns = run_snippet(code, name, {"MyProjection": MyProjection})
    net = torch.nn.Sequential(MyProjection())
    nm_hf.sparsify(net, nm_hf.SparsityConfig(method="fixed"))
    assert type(net[0]) is ns["SparseMyProjection"]
    net(torch.randn(2, 16)).sum().backward()
    nm_hf.finalize(net)
    assert type(net[0]) is MyProjection
    assert nm_hf.check_nm(net[0].weight, 2, 4, dim=1)
