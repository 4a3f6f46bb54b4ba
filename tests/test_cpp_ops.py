"""Every compiled CPU op against its torch twin: random, odd and degenerate shapes, each dtype."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import assert_close, op_inputs, requires_cpp
from sdtm.core import reference as R
from sdtm.core.plans import Grid, idm_candidates, idm_plan, random_or_first_positions, ssm_plan

pytestmark = requires_cpp

DTYPES = [(torch.float32, 1e-5, 1e-6), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (B, grid_h, grid_w, C, sy, sx)
SHAPES = [(1, 4, 4, 1, 2, 2), (3, 5, 7, 7, 2, 2), (2, 16, 16, 64, 2, 2), (1, 9, 13, 33, 3, 3), (2, 6, 10, 1536, 2, 3),
          (1, 1, 1, 8, 2, 2)]
SHAPE_IDS = ["B{}-H{}-W{}-C{}-win{}x{}".format(*s) for s in SHAPES]


@pytest.fixture(scope="module")
def cpp():
    from sdtm.core.cpp_ops import CPP_OPS

    return CPP_OPS


def _inputs(shape, dtype, seed=0):
    return op_inputs(shape, dtype, "cpu", seed)


def _plans(grid, x, prio, g, reduce_num, pseudo):
    b = x.shape[0]
    pos = random_or_first_positions(b, grid.num_windows, grid.window_size, True, g, "cpu")
    scores = R.window_scores(x, prio, grid.height, grid.width, grid.sy, grid.sx, 0.05)
    yield ssm_plan(scores, grid, reduce_num, pos, pseudo)
    src, dst = idm_candidates(grid, pos)
    if grid.num_windows:
        score, best = R.bipartite_match(x, src, dst, prio, 0.05)
        yield idm_plan(grid, reduce_num, src, dst, score, best, pseudo)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_priority", [False, True], ids=["plain", "priority"])
def test_window_scores(cpp, shape, dtype, rtol, atol, with_priority):
    grid, x, prio, _ = _inputs(shape, dtype)
    prio = prio if with_priority else None
    args = (x, prio, grid.height, grid.width, grid.sy, grid.sx, 0.05)
    expected = R.window_scores(*args)
    actual = cpp.window_scores(*args)
    assert actual.dtype == torch.float32 and actual.shape == (x.shape[0], grid.num_windows)
    assert_close(actual, expected, rtol=1e-5, atol=1e-5, name="window_scores")


def test_window_scores_zero_tokens_score_zero(cpp):
    x = torch.zeros(1, 4, 3)
    x[0, 0] = 1.0
    assert_close(cpp.window_scores(x, None, 2, 2, 2, 2, 0.0), R.window_scores(x, None, 2, 2, 2, 2, 0.0), 1e-6)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES[:-1], ids=SHAPE_IDS[:-1])
def test_bipartite_match(cpp, shape, dtype, rtol, atol):
    grid, x, prio, g = _inputs(shape, dtype)
    pos = random_or_first_positions(x.shape[0], grid.num_windows, grid.window_size, True, g, "cpu")
    src, dst = idm_candidates(grid, pos)
    score, best = cpp.bipartite_match(x, src, dst, prio, 0.05)
    ref_score, ref_best = R.bipartite_match(x, src, dst, prio, 0.05)
    assert_close(score, ref_score, rtol=1e-5, atol=1e-5, name="score")
    # An argmax may differ only where two destinations are equally similar within rounding.
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    chosen = torch.einsum("bac,bac->ba", unit.gather(1, src[..., None].expand(-1, -1, x.shape[2])),
                          unit.gather(1, dst.gather(1, best)[..., None].expand(-1, -1, x.shape[2])))
    assert_close(chosen, (ref_score - 0.05 * prio.gather(1, src)), rtol=1e-5, atol=1e-5, name="best")


def test_bipartite_match_larger_than_one_tile(cpp):
    grid, x, prio, g = _inputs((1, 24, 48, 16, 2, 2), torch.float32)  # 288 destinations > one tile of 256
    pos = torch.zeros(1, grid.num_windows, dtype=torch.int64)
    src, dst = idm_candidates(grid, pos)
    x[0, dst[0, 280]] = x[0, src[0, 5]] * 3.0  # a best match in the second tile
    score, best = cpp.bipartite_match(x, src, dst, None, 0.0)
    ref_score, ref_best = R.bipartite_match(x, src, dst, None, 0.0)
    assert best[0, 5] == 280 and torch.equal(best, ref_best)
    assert_close(score, ref_score, 1e-5, 1e-6, name="score")


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("pseudo", [False, True], ids=["mean", "pseudo"])
@pytest.mark.parametrize("amount", ["none", "some", "all"])
def test_merge(cpp, shape, dtype, rtol, atol, pseudo, amount):
    grid, x, prio, g = _inputs(shape, dtype)
    reduce_num = {"none": 0, "some": grid.num_tokens // 3, "all": grid.num_tokens}[amount]
    for plan in _plans(grid, x, prio, g, reduce_num, pseudo):
        args = (x, plan.slot, plan.members, plan.offsets, pseudo)
        actual, expected = cpp.merge(*args), R.merge(*args)
        assert actual.dtype == dtype and actual.shape == expected.shape
        assert_close(actual, expected, rtol=rtol, atol=atol, name="merge")


def test_merge_every_token_into_one_group(cpp):
    x = torch.randn(2, 7, 5)
    slot = torch.zeros(2, 7, dtype=torch.int64)
    members = torch.arange(7).expand(2, -1).contiguous()
    offsets = torch.tensor([[0, 7], [0, 7]])
    assert_close(cpp.merge(x, slot, members, offsets, False), x.mean(1, keepdim=True), 1e-6, 1e-6, name="merge")


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("fused", ["plain", "cache", "cache+gate+residual"])
def test_unmerge(cpp, shape, dtype, rtol, atol, fused):
    grid, x, prio, g = _inputs(shape, dtype)
    for plan in _plans(grid, x, prio, g, grid.num_tokens // 2, False):
        b, n, c = x.shape
        y = torch.randn(b, plan.num_merged, c, generator=g).to(dtype)
        cache = torch.randn(b, n, c, generator=g).to(dtype) if fused != "plain" else None
        gate = torch.randn(b, c, generator=g).to(dtype) if fused == "cache+gate+residual" else None
        residual = torch.randn(b, n, c, generator=g).to(dtype) if gate is not None else None
        for store in (True, False):
            args = (y, plan.slot, plan.blend, cache, gate, residual, 0.1, store)
            (out, new_cache), (ref_out, ref_cache) = cpp.unmerge(*args), R.unmerge(*args)
            if dtype == torch.float32:  # same op order, no FMA: bit for bit
                assert torch.equal(out, ref_out) and torch.equal(new_cache, ref_cache)
            assert_close(out, ref_out, rtol=rtol, atol=atol, name="unmerge out")
            assert new_cache.shape == ref_cache.shape
            assert_close(new_cache, ref_cache, rtol=rtol, atol=atol, name="unmerge cache")


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("target", ["fresh", "in-place"])
def test_unmerge_into(cpp, shape, dtype, rtol, atol, target):
    """Writing into given tensors, including the residual itself and the cache itself, equals the
    functional twin."""
    grid, x, prio, g = _inputs(shape, dtype)
    for plan in _plans(grid, x, prio, g, grid.num_tokens // 2, False):
        b, n, c = x.shape
        y = torch.randn(b, plan.num_merged, c, generator=g).to(dtype)
        cache = torch.randn(b, n, c, generator=g).to(dtype)
        gate = torch.randn(b, c, generator=g).to(dtype)
        residual = torch.randn(b, n, c, generator=g).to(dtype)
        ref_out, ref_cache = R.unmerge(y, plan.slot, plan.blend, cache, gate, residual, 0.1, True)
        if target == "in-place":
            out, cache_out = residual, cache
        else:
            out, cache_out = torch.empty_like(residual), torch.empty_like(cache)
        assert cpp.unmerge_into(y, plan.slot, plan.blend, cache, gate, residual, 0.1, out, cache_out) is None
        if dtype == torch.float32:
            assert torch.equal(out, ref_out) and torch.equal(cache_out, ref_cache)
        assert_close(out, ref_out, rtol=rtol, atol=atol, name="unmerge_into out")
        assert_close(cache_out, ref_cache, rtol=rtol, atol=atol, name="unmerge_into cache")


def test_unmerge_without_residual_returns_the_cache_as_output(cpp):
    grid, x, prio, g = _inputs((2, 6, 8, 5, 2, 2), torch.float32)
    plan = next(_plans(grid, x, prio, g, 24, False))
    y, cache = torch.randn(2, plan.num_merged, 5, generator=g), torch.randn(2, 48, 5, generator=g)
    out, new_cache = cpp.unmerge(y, plan.slot, plan.blend, cache, None, None, 0.2, True)
    ref_out, ref_cache = R.unmerge(y, plan.slot, plan.blend, cache, None, None, 0.2, True)
    assert torch.equal(out, ref_out) and torch.equal(new_cache, ref_cache)


def test_unmerge_into_rejects_overlapping_outputs(cpp):
    slot = torch.tensor([[0, 0, 1, 1]])
    blend = torch.ones(1, 4, dtype=torch.bool)
    y, cache, residual = torch.randn(1, 2, 3), torch.randn(1, 4, 3), torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match="out shares memory with cache"):
        cpp.unmerge_into(y, slot, blend, cache, None, residual, 0.1, cache, None)
    with pytest.raises(RuntimeError, match="cache_out shares memory with residual"):
        cpp.unmerge_into(y, slot, blend, cache, None, residual, 0.1, torch.empty(1, 4, 3), residual)
    wide = torch.randn(1, 4, 6)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        cpp.unmerge_into(y, slot, blend, cache, None, residual, 0.1, wide[..., :3], None)
    with pytest.raises(RuntimeError, match="out must be \\[B=1, N=4, C=3\\]"):
        cpp.unmerge_into(y, slot, blend, cache, None, residual, 0.1, torch.empty(1, 5, 3), None)


def _modulation(b, c, dtype, g):
    return torch.randn(b, c, generator=g).to(dtype), (0.5 * torch.randn(b, c, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_norm_modulate(cpp, shape, dtype, rtol, atol):
    grid, x, prio, g = _inputs(shape, dtype)
    x = (3 * x + 1).to(dtype)  # rows with a non-zero mean
    shift, scale = _modulation(x.shape[0], x.shape[2], dtype, g)
    args = (x, shift, scale, 1e-6)
    expected = R.norm_modulate(*args)
    actual = cpp.norm_modulate(*args)
    assert actual.dtype == dtype and actual.shape == expected.shape
    # C = 1 normalises every row to exactly 0 in both; bf16 rounds the normalised value before modulating.
    assert_close(actual, expected, rtol=rtol, atol=max(atol, 2e-5), name="norm_modulate")


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("pseudo", [False, True], ids=["mean", "pseudo"])
def test_norm_modulate_merge(cpp, shape, dtype, rtol, atol, pseudo):
    grid, x, prio, g = _inputs(shape, dtype)
    shift, scale = _modulation(x.shape[0], x.shape[2], dtype, g)
    for reduce_num in (0, grid.num_tokens // 2, grid.num_tokens):
        for plan in _plans(grid, x, prio, g, reduce_num, pseudo):
            args = (x, shift, scale, 1e-6, plan.slot, plan.members, plan.offsets, pseudo)
            expected = R.norm_modulate_merge(*args)
            actual = cpp.norm_modulate_merge(*args)
            assert actual.shape == expected.shape == (x.shape[0], plan.num_merged, x.shape[2])
            assert_close(actual, expected, rtol=rtol, atol=max(atol, 2e-5), name="norm_modulate_merge")


def test_norm_modulate_rejects_bad_modulation(cpp):
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="shift must be \\[B=2, C=3\\]"):
        cpp.norm_modulate(x, torch.randn(2, 4), torch.randn(2, 3), 1e-6)
    with pytest.raises(RuntimeError, match="scale must be a CPU Float tensor"):
        cpp.norm_modulate(x, torch.randn(2, 3), torch.randn(2, 3).half(), 1e-6)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        cpp.norm_modulate(x, torch.randn(2, 3), torch.randn(2, 3), 0.0)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 40),
    channels=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    pseudo=st.booleans(),
)
def test_random_plans_round_trip(batch, tokens, channels, seed, pseudo):
    """Random groupings (not only SDTM's): merge and unmerge agree with the twins."""
    from sdtm.core.cpp_ops import CPP_OPS as cpp
    from sdtm.core.plans import _assemble

    g = torch.Generator().manual_seed(seed)
    num_groups = int(torch.randint(0, tokens + 1, (1,), generator=g))
    merged_per_sample = int(torch.randint(num_groups, tokens + 1, (1,), generator=g)) if num_groups else 0
    unmerged = torch.ones(batch, tokens, dtype=torch.bool)
    group_of = torch.zeros(batch, tokens, dtype=torch.int64)
    is_dst = torch.zeros(batch, tokens, dtype=torch.bool)
    for b in range(batch):
        chosen = torch.randperm(tokens, generator=g)[:merged_per_sample]
        unmerged[b, chosen] = False
        groups = torch.cat([torch.arange(num_groups),
                            torch.randint(0, max(num_groups, 1), (merged_per_sample - num_groups,), generator=g)])
        group_of[b, chosen] = groups
        is_dst[b, chosen[:num_groups]] = True
    plan = _assemble(tokens - merged_per_sample, unmerged, group_of, num_groups, is_dst, pseudo)
    x = torch.randn(batch, tokens, channels, generator=g)
    merged = cpp.merge(x, plan.slot, plan.members, plan.offsets, pseudo)
    assert_close(merged, R.merge(x, plan.slot, plan.members, plan.offsets, pseudo), 1e-5, 1e-6, name="merge")
    cache = torch.randn(batch, tokens, channels, generator=g)
    out, _ = cpp.unmerge(merged, plan.slot, plan.blend, cache, None, None, 0.3, False)
    ref, _ = R.unmerge(merged, plan.slot, plan.blend, cache, None, None, 0.3, False)
    assert torch.equal(out, ref)


def test_opcheck():
    from sdtm.core.cpp_ops import CPP_OPS  # noqa: F401  registers the fake implementations

    grid, x, prio, g = _inputs((2, 6, 8, 5, 2, 2), torch.float32)
    plan = next(_plans(grid, x, prio, g, 24, False))
    src, dst = idm_candidates(grid, torch.zeros(2, grid.num_windows, dtype=torch.int64))
    y = torch.randn(2, plan.num_merged, 5)
    cache, gate, residual = torch.randn(2, 48, 5), torch.randn(2, 5), torch.randn(2, 48, 5)
    cases = [
        (torch.ops.sdtm.window_scores.default, (x, prio, 6, 8, 2, 2, 0.05)),
        (torch.ops.sdtm.bipartite_match.default, (x, src, dst, prio, 0.05)),
        (torch.ops.sdtm.merge.default, (x, plan.slot, plan.members, plan.offsets, False)),
        (torch.ops.sdtm.unmerge.default, (y, plan.slot, plan.blend, cache, gate, residual, 0.1, True)),
        (torch.ops.sdtm.unmerge.default, (y, plan.slot, plan.blend, None, None, None, 0.1, False)),
        (torch.ops.sdtm.norm_modulate.default, (x, gate.expand(2, 5).contiguous(), torch.randn(2, 5), 1e-6)),
        (torch.ops.sdtm.norm_modulate_merge.default,
         (x, torch.randn(2, 5), torch.randn(2, 5), 1e-6, plan.slot, plan.members, plan.offsets, False)),
        (torch.ops.sdtm.unmerge_into.default,
         (y, plan.slot, plan.blend, cache, gate, residual, 0.1, torch.empty_like(residual), torch.empty_like(cache))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments_are_reported(cpp):
    x = torch.randn(1, 4, 3)
    slot = torch.tensor([[0, 1, 2, 3]])
    members = torch.tensor([[0, 1, 2, 3]])
    offsets = torch.tensor([[0, 1, 2, 3, 4]])
    with pytest.raises(RuntimeError, match="members must lie in"):
        cpp.merge(x, slot, torch.tensor([[0, 1, 2, 9]]), offsets, False)
    with pytest.raises(RuntimeError, match="offsets must"):
        cpp.merge(x, slot, members, torch.tensor([[0, 1, 1, 3, 4]]), False)
    with pytest.raises(RuntimeError, match="x must be \\[B, N, C\\]"):
        cpp.merge(x[0], slot, members, offsets, False)
    with pytest.raises(RuntimeError, match="int64"):
        cpp.merge(x, slot.int(), members, offsets, False)
    with pytest.raises(RuntimeError, match="slot must lie in"):
        cpp.unmerge(x, torch.tensor([[0, 1, 2, 4]]), torch.zeros(1, 4, dtype=torch.bool), None, None, None, 0.1, False)
    with pytest.raises(RuntimeError, match="cache must be"):
        cpp.unmerge(x, slot, torch.zeros(1, 4, dtype=torch.bool), torch.randn(1, 5, 3), None, None, 0.1, False)
    with pytest.raises(RuntimeError, match="does not match"):
        cpp.window_scores(x, None, 3, 3, 2, 2, 0.0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cpp.window_scores(x.double(), None, 2, 2, 2, 2, 0.0)


@requires_cpp
@pytest.mark.parametrize(
    "shape, reduce_num, pseudo",
    [((2, 8, 16, 4, 2, 2), 60, False), ((3, 13, 15, 4, 2, 2), 100, True), ((2, 16, 16, 4, 2, 3), 200, False),
     ((1, 9, 9, 4, 3, 3), 0, True), ((2, 1, 1, 4, 2, 2), 5, False), ((2, 64, 64, 4, 2, 2), 2048, False),
     ((2, 16, 16, 4, 2, 2), 10**6, True)],
    ids=["8x16", "13x15-pseudo", "16x16-win2x3", "9x9-empty", "1x1-no-window", "64x64", "all-windows"],
)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied-scores"])
def test_cpp_ssm_plan_equals_torch_plan(shape, reduce_num, pseudo, ties):
    from sdtm.core.cpp_ops import CPP_OPS

    grid, x, _, g = op_inputs(shape, torch.float32)
    scores = R.window_scores(x, None, grid.height, grid.width, grid.sy, grid.sx, 0.0)
    if ties:  # few distinct values: the order among equal scores must be the stable one
        scores = (scores * 4).round() / 4
    position = random_or_first_positions(x.shape[0], grid.num_windows, grid.window_size, True, g, x.device)
    expected = ssm_plan(scores, grid, reduce_num, position, pseudo)
    actual = CPP_OPS.ssm_plan(scores, grid, reduce_num, position, pseudo)
    for name in ("slot", "blend", "members", "offsets", "independent"):
        assert torch.equal(getattr(actual, name), getattr(expected, name).expand_as(getattr(actual, name))), name


@requires_cpp
def test_cpp_ssm_plan_opcheck():
    grid, x, _, g = op_inputs((2, 8, 12, 4, 2, 2), torch.float32)
    scores = R.window_scores(x, None, grid.height, grid.width, grid.sy, grid.sx, 0.0)
    position = random_or_first_positions(2, grid.num_windows, grid.window_size, True, g, x.device)
    torch.library.opcheck(torch.ops.sdtm.ssm_plan.default, (scores, position, 8, 12, 2, 2, 16, False))


# (B, grid_h, grid_w, C, sy, sx): square and non-square grids, grids with incomplete border windows,
# 2x3 / 3x3 / 1x1 windows, and a grid with no complete window at all.
IDM_SHAPES = [(2, 8, 16, 4, 2, 2), (3, 13, 15, 4, 2, 2), (2, 16, 16, 4, 2, 3), (1, 9, 13, 4, 3, 3),
              (3, 7, 5, 4, 3, 2), (1, 32, 32, 4, 2, 2), (2, 6, 4, 4, 1, 1), (2, 1, 1, 4, 2, 2)]
IDM_SHAPE_IDS = ["8x16", "13x15-B3", "16x16-win2x3", "9x13-win3x3", "7x5-win3x2", "32x32-B1", "6x4-win1x1",
                 "1x1-no-window"]


def _merge_age(grid, batch, g, kind):
    """None (first detail merge), or a merge age T [B, N] int32: few values (ties inside windows), or
    all equal (the first token of every window)."""
    if kind == "none":
        return None
    if kind == "constant":
        return torch.full((batch, grid.num_tokens), 3, dtype=torch.int32)
    return torch.randint(0, 3, (batch, grid.num_tokens), generator=g, dtype=torch.int32)


@requires_cpp
@pytest.mark.parametrize("shape", IDM_SHAPES, ids=IDM_SHAPE_IDS)
@pytest.mark.parametrize("age_kind", ["none", "tied", "constant"])
@pytest.mark.parametrize("draw", [False, True], ids=["first", "random"])
def test_cpp_idm_candidates_equal_torch(shape, age_kind, draw):
    from sdtm.core.cpp_ops import CPP_OPS
    from sdtm.core.ops import TORCH_OPS

    grid, x, _, g = op_inputs(shape, torch.float32)
    batch = x.shape[0]
    position = random_or_first_positions(batch, grid.num_windows, grid.window_size, draw, g, x.device)
    age = _merge_age(grid, batch, g, age_kind)
    src, dst = CPP_OPS.idm_candidates(grid, age, position)
    ref_src, ref_dst = TORCH_OPS.idm_candidates(grid, age, position)
    assert src.shape == (batch, grid.num_windows * (grid.window_size - 1)) and dst.shape == (batch, grid.num_windows)
    assert torch.equal(src, ref_src) and torch.equal(dst, ref_dst)
    if age is not None:  # with a merge age the fallback positions are neither read nor needed
        assert all(torch.equal(a, b) for a, b in zip(CPP_OPS.idm_candidates(grid, age, None), (src, dst)))


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8, torch.float32, torch.float64,
                                   torch.float16, torch.bfloat16])
def test_cpp_idm_candidates_any_merge_age_dtype(dtype):
    """argmax's rules in every dtype: the first largest wins, NaN counts as the largest."""
    from sdtm.core.cpp_ops import CPP_OPS
    from sdtm.core.ops import TORCH_OPS

    grid = Grid(9, 10, 2, 2)
    g = torch.Generator().manual_seed(1)
    age = torch.randint(0, 4, (2, grid.num_tokens), generator=g).to(dtype)
    if dtype.is_floating_point:
        age[0, ::7] = float("nan")
        age[1, 5::9] = float("inf")
    actual = CPP_OPS.idm_candidates(grid, age, None)
    expected = TORCH_OPS.idm_candidates(grid, age, None)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


@requires_cpp
@pytest.mark.parametrize(
    "shape, reduce_num",
    [((2, 8, 16, 4, 2, 2), 60), ((3, 13, 15, 4, 2, 2), 100), ((2, 16, 16, 4, 2, 3), 200), ((1, 9, 13, 4, 3, 3), 40),
     ((3, 7, 5, 4, 3, 2), 20), ((1, 32, 32, 4, 2, 2), 500), ((2, 16, 16, 4, 2, 2), 0), ((2, 16, 16, 4, 2, 2), 10**6),
     ((2, 1, 1, 4, 2, 2), 5)],
    ids=["8x16", "13x15-B3", "16x16-win2x3", "9x13-win3x3", "7x5-win3x2-B3", "32x32-B1", "none", "all-sources",
         "1x1-no-window"],
)
@pytest.mark.parametrize("pseudo", [False, True], ids=["mean", "pseudo"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied-scores"])
def test_cpp_idm_plan_equals_torch_plan(shape, reduce_num, pseudo, ties):
    from sdtm.core.cpp_ops import CPP_OPS

    grid, x, prio, g = op_inputs(shape, torch.float32)
    position = random_or_first_positions(x.shape[0], grid.num_windows, grid.window_size, True, g, x.device)
    src, dst = idm_candidates(grid, position)
    if grid.num_windows:
        score, best = R.bipartite_match(x, src, dst, prio, 0.05)
    else:  # no destination: no source either (the torch twin of bipartite_match refuses this case)
        score, best = torch.empty(src.shape), torch.empty(src.shape, dtype=torch.int64)
    if ties:  # few distinct values: the order among equal scores must be the stable one
        score = (score * 2).round() / 2
    expected = idm_plan(grid, reduce_num, src, dst, score, best, pseudo)
    actual = CPP_OPS.idm_plan(grid, reduce_num, src, dst, score, best, pseudo)
    for name in ("slot", "blend", "members", "offsets", "independent"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_idm_plan_special_scores(dtype):
    """NaN, infinities and signed zeros sort as in torch.sort, in each floating dtype."""
    from sdtm.core.cpp_ops import CPP_OPS

    grid = Grid(8, 8, 2, 2)
    g = torch.Generator().manual_seed(2)
    src, dst = idm_candidates(grid, torch.zeros(2, grid.num_windows, dtype=torch.int64))
    score = torch.randn(2, src.shape[1], generator=g).to(dtype)
    score[0, ::7], score[1, ::3], score[1, 1] = float("nan"), float("-inf"), float("inf")
    score[0, 2], score[0, 4] = -0.0, 0.0
    best = torch.randint(0, grid.num_windows, src.shape, generator=g)
    for reduce_num in (16, 32, 48):
        expected = idm_plan(grid, reduce_num, src, dst, score, best, True)
        actual = CPP_OPS.idm_plan(grid, reduce_num, src, dst, score, best, True)
        for name in ("slot", "blend", "members", "offsets", "independent"):
            assert torch.equal(getattr(actual, name), getattr(expected, name)), (name, reduce_num)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    grid_h=st.integers(1, 14),
    grid_w=st.integers(1, 14),
    sy=st.integers(1, 3),
    sx=st.integers(1, 3),
    reduce_frac=st.floats(0.0, 1.2),
    age_kind=st.sampled_from(["none", "tied", "constant"]),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    pseudo=st.booleans(),
)
def test_cpp_idm_ops_random(batch, grid_h, grid_w, sy, sx, reduce_frac, age_kind, levels, seed, pseudo):
    """Random grids, windows, merge ages and (heavily tied) scores: both ops equal the torch path."""
    from sdtm.core.cpp_ops import CPP_OPS
    from sdtm.core.ops import TORCH_OPS

    grid = Grid(grid_h, grid_w, sy, sx)
    g = torch.Generator().manual_seed(seed)
    position = random_or_first_positions(batch, grid.num_windows, grid.window_size, True, g, "cpu")
    age = _merge_age(grid, batch, g, age_kind)
    src, dst = CPP_OPS.idm_candidates(grid, age, position)
    ref_src, ref_dst = TORCH_OPS.idm_candidates(grid, age, position)
    assert torch.equal(src, ref_src) and torch.equal(dst, ref_dst)
    score = torch.randint(0, levels, src.shape, generator=g).float() / levels
    best = torch.randint(0, max(grid.num_windows, 1), src.shape, generator=g)
    reduce_num = int(reduce_frac * grid.num_tokens)
    expected = idm_plan(grid, reduce_num, src, dst, score, best, pseudo)
    actual = CPP_OPS.idm_plan(grid, reduce_num, src, dst, score, best, pseudo)
    for name in ("slot", "blend", "members", "offsets", "independent"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name


@requires_cpp
def test_cpp_idm_ops_reject_bad_arguments():
    from sdtm.core.cpp_ops import CPP_OPS  # noqa: F401  loads the ops

    grid = Grid(4, 8, 2, 2)
    src, dst = idm_candidates(grid, torch.zeros(1, 8, dtype=torch.int64))
    score, best = torch.randn(1, 24), torch.randint(0, 8, (1, 24))
    plan = torch.ops.sdtm.idm_plan
    with pytest.raises(RuntimeError, match="r must lie in"):
        plan(score, best, src, dst, 32, 25, False)
    with pytest.raises(RuntimeError, match="best must lie in"):
        plan(score, torch.full((1, 24), 8), src, dst, 32, 16, False)
    with pytest.raises(RuntimeError, match="dst_idx holds token"):
        plan(score, best, src, torch.zeros(1, 8, dtype=torch.int64), 32, 16, False)
    with pytest.raises(RuntimeError, match="is also a destination"):
        plan(score, best, torch.cat([dst, src[:, 8:]], dim=1), dst, 32, 16, False)
    with pytest.raises(RuntimeError, match="src_idx must lie in"):
        plan(score, best, src + 32, dst, 32, 16, False)
    with pytest.raises(RuntimeError, match="score, best and src_idx"):
        plan(score[:, :20], best, src, dst, 32, 16, False)
    candidates = torch.ops.sdtm.idm_candidates
    with pytest.raises(RuntimeError):  # no tensor at all: the dispatcher has no kernel to pick
        candidates(None, None, 4, 8, 2, 2)
    with pytest.raises(RuntimeError, match="dst_position must lie in"):
        candidates(None, torch.full((1, 8), 4), 4, 8, 2, 2)
    with pytest.raises(RuntimeError, match="dst_position must be \\[B, W=8\\]"):
        candidates(None, torch.zeros(1, 9, dtype=torch.int64), 4, 8, 2, 2)
    with pytest.raises(RuntimeError, match="merge_age must be a \\[B, N=32\\]"):
        candidates(torch.zeros(1, 30, dtype=torch.int32), None, 4, 8, 2, 2)


@requires_cpp
def test_cpp_idm_ops_opcheck():
    from sdtm.core.cpp_ops import CPP_OPS  # noqa: F401  registers the fake implementations

    grid, x, prio, g = op_inputs((2, 8, 12, 4, 2, 2), torch.float32)
    position = random_or_first_positions(2, grid.num_windows, grid.window_size, True, g, x.device)
    age = torch.randint(0, 3, (2, grid.num_tokens), generator=g, dtype=torch.int32)
    torch.library.opcheck(torch.ops.sdtm.idm_candidates.default, (None, position, 8, 12, 2, 2))
    torch.library.opcheck(torch.ops.sdtm.idm_candidates.default, (age, None, 8, 12, 2, 2))
    src, dst = idm_candidates(grid, position)
    score, best = R.bipartite_match(x, src, dst, prio, 0.05)
    for r, pseudo in ((16, False), (48, True), (0, False)):
        torch.library.opcheck(torch.ops.sdtm.idm_plan.default, (score, best, src, dst, grid.num_tokens, r, pseudo))
