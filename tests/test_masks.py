"""`nm_mask` against a brute-force reference: shapes, dims, n:m patterns, dtypes, ties, NaN/inf."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nm_hf.masks import (
    check_nm,
    check_transposable,
    count_changed,
    nm_group_counts,
    nm_mask,
    nm_mask_transposable,
    transposable_patterns,
)

PATTERNS = [(1, 2), (2, 4), (4, 8), (1, 4), (2, 8), (3, 4), (2, 2), (4, 4), (1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INF, NAN = math.inf, math.nan
# Values that collide a lot: signed zeros, repeated magnitudes of both signs, specials, subnormals
# (1e-40 is subnormal in float32 and flushes to 0 in float16), values that overflow float16.
SPECIALS = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, -3.0, INF, -INF, NAN, -NAN, 1e-40, -1e-40, 6e-8,
            65504.0, -1e30]


def _rank_key(value: float, index: int) -> tuple:
    """Sort key of the documented order: NaN > +-inf > larger |w|; the lower index wins ties."""
    klass = 2 if math.isnan(value) else 1 if math.isinf(value) else 0
    magnitude = 0.0 if klass else abs(value)
    return (-klass, -magnitude, index)


def reference_mask(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Brute force: Python loops over every group, sorted with `_rank_key`."""
    moved = weight.detach().cpu().movedim(dim, -1).contiguous()
    groups = moved.to(torch.float64).reshape(-1, m).tolist()  # exact for every float dtype used here
    rows = []
    for group in groups:
        keep = set(sorted(range(m), key=lambda i, g=group: _rank_key(g[i], i))[:n])
        rows.append([i in keep for i in range(m)])
    return torch.tensor(rows, dtype=torch.bool).reshape(moved.shape).movedim(-1, dim)


def reference_mask_fast(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Same order, vectorised with two stable sorts (for tensors too large for `reference_mask`)."""
    moved = weight.detach().movedim(dim, -1)
    flat = moved.to(torch.float64).reshape(-1, m)
    klass = flat.isnan().to(torch.int8) * 2 + flat.isinf().to(torch.int8)
    magnitude = torch.where(klass > 0, torch.zeros_like(flat), flat.abs())
    # lexicographic (class, magnitude) descending; stable sorts keep the lower index first on ties
    by_magnitude = torch.sort(magnitude, dim=1, descending=True, stable=True).indices
    by_class = torch.sort(klass.gather(1, by_magnitude), dim=1, descending=True, stable=True).indices
    order = by_magnitude.gather(1, by_class)[:, :n]
    mask = torch.zeros(flat.shape, dtype=torch.bool).scatter_(1, order, True)
    return mask.reshape(moved.shape).movedim(-1, dim)


def group_counts(mask: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    return mask.movedim(dim, -1).reshape(-1, m).sum(dim=1)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (NaN-safe equality)."""
    return t.contiguous().view(torch.uint8).clone()


@st.composite
def weights(draw, dtypes=DTYPES, patterns=PATTERNS, max_groups: int = 3):
    n, m = draw(st.sampled_from(patterns))
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    shape[dim] = m * draw(st.integers(1, max_groups))
    element = st.one_of(st.sampled_from(SPECIALS), st.floats(-1e4, 1e4, allow_nan=False, width=32))
    values = draw(st.lists(element, min_size=math.prod(shape), max_size=math.prod(shape)))
    weight = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape)
    if ndim >= 2 and draw(st.booleans()):  # a non-contiguous view with the same logical content
        weight = weight.transpose(0, -1).contiguous().transpose(0, -1)
    return weight, n, m, dim


@settings(max_examples=60, deadline=None)
@given(weights())
def test_matches_bruteforce_reference(case):
    weight, n, m, dim = case
    before = raw_bytes(weight)
    mask = nm_mask(weight, n, m, dim=dim)
    assert mask.dtype == torch.bool and mask.shape == weight.shape and mask.device == weight.device
    assert torch.equal(mask, reference_mask(weight, n, m, dim))
    assert (group_counts(mask, m, dim) == n).all()
    assert torch.equal(raw_bytes(weight), before), "nm_mask modified its input"


@settings(max_examples=60, deadline=None)
@given(weights(dtypes=[torch.float32, torch.bfloat16]))
def test_sign_does_not_matter(case):
    weight, n, m, dim = case
    assert torch.equal(nm_mask(weight, n, m, dim), nm_mask(-weight, n, m, dim))


@settings(max_examples=30, deadline=None)
@given(weights(patterns=[(1, 16), (7, 16), (3, 5), (5, 20), (17, 32)], max_groups=2))
def test_large_m_and_topk_fallback(case):
    """m=16 is the largest pairwise-counting case; m > 16 takes the sort-based path."""
    weight, n, m, dim = case
    mask = nm_mask(weight, n, m, dim=dim)
    assert torch.equal(mask, reference_mask(weight, n, m, dim))
    assert (group_counts(mask, m, dim) == n).all()


@settings(max_examples=30, deadline=None)
@given(weights(dtypes=[torch.float8_e4m3fn, torch.float8_e5m2]))
def test_float8(case):
    weight, n, m, dim = case
    assert torch.equal(nm_mask(weight, n, m, dim=dim), reference_mask(weight, n, m, dim))


@settings(max_examples=40, deadline=None)
@given(weights())
def test_fast_reference_agrees_with_bruteforce(case):
    """The vectorised reference used on large tensors below is itself checked here."""
    weight, n, m, dim = case
    assert torch.equal(reference_mask_fast(weight, n, m, dim), reference_mask(weight, n, m, dim))


def _tied_weight(shape, seed: int) -> torch.Tensor:
    """Few distinct magnitudes (lots of ties), signed zeros and a sprinkle of NaN/inf."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, shape, generator=g).float() * 0.5
    w = torch.where(torch.rand(shape, generator=g) < 0.5, w, -w)  # 0.0 becomes -0.0 half the time
    special = torch.rand(shape, generator=g)
    w[special < 0.002] = NAN
    w[(special >= 0.002) & (special < 0.004)] = INF
    w[(special >= 0.004) & (special < 0.006)] = -INF
    return w


@pytest.mark.parametrize(
    ("shape", "dim", "n", "m"),
    [((1024, 1040), -1, 2, 4), ((1040, 1024), 0, 2, 4), ((8, 520, 128), 1, 4, 8), ((512, 2048), 1, 1, 4)],
)
def test_large_tensors_chunked_across_threads(shape, dim, n, m):
    """Large enough to be split into chunks on the thread pool; must match the single-pass answer."""
    weight = _tied_weight(shape, seed=sum(shape))
    assert (weight == 0).any() and (torch.signbit(weight) & (weight == 0)).any()  # both signed zeros present
    mask = nm_mask(weight, n, m, dim=dim)
    assert torch.equal(mask, reference_mask_fast(weight, n, m, dim))
    assert (group_counts(mask, m, dim) == n).all()
    assert torch.equal(mask, nm_mask(weight.clone(), n, m, dim=dim))  # deterministic across runs


def test_chunked_path_under_inference_mode_and_no_grad():
    """The thread-pool workers must run in the caller's grad/inference mode."""
    weight = _tied_weight((1024, 1040), seed=1)
    expected = reference_mask_fast(weight, 2, 4)
    with torch.inference_mode():
        assert torch.equal(nm_mask(weight, 2, 4), expected)
        inference_weight = weight.clone()
        assert torch.equal(nm_mask(inference_weight, 2, 4), expected)
    with torch.no_grad():
        assert torch.equal(nm_mask(weight, 2, 4), expected)
    assert torch.equal(nm_mask(weight.requires_grad_(True), 2, 4), expected)


def test_ties_go_to_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, -0.0, 0.0, -0.0], [-2.0, 2.0, 2.0, -2.0], [0.5, 1.0, -1.0, 1.0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(nm_mask(w, 2, 4), expected)
    assert torch.equal(nm_mask(w.t().contiguous(), 2, 4, dim=0), expected.t())


def test_nan_and_inf_rank_above_numbers():
    w = torch.tensor([[1e30, NAN, -INF, 5.0], [INF, 1.0, NAN, -NAN], [-INF, 1e38, 3.0, INF]])
    expected = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert torch.equal(nm_mask(w.to(dtype), 2, 4), expected), dtype
    assert torch.equal(nm_mask(w, 1, 4), torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))


def test_n_equals_m_keeps_everything():
    w = torch.tensor([[0.0, -0.0, NAN, 1.0]])
    assert nm_mask(w, 4, 4).all() and nm_mask(w, 1, 1).all() and nm_mask(w, 2, 2).all()


def test_meta_and_empty_tensors():
    meta = nm_mask(torch.empty(8, 16, device="meta"), 2, 4)
    assert meta.device.type == "meta" and meta.shape == (8, 16) and meta.dtype == torch.bool
    assert nm_mask(torch.empty(0, 8), 2, 4).shape == (0, 8)
    assert nm_mask(torch.empty(8, 0), 2, 4, dim=0).shape == (8, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(weight=torch.randn(4, 6), n=2, m=4), ValueError, "size 6 along dim -1.*not divisible by m=4"),
        (dict(weight=torch.randn(6, 8), n=2, m=4, dim=0), ValueError, "size 6 along dim 0.*not divisible"),
        (dict(weight=torch.randn(4, 8), n=0, m=4), ValueError, "1 <= n <= m"),
        (dict(weight=torch.randn(4, 8), n=5, m=4), ValueError, "1 <= n <= m"),
        (dict(weight=torch.randn(4, 8), n=-1, m=4), ValueError, "1 <= n <= m"),
        (dict(weight=torch.randn(4, 8), n=1, m=0), ValueError, "1 <= n <= m"),
        (dict(weight=torch.randn(4, 8), n=2.0, m=4), TypeError, "integers"),
        (dict(weight=torch.randn(4, 8), n=True, m=4), TypeError, "integers"),
        (dict(weight=torch.randn(4, 8), n=2, m="4"), TypeError, "integers"),
        (dict(weight=torch.ones(4, 8, dtype=torch.int32), n=2, m=4), TypeError, "floating-point"),
        (dict(weight=torch.ones(4, 8, dtype=torch.int8), n=4, m=4), TypeError, "floating-point"),
        (dict(weight=torch.ones(4, 8, dtype=torch.bool), n=2, m=4), TypeError, "floating-point"),
        (dict(weight=torch.randn(4, 8), n=2, m=4, dim=2), ValueError, "out of range"),
        (dict(weight=torch.tensor(1.0), n=1, m=1), ValueError, "at least one dimension"),
        (dict(weight=[[1.0, 2.0]], n=1, m=2), TypeError, "torch.Tensor"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        nm_mask(**kwargs)


def test_check_nm_and_group_counts():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    assert not check_nm(w, 2, 4)
    pruned = w * nm_mask(w, 2, 4)
    assert check_nm(pruned, 2, 4) and check_nm(pruned, 3, 4) and not check_nm(pruned, 1, 4)
    assert torch.equal(nm_group_counts(pruned, 4), torch.full((16 * 8,), 2))
    assert not check_nm(pruned, 2, 4, dim=0)  # the groups run along dim 1 only
    column_pruned = w * nm_mask(w, 2, 4, dim=0)
    assert check_nm(column_pruned, 2, 4, dim=0) and not check_nm(column_pruned, 2, 4, dim=1)
    assert not check_nm(torch.zeros(4, 6), 2, 4)  # 6 is not divisible by 4: cannot be 2:4
    with pytest.raises(ValueError, match="not divisible"):
        nm_group_counts(torch.zeros(4, 6), 4)


# --------------------------------------------------------------------------- transposable masks

TRANSPOSABLE = [(1, 2), (1, 4), (2, 4), (3, 4)]


def _all_block_patterns(n: int, m: int, exact: bool = True) -> torch.Tensor:
    """Brute force, independent of the library: every m x m 0/1 matrix with n (or at most n) ones per row and column."""
    cells = torch.arange(2 ** (m * m))
    bits = ((cells.unsqueeze(1) >> torch.arange(m * m)) & 1).bool().reshape(-1, m, m)
    rows, cols = bits.sum(2), bits.sum(1)
    valid = ((rows == n) & (cols == n)).all(1) if exact else ((rows <= n) & (cols <= n)).all(1)
    return bits[valid]


def _best_kept(block: torch.Tensor, patterns: torch.Tensor) -> float:
    return float((patterns.double() * block.double().abs()).sum((1, 2)).max())


def _blocks(t: torch.Tensor, m: int) -> torch.Tensor:
    """[..., R, C] -> [k, m, m] blocks."""
    rows, cols = t.shape[-2:]
    return t.reshape(-1, rows // m, m, cols // m, m).permute(0, 1, 3, 2, 4).reshape(-1, m, m)


@pytest.mark.parametrize(("n", "m", "count"), [(1, 2, 2), (1, 4, 24), (2, 4, 90), (3, 4, 24)])
def test_transposable_patterns_are_all_the_exact_ones(n, m, count):
    patterns = transposable_patterns(n, m)
    brute = _all_block_patterns(n, m).reshape(-1, m * m)
    assert patterns.shape[0] == count == brute.shape[0]
    assert {tuple(p.tolist()) for p in patterns} == {tuple(p.tolist()) for p in brute}


def test_a_loose_pattern_that_no_exact_pattern_contains():
    """Why the docs say "exactly n": for 2:4 some at-most-2 patterns cannot be completed."""
    loose = torch.zeros(4, 4, dtype=torch.bool)
    loose[0, [0, 1]] = loose[1, [0, 2]] = loose[2, [1, 2]] = loose[3, 3] = True
    exact = transposable_patterns(2, 4)
    assert not ((loose.flatten() & ~exact) .sum(1) == 0).any()
    assert any(torch.equal(p, loose) for p in _all_block_patterns(2, 4, exact=False))


@st.composite
def transposable_weights(draw):
    n, m = draw(st.sampled_from(TRANSPOSABLE))
    batch = draw(st.sampled_from([(), (2,)]))
    rows, cols = m * draw(st.integers(1, 3)), m * draw(st.integers(1, 3))
    shape = (*batch, rows, cols)
    element = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -3.0]),
                        st.floats(-100, 100, allow_nan=False, width=32))
    values = draw(st.lists(element, min_size=math.prod(shape), max_size=math.prod(shape)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    weight = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape)
    dim = draw(st.sampled_from([-1, -2]))
    return weight, n, m, dim


@settings(max_examples=80, deadline=None)
@given(transposable_weights())
def test_transposable_mask_is_valid_and_keeps_the_most_magnitude(case):
    weight, n, m, dim = case
    before = raw_bytes(weight)
    mask = nm_mask_transposable(weight, n, m, dim=dim)
    assert mask.dtype == torch.bool and mask.shape == weight.shape and mask.is_contiguous()
    assert torch.equal(raw_bytes(weight), before), "nm_mask_transposable modified its input"
    blocks, kept = _blocks(weight.double(), m), _blocks(mask, m)
    assert (kept.sum(1) == n).all() and (kept.sum(2) == n).all()  # exactly n per row and column
    patterns = _all_block_patterns(n, m)  # every valid (exactly n per row and column) pattern
    for block, chosen in zip(blocks, kept, strict=True):
        best = _best_kept(block, patterns)
        got = float((chosen.double() * block.abs()).sum())
        assert got >= best * (1 - 1e-4) - 1e-12, (block, chosen)
    # N:M along both dimensions, so check_nm holds for either group dimension
    pruned = weight.double() * mask
    assert check_nm(pruned, n, m, dim=-1) and check_nm(pruned, n, m, dim=-2)


def test_transposable_mask_follows_a_transposed_layout():
    torch.manual_seed(0)
    for n, m in TRANSPOSABLE:
        w = torch.randn(4 * m, 6 * m)
        mask = nm_mask_transposable(w, n, m, dim=1)
        stored_transposed = nm_mask_transposable(w.t().contiguous(), n, m, dim=0)
        assert torch.equal(stored_transposed, mask.t()) and stored_transposed.is_contiguous()
        experts = torch.randn(3, 2 * m, 4 * m)
        batched = nm_mask_transposable(experts, n, m, dim=-1)
        for e in range(3):
            assert torch.equal(batched[e], nm_mask_transposable(experts[e], n, m, dim=-1))


def test_transposable_large_tensor_uses_threads_and_agrees():
    torch.manual_seed(1)
    w = torch.randn(1024, 1032)
    mask = nm_mask_transposable(w, 2, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(nm_mask_transposable(w, 2, 4), mask)  # one worker, one pass
    finally:
        torch.set_num_threads(threads)
    kept = _blocks(mask, 4)
    assert (kept.sum(1) == 2).all() and (kept.sum(2) == 2).all()
    with torch.inference_mode():
        assert torch.equal(nm_mask_transposable(w, 2, 4), mask)


def test_transposable_nan_and_inf_are_kept():
    w = torch.ones(4, 4) * 0.5
    w[0, 0], w[1, 2], w[2, 1], w[3, 3] = NAN, INF, -INF, 1e38
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        mask = nm_mask_transposable(w.to(dtype), 2, 4)
        assert mask[0, 0] and mask[1, 2] and mask[2, 1] and mask[3, 3], dtype
    big = torch.full((4, 4), 3e38)  # sums overflow float32: rescored without overflow
    big[0, 1] = 3.3e38
    assert nm_mask_transposable(big, 1, 4)[0, 1]


def test_transposable_under_autocast_and_on_meta():
    """Regression: under bf16 autocast the block scores came out in bf16 and their bits were misread."""
    torch.manual_seed(2)
    w = torch.randn(32, 96)
    expected = nm_mask_transposable(w, 2, 4, dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nm_mask_transposable(w, 2, 4, dim=0), expected)
    meta = nm_mask_transposable(torch.empty(8, 16, device="meta"), 2, 4)
    assert meta.device.type == "meta" and meta.shape == (8, 16) and meta.dtype == torch.bool


def test_transposable_n_equals_m_and_empty():
    assert nm_mask_transposable(torch.randn(8, 8), 4, 4).all()
    assert nm_mask_transposable(torch.randn(8, 16), 8, 8, dim=0).all()  # n == m: any m
    assert nm_mask_transposable(torch.empty(0, 8), 2, 4).shape == (0, 8)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(weight=torch.randn(8, 8), n=2, m=8), ValueError, "support 1:2, 1:4, 2:4, 3:4.*got 2:8"),
        (dict(weight=torch.randn(6, 6), n=1, m=3), ValueError, "got 1:3"),
        (dict(weight=torch.randn(8, 6), n=2, m=4), ValueError, "size 6 along dim 1.*not divisible by m=4"),
        (dict(weight=torch.randn(6, 8), n=2, m=4), ValueError, "size 6 along dim 0.*not divisible by m=4"),
        (dict(weight=torch.randn(8), n=2, m=4), ValueError, "needs a matrix"),
        (dict(weight=torch.randn(4, 8, 8), n=2, m=4, dim=0), ValueError, "one of the last two dimensions"),
        (dict(weight=torch.randn(8, 8), n=2, m=4, dim=2), ValueError, "out of range"),
        (dict(weight=torch.ones(8, 8, dtype=torch.int32), n=2, m=4), TypeError, "floating-point"),
        (dict(weight=torch.randn(8, 8), n=0, m=4), ValueError, "1 <= n <= m"),
    ],
)
def test_transposable_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        nm_mask_transposable(**kwargs)
    if error is ValueError and "support" in match:
        with pytest.raises(ValueError, match=match):
            check_transposable(kwargs["n"], kwargs["m"])


def test_count_changed_refuses_masks_it_cannot_compare():
    mask = torch.tensor([True, False, True])
    assert int(count_changed(mask, torch.tensor([True, True, True]))) == 1
    for other in (torch.tensor([[True], [False]]), mask.to(torch.uint8)):
        with pytest.raises(ValueError, match=r"count_changed: needs two boolean masks of one shape, got torch.bool "
                                             r"\(3,\) and torch\.(bool \(2, 1\)|uint8 \(3,\))"):
            count_changed(mask, other)
