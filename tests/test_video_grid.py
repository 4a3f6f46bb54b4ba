"""Token grids with frames (video): windows of st frames x sy rows x sx columns, frame-major tokens.

The layout is checked against a brute-force enumeration, windows are shown never to cross a frame when
st = 1 (also when a frame's rows do not fill whole windows, as at 720p), and the compiled CPU ops and the
Triton ops equal the torch twins on such grids. Images are the 1-frame case: their layout is unchanged."""

import itertools

import pytest
import torch

from support import TRITON_DEVICE, assert_close, requires_cpp, requires_triton
from sdtm.core import reference as R
from sdtm.core.config import SDTMConfig
from sdtm.core.plans import Grid, idm_candidates, idm_destinations, idm_plan, random_or_first_positions, ssm_plan

# (frames, rows per frame, columns, st, sy, sx): odd rows per frame (45 at 720p), odd frame counts,
# temporal windows, non-square frames.
GRIDS = [(3, 5, 6, 1, 2, 2), (5, 4, 7, 1, 2, 2), (4, 6, 4, 2, 2, 2), (5, 3, 5, 2, 1, 2), (1, 7, 9, 1, 2, 2),
         (2, 1, 1, 1, 2, 2)]
GRID_IDS = ["F{}-H{}-W{}-win{}x{}x{}".format(*g) for g in GRIDS]


def _grid(spec) -> Grid:
    frames, height, width, st, sy, sx = spec
    return Grid(height, width, sy, sx, frames, st)


def _brute_force_windows(grid: Grid) -> list[list[int]]:
    """Every complete window's tokens, enumerated from the definition."""
    windows = []
    for block in range(grid.frames // grid.st):
        for wy in range(grid.height // grid.sy):
            for wx in range(grid.width // grid.sx):
                tokens = []
                for dt, dy, dx in itertools.product(range(grid.st), range(grid.sy), range(grid.sx)):
                    frame, row, col = block * grid.st + dt, wy * grid.sy + dy, wx * grid.sx + dx
                    tokens.append((frame * grid.height + row) * grid.width + col)
                windows.append(tokens)
    return windows


@pytest.mark.parametrize("spec", GRIDS, ids=GRID_IDS)
def test_window_table_matches_the_definition(spec):
    grid = _grid(spec)
    table = grid.window_table("cpu")
    expected = _brute_force_windows(grid)
    assert table.shape == (grid.num_windows, grid.window_size)
    assert table.tolist() == expected
    if grid.st == 1 and grid.num_windows:  # every window lies inside one frame
        frame_of = table // (grid.height * grid.width)
        assert bool((frame_of == frame_of[:, :1]).all())


def test_one_frame_is_the_image_layout():
    """frames = st = 1 gives the table images always had (row-major windows, row-major inside)."""
    table = Grid(5, 7, 2, 2).window_table("cpu")
    assert table[:3].tolist() == [[0, 1, 7, 8], [2, 3, 9, 10], [4, 5, 11, 12]]
    assert table.shape == (6, 4)


def test_stacked_frames_equal_a_tall_image_when_rows_fill_windows():
    """With an even number of rows per frame, frames of sy x sx windows are a tall image's windows."""
    video = Grid(6, 8, 2, 2, frames=3)
    image = Grid(18, 8, 2, 2)
    assert torch.equal(video.window_table("cpu"), image.window_table("cpu"))


def test_odd_rows_per_frame_leave_each_frames_last_row_out():
    grid = Grid(5, 4, 2, 2, frames=3)
    covered = torch.zeros(grid.num_tokens, dtype=torch.bool)
    covered[grid.window_table("cpu").flatten()] = True
    rows = torch.arange(grid.num_tokens) % (grid.height * grid.width) // grid.width
    assert torch.equal(covered, rows < 4)


def test_temporal_window_size_in_config():
    assert SDTMConfig(st=2).window_size == 8
    with pytest.raises(ValueError, match="st"):
        SDTMConfig(st=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        SDTMConfig(st=1, sx=1, sy=1)
    assert SDTMConfig(st=2, sx=1, sy=1).window_size == 2


def _inputs(grid: Grid, batch=2, channels=24, seed=0, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, grid.num_tokens, channels, generator=generator)
    x[:, ::3] = x[:, 1::3][:, : x[:, ::3].shape[1]]  # some near-duplicates so windows differ in score
    age = torch.randint(0, 4, (batch, grid.num_tokens), generator=generator, dtype=torch.int32)
    priority = age.float() / (age.float().mean(dim=1, keepdim=True) + 1e-6)
    return x.to(device=device, dtype=dtype), priority.to(device), age.to(device)


def _window_args(grid: Grid):
    return grid.height, grid.width, grid.sy, grid.sx, 0.05, grid.frames, grid.st


@pytest.mark.parametrize("spec", GRIDS, ids=GRID_IDS)
def test_torch_window_scores_score_each_window(spec):
    grid = _grid(spec)
    x, priority, _ = _inputs(grid)
    scores = R.window_scores(x, priority, *_window_args(grid))
    assert scores.shape == (2, grid.num_windows)
    for w, tokens in enumerate(_brute_force_windows(grid)[:3]):
        window = torch.nn.functional.normalize(x[:, tokens], dim=-1, eps=1e-8)
        expected = (window @ window.transpose(1, 2)).mean(dim=(1, 2)) + 0.05 * priority[:, tokens].mean(-1)
        assert_close(scores[:, w], expected, rtol=1e-5, atol=1e-5, name="window score")


def _torch_plans(grid: Grid, x, priority, age, reduce_num=16, pseudo=False):
    generator = torch.Generator().manual_seed(1)
    positions = random_or_first_positions(x.shape[0], grid.num_windows, grid.window_size, True, generator, "cpu")
    scores = R.window_scores(x.cpu().float(), priority.cpu(), *_window_args(grid))
    ssm = ssm_plan(scores, grid, reduce_num, positions, pseudo)
    src, dst = idm_candidates(grid, idm_destinations(grid, age.cpu(), positions))
    return scores, positions, ssm, (src, dst)


def _assert_same_plan(actual, expected):
    for field in ("slot", "blend", "members", "offsets", "independent"):
        a, e = getattr(actual, field), getattr(expected, field)
        assert a.shape == e.shape and torch.equal(a.cpu(), e), field


@requires_cpp
@pytest.mark.parametrize("spec", GRIDS, ids=GRID_IDS)
def test_cpp_ops_equal_torch_on_video_grids(spec):
    from sdtm.core.cpp_ops import CPP_OPS

    grid = _grid(spec)
    x, priority, age = _inputs(grid)
    scores, positions, ssm, (src, dst) = _torch_plans(grid, x, priority, age)
    actual = CPP_OPS.window_scores(x, priority, *_window_args(grid))
    assert actual.shape == scores.shape and actual.dtype == torch.float32
    assert_close(actual, scores, rtol=1e-5, atol=1e-5, name="window_scores")
    _assert_same_plan(CPP_OPS.ssm_plan(scores, grid, 16, positions, False), ssm)
    cpp_src, cpp_dst = CPP_OPS.idm_candidates(grid, age, positions)
    assert torch.equal(cpp_src, src) and torch.equal(cpp_dst, dst)
    if grid.num_windows:
        score, best = R.bipartite_match(x, src, dst, priority, 0.05)
        _assert_same_plan(CPP_OPS.idm_plan(grid, 16, src, dst, score, best, True),
                          idm_plan(grid, 16, src, dst, score, best, True))


@requires_triton
@pytest.mark.parametrize("spec", GRIDS, ids=GRID_IDS)
def test_triton_ops_equal_torch_on_video_grids(spec):
    import sdtm_kernels

    ops = sdtm_kernels.TRITON_OPS
    grid = _grid(spec)
    x, priority, age = _inputs(grid)
    scores, positions, ssm, _ = _torch_plans(grid, x, priority, age)
    device = TRITON_DEVICE
    actual = ops.window_scores(x.to(device), priority.to(device), *_window_args(grid))
    assert actual.shape == scores.shape and actual.dtype == torch.float32
    assert_close(actual.cpu(), scores, rtol=1e-5, atol=1e-5, name="window_scores")
    _assert_same_plan(ops.ssm_plan(scores.to(device), grid, 16, positions.to(device), False), ssm)
