"""Layers whose weight the model reads directly (Mamba's `dt_proj`, a lookup table), bypassing the layer's forward,
stay sparse: while the reading module runs, the read sees the layer's masked forward tensor."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, ignored_reasons, iter_sparse_layers, sparsify
from nm_hf.record import CONFIG_KEY
from tiny_models import tiny_config, tiny_inputs, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = SparsityConfig(n=2, m=4)


def tiny_mamba(model_type: str):
    torch.manual_seed(0)
    # hidden 64: dt_proj's input (the time-step rank, hidden / 16) is 4, so m=4 divides every linear's input
    config = tiny_config(model_type, hidden_size=64, state_size=8)
    return AutoModelForCausalLM.from_config(config)


def exposed_names(model: nn.Module) -> set[str]:
    """Names of the layers whose weight `sparsify` exposes to a module reading it."""
    from nm_hf.layers.reads import weight_readers  # (here: the module is new, the other tests run without it)

    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(layer)] for _, _, layers in weight_readers(model) for layer in layers}


def sparse_names(model: nn.Module) -> list[str]:
    return [name for name, _ in iter_sparse_layers(model)]


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba"])
def test_all_linear_keeps_directly_read_weights_sparse(model_type, tmp_path):
    model = tiny_mamba(model_type)
    sparsify(model, CONFIG)
    names = sparse_names(model)
    read = [f"backbone.layers.{i}.mixer.{layer}" for i in range(2) for layer in ("dt_proj", "x_proj", "out_proj")]
    assert set(read) | {f"backbone.layers.{i}.mixer.in_proj" for i in range(2)} <= set(names)
    record = getattr(model.config, CONFIG_KEY)
    assert set(read) <= set(record["targeted_modules"]) and not set(read) & set(record["ignored_modules"])
    assert not set(ignored_reasons(model, SparsityConfig(), names)) & set(read)
    # dt_proj (force_accelerate_hooks) and x_proj / out_proj (passed to the fused training kernel)
    assert set(read) <= exposed_names(model)

    # what the sparse model computes, trained, is what the finalized one computes, and what a plain reload gives
    train_steps(model, 1, lr=1e-2)
    model.eval()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        sparse_logits = model(**inputs).logits
        finalize(model)
        torch.testing.assert_close(model(**inputs).logits, sparse_logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, sparse_logits, rtol=1e-5, atol=1e-5)


def test_naming_a_directly_read_weight_makes_it_sparse():
    model = tiny_mamba("mamba")
    sparsify(model, SparsityConfig(n=2, m=4, target_modules=["dt_proj"]))
    assert sparse_names(model) == [f"backbone.layers.{i}.mixer.dt_proj" for i in range(2)]
    assert exposed_names(model) == set(sparse_names(model))


# ---------------------------------------------------------------------------------------------
# Reads found in the source of a module's forward and the methods it calls


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class LookupTable(nn.Module):
    """`table` is used as a lookup table under no_grad in a helper the forward calls, never called itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 16)
        self.table = nn.Linear(16, 8, bias=False)
        self.fail = False

    def _bias(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.table.weight.t()[idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(x) + self._bias((x.abs() * 4).long() % 16).sum(-1)
        if self.fail:
            raise RuntimeError("the reader failed")
        return out


class ReadsTable(nn.Module):
    """`table`'s weight in a matmul with gradients (`reads`), or the layer called (`reads=False`)."""

    def __init__(self, reads: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Linear(16, 8, bias=False)
        self.reads = reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads:
            return x @ self.table.weight.t()
        return self.table(x)


class ReadsAndCalls(nn.Module):
    """Reads `table`'s weight and calls `table` in the same forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x) + x @ self.table.weight.t()


class ReadsConv1D(nn.Module):
    """GPT-2's `Conv1D` stores its weight [in, out]: read as such (`x @ weight`), and called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = Conv1D(8, 16)
        nn.init.normal_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.conv.weight + self.conv(x)


class WithTable(nn.Module):
    """A `table` read directly by every subclass's forward (`table_term`)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.table = nn.Linear(16, 8, bias=False)

    def table_term(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.table.weight.t()).sum(-1, keepdim=True)


class MetadataReads(WithTable):
    """Reads only `proj`'s weight's dtype, type and shape: the layer is still called."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype)
        assert isinstance(self.proj.weight, torch.Tensor)
        return self.proj(x)[..., : self.proj.weight.shape[0]] + self.table_term(x)


class GuardedRead(WithTable):
    """Reads a slice of `proj`'s weight only on a slow path (as BLOOM's `slow_but_exact`)."""

    def __init__(self, slow_path: bool) -> None:
        super().__init__()
        self.slow_path = slow_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slow_path:
            k = 8
            return x[..., :k] @ self.proj.weight[:, :k].t() + x[..., k:] @ self.proj.weight[:, k:].t()
        else:  # the `else` guards the call: `table` is read only when slow_path is False
            return self.proj(x) + self.table_term(x)


class InitOnlyReads(WithTable):
    """Reads `proj`'s weight in `__init__` and `_init_weights` only, which the forward does not call."""

    def __init__(self) -> None:
        super().__init__()
        self._init_weights()
        self.scale = float(self.proj.weight.detach().abs().mean())

    def _init_weights(self) -> None:
        nn.init.normal_(self.proj.weight, std=0.02)
        self.proj.weight.data.mul_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale + self.table_term(x)


class GrandchildRead(nn.Module):
    """Reads `block.proj`'s weight, a grandchild's, directly; `other` is only called; `block` calls `proj` too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = Block()
        self.other = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(x) + x @ self.block.proj.weight.t() + self.block(x)


def inputs() -> torch.Tensor:
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


def assert_finalize_keeps_the_output(model: nn.Module) -> torch.Tensor:
    """One training step, then: the eval output equals the finalized model's, and no hook is left."""
    train_steps_plain(model)
    model.eval()
    x = inputs()
    with torch.no_grad():
        sparse = model(x)
        finalize(model)
        torch.testing.assert_close(model(x), sparse, rtol=0, atol=0)
    assert not any(m._forward_pre_hooks or m._forward_hooks or "_nm_weight_reads" in vars(m) for m in model.modules())
    return sparse


def train_steps_plain(model: nn.Module, steps: int = 2) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(inputs()).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_lookup_table_read_in_a_helper_stays_sparse_and_finalize_keeps_the_output():
    model = LookupTable()
    sparsify(model, CONFIG)
    assert sparse_names(model) == ["proj", "table"]
    assert not ignored_reasons(model, SparsityConfig(), ["proj", "table"])
    model.eval()
    with torch.no_grad():  # the masked table, not the dense one: finalize changes nothing
        dense_read = LookupTable.forward(model, inputs())  # (the hooks do not run: what a plain read gives)
        assert not torch.equal(model(inputs()), dense_read)
    assert_finalize_keeps_the_output(model)


def test_naming_a_layer_read_in_the_source_makes_it_sparse():
    model = LookupTable()
    sparsify(model, SparsityConfig(n=2, m=4, target_modules=["table"]))
    assert sparse_names(model) == ["table"] and exposed_names(model) == {"table"}
    assert_finalize_keeps_the_output(model)


@pytest.mark.parametrize("method", ["sr-ste", "ste", "s-ste"])
def test_a_read_gets_the_gradient_of_a_call(method):
    """A read with gradients trains the weight as the method defines (SR-STE: dense gradient plus the decay on
    pruned weights), exactly as calling the layer does."""
    config = SparsityConfig(n=2, m=4, method=method, decay=0.5 if method == "sr-ste" else SparsityConfig.decay)
    reads, calls = sparsify(ReadsTable(), config), sparsify(ReadsTable(reads=False), config)
    assert sparse_names(reads) == ["table"]
    x = inputs()
    out_reads, out_calls = reads(x), calls(x)
    torch.testing.assert_close(out_reads, out_calls)
    out_reads.pow(2).sum().backward()
    out_calls.pow(2).sum().backward()
    torch.testing.assert_close(reads.table.weight.grad, calls.table.weight.grad)
    if method == "sr-ste":  # the decay reached the pruned weights: not the gradient of a dense read
        weight = reads.table.weight.detach()
        mask = reads.table.current_mask()
        masked_grad = 2 * (x @ (weight * mask).t()).t() @ x
        torch.testing.assert_close(reads.table.weight.grad, masked_grad + 0.5 * (~mask.bool()) * weight)
    assert "weight" not in vars(reads.table)


def test_a_read_and_a_call_in_one_forward_use_the_forward_tensor_once():
    """S-STE's soft threshold is not idempotent: the call inside the reader must not threshold again."""
    model = sparsify(ReadsAndCalls(), SparsityConfig(n=2, m=4, method="s-ste"))
    assert sparse_names(model) == ["table"]
    x = inputs()
    out = model(x)
    weight = model.table.forward_tensor()
    torch.testing.assert_close(out, 2 * F.linear(x, weight))
    assert_finalize_keeps_the_output(model)


def test_a_conv1d_read_sees_its_masked_weight_in_its_own_layout():
    model = sparsify(ReadsConv1D(), CONFIG)
    assert sparse_names(model) == ["conv"]
    x = inputs()
    model.eval()
    with torch.no_grad():
        masked = model.conv.effective_weight()  # [in, out], N:M along dim 0
        torch.testing.assert_close(model(x), 2 * (x @ masked) + model.conv.bias)
    assert_finalize_keeps_the_output(model)


def test_a_grandchild_read_stays_sparse():
    model = GrandchildRead()
    sparsify(model, CONFIG)
    assert sparse_names(model) == ["block.proj", "other"]
    assert exposed_names(model) == {"block.proj"}
    assert_finalize_keeps_the_output(model)


def test_nested_readers_expose_once():
    """The grandparent exposes `block.proj`; a parent reading it too leaves that exposure alone."""

    class ReadingBlock(Block):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.proj.weight.t() + self.proj(x)

    model = GrandchildRead()
    model.block = ReadingBlock()
    model.block.load_state_dict(Block().state_dict())
    sparsify(model, SparsityConfig(n=2, m=4, method="s-ste"))
    seen = []
    model.block.register_forward_hook(lambda module, args, out: seen.append(vars(module.proj).get("weight")))
    x = inputs()
    out = model(x)
    assert seen[0] is not None and "weight" not in vars(model.block.proj)  # still exposed after the parent ran
    weight = model.block.proj.forward_tensor()
    expected = model.other(x) + 3 * (x @ weight.t()) + model.block.proj.bias
    torch.testing.assert_close(out, expected)


def test_an_exception_in_the_reader_leaves_nothing_exposed():
    model = sparsify(LookupTable(), CONFIG)
    model.fail = True
    with pytest.raises(RuntimeError, match="the reader failed"):
        model(inputs())
    assert "weight" not in vars(model.table) and isinstance(model.table.weight, nn.Parameter)
    model.fail = False
    assert_finalize_keeps_the_output(model)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_exposes_its_own_layers(how):
    model = sparsify(LookupTable(), CONFIG)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        twin.table.weight.mul_(-3.0)  # the copy's own table: its output must follow it
    model.eval()
    twin.eval()
    with torch.no_grad():
        before = model(inputs())
        assert not torch.equal(twin(inputs()), before)
    assert sparse_names(twin) == ["proj", "table"] and exposed_names(twin) == {"table"}
    assert_finalize_keeps_the_output(twin)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs()), before, rtol=0, atol=0)  # the original is untouched
    assert_finalize_keeps_the_output(model)


def test_metadata_reads_do_not_count():
    model = sparsify(MetadataReads(), CONFIG)
    assert sparse_names(model) == ["proj", "table"] and exposed_names(model) == {"table"}


@pytest.mark.parametrize("slow_path", [False, True])
def test_a_read_under_an_if_counts_only_when_the_test_may_hold(slow_path):
    model = sparsify(GuardedRead(slow_path), CONFIG)
    assert sparse_names(model) == ["proj", "table"]
    # the slow path reads `proj` and not `table` (read in the `else` only); the fast path the other way round
    assert exposed_names(model) == ({"proj"} if slow_path else {"table"})
    train_steps_plain(model)
    model.eval()
    with torch.no_grad():
        sparse = model(inputs())
        finalize(model)
        torch.testing.assert_close(model(inputs()), sparse, rtol=0, atol=0)


def test_reads_outside_what_the_forward_runs_do_not_count():
    model = sparsify(InitOnlyReads(), CONFIG)
    assert sparse_names(model) == ["proj", "table"] and exposed_names(model) == {"table"}


def test_an_interrupt_inside_the_reader_is_cleaned_up_by_its_next_call():
    """torch skips always-called hooks on a KeyboardInterrupt: the reader's next call drops what it left."""
    model = sparsify(LookupTable(), CONFIG).eval()
    with torch.no_grad():
        expected = model(inputs())
        assert not torch.equal(expected, LookupTable.forward(model, inputs()))  # the masked table, not the dense

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = model.proj.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(inputs())
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs()), expected, rtol=0, atol=0)
    assert "weight" not in vars(model.table)


def test_an_interrupted_sparsify_leaves_no_hooks(monkeypatch):
    import nm_hf.injection as injection

    real = injection.expose_weight_reads

    def expose_then_interrupt(reader, paths, **kwargs):
        real(reader, paths, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(injection, "expose_weight_reads", expose_then_interrupt)
    model = LookupTable()
    with pytest.raises(KeyboardInterrupt):
        sparsify(model, CONFIG)
    assert not sparse_names(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks or {"_nm_weight_reads", "_nm_weight_reads_name"} & vars(m).keys()
                   for m in model.modules())
