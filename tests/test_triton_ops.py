"""Every Triton kernel against its torch twin (under Triton's interpreter on CPU without a GPU): each output
of the same shape and dtype as the twin's, and close to it; the tiny pipelines with backend="triton", and
GPU-only checks that skip without CUDA. No wall-clock assertion (the kernels' speed is measured in
benchmarks/test_bench_*.py)."""

import pytest
import torch

from support import SD3_SPEC, SD35_SPEC, TRITON_DEVICE, assert_close, assert_same_layout, generate, op_inputs
from support import relative_difference
from support import requires_cuda, requires_triton
from sdtm import apply_SDTM
from sdtm.core import reference as R
from sdtm.core.plans import Grid, idm_candidates, idm_plan, random_or_first_positions, ssm_plan

pytestmark = requires_triton

# bfloat16: an absolute 1/16 allows one rounding step of values near 10 (Triton's interpreter emulates
# bfloat16 arithmetic, which may round an intermediate the other way).
DTYPES = [(torch.float32, 1e-5, 1e-6), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 6.25e-2)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Small: the interpreter runs every program instance in numpy. (B, grid_h, grid_w, C, sy, sx)
SHAPES = [(1, 4, 4, 1, 2, 2), (3, 5, 7, 7, 2, 2), (2, 6, 10, 33, 2, 3), (1, 7, 9, 20, 3, 3)]
SHAPE_IDS = ["B{}-H{}-W{}-C{}-win{}x{}".format(*s) for s in SHAPES]
PLAN_FIELDS = ("slot", "blend", "members", "offsets", "independent")


@pytest.fixture(scope="module")
def triton_ops():
    from sdtm.core.ops import ops_for

    return ops_for("triton", TRITON_DEVICE)


def test_assert_close_refuses_other_shapes_and_dtypes():
    """The closeness check of every op test compares like with like: no broadcast, no silent cast."""
    x = torch.zeros(2, 5, 3)
    assert_close(x, torch.zeros(2, 5, 3), 0.0, name="same")
    with pytest.raises(AssertionError, match=r"narrow: shape \(2, 1, 3\), expected \(2, 5, 3\)"):
        assert_close(torch.zeros(2, 1, 3), x, 1e-5, name="narrow")
    with pytest.raises(AssertionError, match=r"wide: shape \(2, 5, 3\), expected \(2, 1, 3\)"):
        assert_close(x, torch.zeros(2, 1, 3), 1e-5, name="wide")
    with pytest.raises(AssertionError, match="half: dtype torch.float16, expected torch.float32"):
        assert_close(x.half(), x, 1e-2, name="half")
    with pytest.raises(AssertionError, match="index: dtype torch.int32, expected torch.int64"):
        assert_same_layout(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int64), name="index")


def _assert_plans_equal(actual, expected, context=""):
    for name in PLAN_FIELDS:
        got, want = getattr(actual, name), getattr(expected, name)
        assert_same_layout(got, want, name=f"{context}{name}")
        assert torch.equal(got, want), f"{context}{name}"


def _inputs(shape, dtype, seed=0):
    return op_inputs(shape, dtype, TRITON_DEVICE, seed)


def _plans(grid, x, prio, g, reduce_num, pseudo):
    pos = random_or_first_positions(x.shape[0], grid.num_windows, grid.window_size, True, g, x.device)
    scores = R.window_scores(x, prio, grid.height, grid.width, grid.sy, grid.sx, 0.05)
    yield ssm_plan(scores, grid, reduce_num, pos, pseudo)
    src, dst = idm_candidates(grid, pos)
    score, best = R.bipartite_match(x, src, dst, prio, 0.05)
    yield idm_plan(grid, reduce_num, src, dst, score, best, pseudo)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_window_scores(triton_ops, shape, dtype, rtol, atol):
    grid, x, prio, _ = _inputs(shape, dtype)
    for p in (None, prio):
        args = (x, p, grid.height, grid.width, grid.sy, grid.sx, 0.05)
        assert_close(triton_ops.window_scores(*args), R.window_scores(*args), 1e-5, 1e-5, name="window_scores")


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=SHAPE_IDS[1:])
def test_triton_bipartite_match(triton_ops, shape, dtype, rtol, atol):
    grid, x, prio, g = _inputs(shape, dtype)
    pos = random_or_first_positions(x.shape[0], grid.num_windows, grid.window_size, True, g, x.device)
    src, dst = idm_candidates(grid, pos)
    score, best = triton_ops.bipartite_match(x, src, dst, prio, 0.05)
    ref_score, ref_best = R.bipartite_match(x, src, dst, prio, 0.05)
    assert_close(score, ref_score, 1e-5, 1e-5, name="score")
    assert_same_layout(best, ref_best, name="best")
    # The chosen destination is a best one (ties within rounding may pick either).
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    c = x.shape[2]
    chosen = (unit.gather(1, src[..., None].expand(-1, -1, c)) * unit.gather(1, dst.gather(1, best)[..., None]
                                                                             .expand(-1, -1, c))).sum(-1)
    assert_close(chosen + 0.05 * prio.gather(1, src), ref_score, 1e-5, 1e-5, name="best")


def test_triton_bipartite_match_spans_destination_tiles(triton_ops):
    grid, x, prio, g = _inputs((1, 8, 16, 24, 2, 2), torch.float32)  # 32 destinations: 2 interpreter tiles
    src, dst = idm_candidates(grid, torch.zeros(1, grid.num_windows, dtype=torch.int64, device=x.device))
    x[0, dst[0, 30]] = x[0, src[0, 3]] * 2.0
    score, best = triton_ops.bipartite_match(x, src, dst, None, 0.0)
    ref_score, ref_best = R.bipartite_match(x, src, dst, None, 0.0)
    assert_close(score, ref_score, 1e-5, 1e-5, name="score")
    assert_same_layout(best, ref_best, name="best")
    assert best[0, 3] == 30 and torch.equal(best, ref_best)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("pseudo", [False, True], ids=["mean", "pseudo"])
def test_triton_merge(triton_ops, shape, dtype, rtol, atol, pseudo):
    grid, x, prio, g = _inputs(shape, dtype)
    for reduce_num in (0, grid.num_tokens // 2, grid.num_tokens):
        for plan in _plans(grid, x, prio, g, reduce_num, pseudo):
            args = (x, plan.slot, plan.members, plan.offsets, pseudo)
            assert_close(triton_ops.merge(*args), R.merge(*args), rtol, atol, name="merge")


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("fused", ["plain", "cache", "cache+gate+residual"])
def test_triton_unmerge(triton_ops, shape, dtype, rtol, atol, fused):
    grid, x, prio, g = _inputs(shape, dtype)
    b, n, c = x.shape
    for plan in _plans(grid, x, prio, g, n // 2, False):
        def draw(*size):
            return torch.randn(*size, generator=g).to(dtype).to(x.device)

        y = draw(b, plan.num_merged, c)
        cache = draw(b, n, c) if fused != "plain" else None
        gate = draw(b, c) if "gate" in fused else None
        residual = draw(b, n, c) if "residual" in fused else None
        for store in (True, False):
            args = (y, plan.slot, plan.blend, cache, gate, residual, 0.1, store)
            (out, new_cache), (ref_out, ref_cache) = triton_ops.unmerge(*args), R.unmerge(*args)
            assert_close(out, ref_out, rtol, atol, name="unmerge out")
            assert_close(new_cache, ref_cache, rtol, atol, name="unmerge cache")


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", ["fresh", "in-place"])
def test_triton_unmerge_into(triton_ops, dtype, rtol, atol, target):
    grid, x, prio, g = _inputs((3, 5, 7, 7, 2, 2), dtype)
    b, n, c = x.shape
    for plan in _plans(grid, x, prio, g, n // 2, False):
        def draw(*size):
            return torch.randn(*size, generator=g).to(dtype).to(x.device)

        y, cache, gate, residual = draw(b, plan.num_merged, c), draw(b, n, c), draw(b, c), draw(b, n, c)
        ref_out, ref_cache = R.unmerge(y, plan.slot, plan.blend, cache, gate, residual, 0.1, True)
        if target == "in-place":
            out, cache_out = residual, cache
        else:
            out, cache_out = torch.empty_like(residual), torch.empty_like(cache)
        triton_ops.unmerge_into(y, plan.slot, plan.blend, cache, gate, residual, 0.1, out, cache_out)
        assert_close(out, ref_out, rtol, atol, name="unmerge_into out")
        assert_close(cache_out, ref_cache, rtol, atol, name="unmerge_into cache")


def test_triton_unmerge_into_rejects_overlapping_outputs(triton_ops):
    def on(t):
        return t.to(TRITON_DEVICE)

    slot, blend = on(torch.tensor([[0, 0, 1, 1]])), on(torch.ones(1, 4, dtype=torch.bool))
    y, cache, residual = on(torch.randn(1, 2, 3)), on(torch.randn(1, 4, 3)), on(torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="out shares memory with cache"):
        triton_ops.unmerge_into(y, slot, blend, cache, None, residual, 0.1, cache, None)
    with pytest.raises(ValueError, match="cache_out shares memory with residual"):
        triton_ops.unmerge_into(y, slot, blend, cache, None, residual, 0.1, torch.empty_like(residual), residual)
    with pytest.raises(ValueError, match="out must be contiguous"):
        triton_ops.unmerge_into(y, slot, blend, cache, None, residual, 0.1, on(torch.randn(1, 4, 6))[..., :3], None)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_norm_modulate(triton_ops, shape, dtype, rtol, atol):
    grid, x, prio, g = _inputs(shape, dtype)
    b, n, c = x.shape
    shift = torch.randn(b, c, generator=g).to(dtype).to(x.device)
    scale = (0.5 * torch.randn(b, c, generator=g)).to(dtype).to(x.device)
    args = (x, shift, scale, 1e-6)
    assert_close(triton_ops.norm_modulate(*args), R.norm_modulate(*args), rtol, max(atol, 2e-5),
                 name="norm_modulate")
    for pseudo in (False, True):
        for plan in _plans(grid, x, prio, g, n // 2, pseudo):
            args = (x, shift, scale, 1e-6, plan.slot, plan.members, plan.offsets, pseudo)
            assert_close(triton_ops.norm_modulate_merge(*args), R.norm_modulate_merge(*args), rtol, max(atol, 2e-5),
                         name="norm_modulate_merge")


def test_triton_ops_reject_bad_input(triton_ops):
    x = torch.randn(1, 4, 3, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        triton_ops.window_scores(x, None, 3, 3, 2, 2, 0.0)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        triton_ops.window_scores(x.double(), None, 2, 2, 2, 2, 0.0)
    with pytest.raises(ValueError, match="cache must be"):
        triton_ops.unmerge(x, torch.zeros(1, 4, dtype=torch.int64, device=x.device),
                           torch.zeros(1, 4, dtype=torch.bool, device=x.device), torch.randn(1, 5, 3, device=x.device),
                           None, None,
                           0.1, False)


@pytest.mark.parametrize("model", ["sd3", "sd35"])
def test_triton_pipeline_equals_torch(sd3_pipe, sd35_pipe, model):
    pipe, spec = (sd3_pipe, SD3_SPEC) if model == "sd3" else (sd35_pipe, SD35_SPEC)
    device = TRITON_DEVICE
    pipe.to(device)
    try:
        apply_SDTM(pipe, backend="torch", switch_step=2)
        reference = generate(pipe, spec, num_inference_steps=5, height=24, width=40)
        apply_SDTM(pipe, backend="triton", switch_step=2)
        fused = generate(pipe, spec, num_inference_steps=5, height=24, width=40)
    finally:
        pipe.to("cpu")
    assert relative_difference(fused, reference) <= 1e-5


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_gpu_large_shapes(triton_ops, dtype):
    """SD3 at 1024 x 1024 (B=2, N=4096, C=1536) on the GPU against the twins."""
    g = torch.Generator().manual_seed(0)
    grid = Grid(64, 64, 2, 2)
    x = torch.randn(2, 4096, 1536, generator=g).to("cuda", dtype)
    prio = torch.rand(2, 4096, generator=g).cuda()
    args = (x, prio, 64, 64, 2, 2, 0.05)
    assert_close(triton_ops.window_scores(*args), R.window_scores(*args), 1e-4, 1e-4, name="window_scores")
    plan = next(_plans(grid, x, prio, g, 2048, False))
    merge_args = (x, plan.slot, plan.members, plan.offsets, False)
    assert_close(triton_ops.merge(*merge_args), R.merge(*merge_args), 1e-2, 1e-2, name="merge")
    y = torch.randn(2, plan.num_merged, 1536, generator=g).to("cuda", dtype)
    cache = torch.randn(2, 4096, 1536, generator=g).to("cuda", dtype)
    un_args = (y, plan.slot, plan.blend, cache, None, x, 0.1, True)
    assert_close(triton_ops.unmerge(*un_args)[0], R.unmerge(*un_args)[0], 1e-2, 1e-2, name="unmerge")


def test_triton_custom_ops_match_the_launchers():
    """torch.ops.sdtm_triton.* (what torch.compile sees) compute what the eager launchers compute."""
    from sdtm_kernels.registry import TRITON_OPS

    grid, x, prio, g = _inputs((2, 4, 6, 8, 2, 2), torch.float32)
    args = (x, prio, 4, 6, 2, 2, 0.05)
    scores = torch.ops.sdtm_triton.window_scores(*args)
    assert_close(scores, R.window_scores(*args), 1e-5, 1e-5, name="window_scores")
    assert torch.equal(scores, TRITON_OPS.window_scores(*args))
    plan = next(_plans(grid, x, prio, g, 12, False))
    merge_args = (x, plan.slot, plan.members, plan.offsets, False)
    merged = torch.ops.sdtm_triton.merge(*merge_args)
    assert_close(merged, R.merge(*merge_args), 1e-5, 1e-6, name="merge")
    assert torch.equal(merged, TRITON_OPS.merge(*merge_args))


@pytest.mark.parametrize(
    "shape, reduce_num, pseudo",
    [((2, 8, 16, 4, 2, 2), 60, False), ((3, 13, 15, 4, 2, 2), 100, True), ((2, 16, 16, 4, 2, 3), 200, False),
     ((1, 9, 9, 4, 3, 3), 0, True), ((2, 1, 1, 4, 2, 2), 5, False), ((2, 64, 64, 4, 2, 2), 2048, False)],
    ids=["8x16", "13x15-pseudo", "16x16-win2x3", "9x9-empty", "1x1-no-window", "64x64"],
)
def test_triton_ssm_plan_equals_torch_plan(triton_ops, shape, reduce_num, pseudo):
    from sdtm.core.plans import ssm_plan

    grid, x, _, g = _inputs(shape, torch.float32)
    scores = R.window_scores(x, None, grid.height, grid.width, grid.sy, grid.sx, 0.0)
    position = random_or_first_positions(x.shape[0], grid.num_windows, grid.window_size, True, g, x.device)
    expected = ssm_plan(scores, grid, reduce_num, position, pseudo)
    actual = triton_ops.ssm_plan(scores, grid, reduce_num, position, pseudo)
    _assert_plans_equal(actual, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("pseudo", [False, True], ids=["mean", "pseudo"])
def test_triton_idm_plan_equals_torch_plan(triton_ops, shape, pseudo):
    grid, x, prio, g = _inputs(shape, torch.float32)
    if grid.num_windows == 0:
        pytest.skip("no complete window: the detail phase has no destination")
    position = random_or_first_positions(x.shape[0], grid.num_windows, grid.window_size, True, g, x.device)
    src, dst = idm_candidates(grid, position)
    score, best = R.bipartite_match(x, src, dst, prio, 0.05)
    for reduce_num in (0, 16, grid.num_tokens // 2, grid.num_tokens):
        expected = idm_plan(grid, reduce_num, src, dst, score, best, pseudo)
        actual = triton_ops.idm_plan(grid, reduce_num, src, dst, score, best, pseudo)
        _assert_plans_equal(actual, expected, context=f"reduce_num {reduce_num}: ")
