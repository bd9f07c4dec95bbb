"""Finding direct weight reads: modules whose own code reads a layer's `weight` instead of calling the layer.

Two sources: transformers' `force_accelerate_hooks(names)` declarations on a forward (Mamba's `dt_proj`), and a
static scan of the source of each module class's `forward` and the methods it calls (`self.<m>(...)`,
`super().<m>(...)`): loads of `self.<a>[.<b>...].weight` other than metadata (`.dtype`, `.shape`, ...). A read under
an `if` whose test is known, on that module instance, to go the other way is not counted (BLOOM's
`pretraining_tp` slow path with a default config). What the scan cannot see (reads through other objects, code
without source) is left to the Trainer's runtime check. `nm_hf.layers.reads` makes the found reads see the masked
weight.
"""

from __future__ import annotations

import ast
import functools
import inspect
import operator
from dataclasses import dataclass
from typing import Any

from torch import nn

from .kinds import family_kind

__all__ = ["direct_weight_reads"]


def _hook_forced_children(function: Any) -> list[str]:
    """The child names a forward wrapped by transformers' `force_accelerate_hooks(names)` declares: children whose
    weights that forward reads directly instead of calling them (Mamba's `dt_proj`, whose weight feeds a matmul
    or a fused kernel). Looked for through the `__wrapped__` chain; [] when there is no such decorator."""
    names: list[str] = []
    seen = 0
    while callable(function) and seen < 16:
        code = getattr(function, "__code__", None)
        if code is not None and code.co_name == "wrapped" and "child_module_names" in code.co_freevars \
                and code.co_filename.replace("\\", "/").endswith("transformers/integrations/accelerate.py"):
            value = function.__closure__[code.co_freevars.index("child_module_names")].cell_contents
            names += [value] if isinstance(value, str) else [n for n in value if isinstance(n, str)]
        function = getattr(function, "__wrapped__", None)
        seen += 1
    return names


@functools.cache
def _children_weights_read(cls: type) -> dict[str, str]:
    """`{child attribute: "Class.forward"}` for the children whose weight the forward of `cls` reads directly,
    bypassing the child's own forward, as declared by transformers' `force_accelerate_hooks` decorator."""
    forward = getattr(cls, "forward", None)
    where = f"{cls.__name__}.forward"
    return {child: where for child in _hook_forced_children(forward)}


#: uses of a `.weight` that read its metadata, not its values: `w.<attribute>`, `w.<method>()`, `<function>(w)`
_METADATA_ATTRIBUTES = frozenset({"dtype", "device", "shape", "ndim", "requires_grad", "is_cuda", "is_meta",
                                  "is_sparse", "is_quantized", "layout", "names"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "data_ptr", "element_size", "is_contiguous", "get_device",
                               "is_floating_point", "nelement"})
_METADATA_FUNCTIONS = frozenset({"isinstance", "hasattr", "getattr", "type", "id", "len"})
#: module attributes that change after sparsify (`model.train()`, gradient checkpointing): a guard on them is unknown
_RUNTIME_ATTRIBUTES = frozenset({"training", "gradient_checkpointing"})
_UNKNOWN = object()
_SNIPPET_CHARS = 60


@dataclass(frozen=True)
class _WeightRead:
    """A load of `self.<path>.weight` in a method reachable from a class's forward, with the `if` tests that
    must hold (`(test, truth, self name)`, outermost first, call sites' included) for the line to run."""

    path: tuple[str, ...]
    where: str
    snippet: str
    guards: tuple[tuple[ast.expr, bool, str], ...]


def _method_ast(function: Any) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The parsed source of a function (decorators unwrapped by inspect), None when unavailable."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError, IndexError):  # no source (built-in, exec'd, a file changed since import)
        return None
    if source[:1].isspace():  # an indented method: parse it as the body of an `if` (no dedent: strings keep theirs)
        source = "if 1:\n" + source
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    node = tree.body[0] if tree.body else None
    if isinstance(node, ast.If):
        node = node.body[0] if node.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _own_mro(cls: type) -> list[type]:
    """The classes of `cls`'s MRO above torch's `nn.Module` (whose own code reads no child's weight)."""
    mro = []
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        mro.append(klass)
    return mro


def _lookup_method(mro: list[type], name: str, start: int = 0) -> tuple[int, Any] | None:
    for index in range(start, len(mro)):
        if name in mro[index].__dict__:
            value = mro[index].__dict__[name]
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            return (index, value) if inspect.isfunction(value) or hasattr(value, "__wrapped__") else None
    return None


def _weight_path(node: ast.Attribute, self_name: str) -> tuple[str, ...] | None:
    """`("a", "b")` for `self.a.b.weight`, else None (`self.weight`, `x.a.weight`, `self.a[0].weight`)."""
    path = []
    value = node.value
    while isinstance(value, ast.Attribute):
        path.append(value.attr)
        value = value.value
    if not path or not (isinstance(value, ast.Name) and value.id == self_name):
        return None
    return tuple(reversed(path))


def _metadata_use(node: ast.expr, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    if isinstance(parent, ast.Attribute) and parent.value is node:
        if parent.attr in _METADATA_ATTRIBUTES:
            return True
        call = parents.get(parent)
        return parent.attr in _METADATA_METHODS and isinstance(call, ast.Call) and call.func is parent
    if isinstance(parent, ast.Call) and node in parent.args:
        return isinstance(parent.func, ast.Name) and parent.func.id in _METADATA_FUNCTIONS
    if isinstance(parent, ast.Compare):
        operands = [parent.left, *parent.comparators]
        return all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops) and any(
            isinstance(o, ast.Constant) and o.value is None for o in operands)
    return False


def _snippet(node: ast.expr, parents: dict[ast.AST, ast.AST]) -> str:
    """The expression around a `.weight` load, short: `self.t.weight.t()`, `self.t.weight[:, :k]`, `F.linear(...)`."""
    parent = parents.get(node)
    shown: ast.AST = node
    if isinstance(parent, ast.Attribute):
        shown = parent
        call = parents.get(parent)
        if isinstance(call, ast.Call) and call.func is parent:
            shown = call
    elif isinstance(parent, (ast.Subscript, ast.Call, ast.BinOp)):
        shown = parent
    text = " ".join(ast.unparse(shown).split())
    if len(text) > _SNIPPET_CHARS and isinstance(parent, ast.Call) and parent.func is not node:
        text = f"{ast.unparse(parent.func)}(..., {ast.unparse(node)}, ...)"  # an argument of a long call
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS - 3] + "..."


def _guards(node: ast.AST, parents: dict[ast.AST, ast.AST], self_name: str) -> list[tuple[ast.expr, bool, str]]:
    """The `if` / ternary tests `node` sits under (outermost first), with the truth each needs."""
    guards = []
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.If):
            if child in parent.body:
                guards.append((parent.test, True, self_name))
            elif child in parent.orelse:
                guards.append((parent.test, False, self_name))
        elif isinstance(parent, ast.IfExp) and child is not parent.test:
            guards.append((parent.test, child is parent.body, self_name))
        child, parent = parent, parents.get(parent)
    return guards[::-1]


def _scan_method(function: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[
        str, list[tuple[ast.Attribute, dict]], list[tuple[str, bool, ast.Call]], dict[ast.AST, ast.AST]] | None:
    """(self name, `.weight` loads of `self.<path>`, calls `self.<m>(...)` / `super().<m>(...)` (name, super?,
    node), parent map) of one method, None for a method without arguments."""
    arguments = [*function.args.posonlyargs, *function.args.args]
    if not arguments:
        return None
    self_name = arguments[0].arg
    parents = {child: parent for parent in ast.walk(function) for child in ast.iter_child_nodes(parent)}
    loads, calls = [], []
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and node.attr == "weight" and isinstance(node.ctx, ast.Load):
            if _weight_path(node, self_name) is not None and not _metadata_use(node, parents):
                loads.append(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == self_name:
                calls.append((node.func.attr, False, node))
            elif isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                calls.append((node.func.attr, True, node))
    return self_name, loads, calls, parents


_MAX_CALL_PATHS = 2000


@functools.cache
def _source_weight_reads(cls: type) -> tuple[_WeightRead, ...]:
    """The loads of a descendant's `.weight` (`self.<a>[.<b>...].weight`, metadata uses such as `.dtype` or
    `.shape` left out) in the source of `cls.forward` and of the methods it calls as `self.<method>(...)` /
    `super().<method>(...)`, transitively, once per call path (their guards differ). Static, per class."""
    mro = _own_mro(cls)
    found = _lookup_method(mro, "forward")
    if found is None:
        return ()
    scans: dict[Any, Any] = {}
    reads: list[_WeightRead] = []
    budget = [_MAX_CALL_PATHS]

    def visit(index: int, function: Any, guards: tuple, stack: tuple) -> None:
        if budget[0] <= 0:
            return
        budget[0] -= 1
        if function not in scans:
            tree = _method_ast(function)
            scans[function] = None if tree is None else _scan_method(tree)
        scan = scans[function]
        if scan is None:
            return
        self_name, loads, calls, parents = scan
        where = f"{mro[index].__name__}.{getattr(function, '__name__', '?')}"
        for node in loads:
            reads.append(_WeightRead(_weight_path(node, self_name), where, _snippet(node, parents),
                                     guards + tuple(_guards(node, parents, self_name))))
        for name, through_super, call in calls:
            target = _lookup_method(mro, name, index + 1 if through_super else 0)
            if target is not None and target[1] not in stack:
                visit(target[0], target[1], guards + tuple(_guards(call, parents, self_name)), stack + (target[1],))

    visit(found[0], found[1], (), (found[1],))
    return tuple(reads)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _evaluate(node: ast.expr, module: nn.Module, self_name: str) -> Any:
    """The value of a guard's test on `module`, where it is safe to know: constants, `self.<attr>...` (plain
    values), comparisons, `and` / `or` / `not`; `_UNKNOWN` for anything else (calls, names, subscripts)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Attribute):
        chain = []
        value: ast.expr = node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not (isinstance(value, ast.Name) and value.id == self_name) or _RUNTIME_ATTRIBUTES.intersection(chain):
            return _UNKNOWN
        result: Any = module
        try:
            for attr in reversed(chain):
                result = getattr(result, attr)
        except Exception:  # a missing attribute, a failing property: not evaluable
            return _UNKNOWN
        return result
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        truth = _truth(_evaluate(node.operand, module, self_name))
        return _UNKNOWN if truth is _UNKNOWN else not truth
    if isinstance(node, ast.BoolOp):
        truths = [_truth(_evaluate(v, module, self_name)) for v in node.values]
        decisive = isinstance(node.op, ast.Or)  # the truth that settles the whole expression
        if decisive in truths:
            return decisive
        return _UNKNOWN if _UNKNOWN in truths else not decisive
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, module, self_name)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, module, self_name)
            if left is _UNKNOWN or right is _UNKNOWN:
                return _UNKNOWN
            if isinstance(op, (ast.Is, ast.IsNot)):
                holds = (left is right) == isinstance(op, ast.Is)
            elif not (_plain(left) and _plain(right)):
                return _UNKNOWN
            else:
                try:
                    holds = _COMPARISONS[type(op)](left, right)
                except (KeyError, TypeError):
                    return _UNKNOWN
            if not holds:
                return False
            left = right
        return True
    return _UNKNOWN


_COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
                ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
                ast.NotIn: lambda a, b: a not in b}


def _truth(value: Any) -> Any:
    if value is _UNKNOWN:
        return _UNKNOWN
    if _plain(value) or isinstance(value, (tuple, list, dict)):
        return bool(value)
    return _UNKNOWN


def _reachable(read: _WeightRead, module: nn.Module) -> bool:
    """False when one of the read's guards is known, on this module, to go the other way."""
    for test, needed, self_name in read.guards:
        truth = _truth(_evaluate(test, module, self_name))
        if truth is not _UNKNOWN and truth != needed:
            return False
    return True


def module_at(module: nn.Module, path: tuple[str, ...]) -> nn.Module | None:
    """The submodule at `path` (names in `_modules`, no attribute lookups that could run code), else None."""
    for name in path:
        module = module._modules.get(name)
        if module is None:
            return None
    return module


def direct_weight_reads(model: nn.Module) -> dict[str, dict[tuple[str, ...], str]]:
    """`{reading module name: {path of a layer under it: where}}` for layers whose weight code above them reads
    directly instead of calling the layer: declared with transformers' `force_accelerate_hooks`, or found in the
    source of a module's forward and the methods it calls (`_source_weight_reads`; a read under an `if` whose test
    is known false on that module is not taken). A mask applied in the layer's forward would not reach that
    computation: `sparsify` exposes the masked weight to the reading module while it runs
    (`nm_hf.layers.reads`)."""
    found: dict[str, dict[tuple[str, ...], str]] = {}
    for parent_name, parent in model.named_modules():
        reads: dict[tuple[str, ...], str] = {}
        for child, where in _children_weights_read(type(parent)).items():
            module = parent._modules.get(child)
            if module is not None and family_kind(module) is not None:
                reads[(child,)] = f"{where} (declared with transformers' force_accelerate_hooks)"
        for read in _source_weight_reads(type(parent)):
            if read.path in reads:
                continue
            module = module_at(parent, read.path)
            if module is not None and family_kind(module) is not None and _reachable(read, parent):
                reads[read.path] = f"{read.where} (`{read.snippet}`)"
        if reads:
            found[parent_name] = reads
    return found
