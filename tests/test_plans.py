"""SSM and IDM plans, merge, unmerge and merge age on small hand-built tensors with known answers."""

import torch

import spec_oracle
from sdtm.core import reference as R
from sdtm.core.plans import (
    Grid,
    idm_candidates,
    idm_destinations,
    idm_plan,
    merge_age_priority,
    random_or_first_positions,
    ssm_plan,
    update_merge_age,
)
from sdtm.core.reference import window_tokens


def one_hot(index: int, channels: int) -> torch.Tensor:
    v = torch.zeros(channels)
    v[index] = 1.0
    return v


def test_window_tokens_row_major_with_border_left_out():
    # 3 x 5 grid, 2 x 2 windows: 2 complete windows; row 2 and column 4 are border tokens.
    assert window_tokens(3, 5, 2, 2).tolist() == [[0, 1, 5, 6], [2, 3, 7, 8]]
    # 2 rows x 3 columns windows (sy=2, sx=3) on a 4 x 6 grid
    assert window_tokens(4, 6, 2, 3).tolist()[1] == [3, 4, 5, 9, 10, 11]


def test_window_scores_known_values():
    grid = Grid(2, 4, 2, 2)  # two windows: tokens [0, 1, 4, 5] and [2, 3, 6, 7]
    x = torch.zeros(1, 8, 8)
    for t in (0, 1, 4, 5):
        x[0, t] = torch.tensor([1.0, 2.0] + [0.0] * 6)  # identical: every pair has cos 1
    for t in (2, 3, 6, 7):
        x[0, t] = one_hot(t, 8)  # orthogonal: only the 4 self-pairs count -> 4 / 16
    scores = R.window_scores(x, None, grid.height, grid.width, 2, 2, 0.05)
    assert torch.allclose(scores, torch.tensor([[1.0, 0.25]]))
    age = torch.tensor([[0, 0, 4, 4, 0, 0, 4, 4]])
    prio = merge_age_priority(age)  # mean 2 -> priority 0 or 2
    with_age = R.window_scores(x, prio, grid.height, grid.width, 2, 2, 0.5)
    assert torch.allclose(with_age, torch.tensor([[1.0, 0.25 + 0.5 * 2.0]]), atol=1e-5)


def _ssm_example():
    """8 x 16 grid (32 windows of 2 x 2); windows 0-15 of the odd list below hold identical tokens."""
    grid = Grid(8, 16, 2, 2)
    table = window_tokens(8, 16, 2, 2)
    similar = [1, 3, 4, 6, 9, 10, 12, 15, 17, 18, 20, 23, 25, 27, 28, 30]
    x = torch.zeros(1, 128, 160)
    for w in range(32):
        for t in table[w].tolist():
            x[0, t] = one_hot(w, 160) if w in similar else one_hot(32 + t, 160)
    return grid, table, similar, x


def test_ssm_plan_merges_most_similar_windows_by_hand():
    grid, table, similar, x = _ssm_example()
    scores = R.window_scores(x, None, 8, 16, 2, 2, 0.0)
    first = random_or_first_positions(1, 32, 4, False, None, "cpu")
    plan = ssm_plan(scores, grid, reduce_num=60, dst_position=first, pseudo_merge=False)  # 60 // 3 // 16 = 1
    merged_tokens = {t for w in similar for t in table[w].tolist()}
    unmerged = [t for t in range(128) if t not in merged_tokens]
    assert plan.num_merged == 64 + 16
    # Unmerged tokens keep token order in rows 0..63; groups follow in window order.
    for row, t in enumerate(unmerged):
        assert plan.slot[0, t] == row and not plan.blend[0, t]
    for rank, w in enumerate(similar):
        tokens = table[w].tolist()
        assert all(plan.slot[0, t] == 64 + rank for t in tokens)
        assert plan.members[0, plan.offsets[0, 64 + rank] : plan.offsets[0, 65 + rank]].tolist() == tokens
        assert all(plan.blend[0, t] for t in tokens)
    assert plan.independent[0].nonzero().flatten().tolist() == unmerged


def test_ssm_random_destination_comes_first_and_pseudo_merge_keeps_it():
    grid, table, similar, x = _ssm_example()
    scores = R.window_scores(x, None, 8, 16, 2, 2, 0.0)
    position = torch.full((1, 32), 2)  # third token of each window is the destination
    plan = ssm_plan(scores, grid, 60, position, pseudo_merge=True)
    group = plan.members[0, plan.offsets[0, 64] : plan.offsets[0, 65]].tolist()
    w = similar[0]
    assert group[0] == table[w, 2] and sorted(group) == sorted(table[w].tolist())
    assert plan.independent[0, table[w, 2]] and not plan.independent[0, table[w, 0]]
    values = torch.arange(128.0).view(1, 128, 1)
    merged = R.merge(values, plan.slot, plan.members, plan.offsets, pseudo_merge=True)
    assert merged[0, 64, 0] == table[w, 2]


def test_idm_plan_by_hand():
    grid = Grid(8, 8, 2, 2)  # 16 windows, 48 source candidates
    table = window_tokens(8, 8, 2, 2)
    age = torch.zeros(1, 64, dtype=torch.int32)
    age[0, table[:, 3]] = 5  # the last token of every window is the oldest -> destination
    dst_position = idm_destinations(grid, age, None)
    assert dst_position.tolist() == [[3] * 16]
    src_idx, dst_idx = idm_candidates(grid, dst_position)
    assert dst_idx[0].tolist() == table[:, 3].tolist()
    assert src_idx[0, :6].tolist() == table[0, :3].tolist() + table[1, :3].tolist()

    x = torch.zeros(1, 64, 128)
    for j in range(16):
        x[0, table[j, 3]] = one_hot(j, 128)
    # First source of window w matches the destination of window (w + 5) % 16; the others match nothing.
    for w in range(16):
        x[0, table[w, 0]] = one_hot((w + 5) % 16, 128) + 0.01 * one_hot(16 + w, 128)
        x[0, table[w, 1]] = one_hot(40 + w, 128)
        x[0, table[w, 2]] = one_hot(80 + w, 128)
    score, best = R.bipartite_match(x, src_idx, dst_idx, None, 0.0)
    plan = idm_plan(grid, 20, src_idx, dst_idx, score, best, pseudo_merge=False)  # r = 16
    assert plan.num_merged == 64 - 16
    unmerged, groups = spec_oracle.canonical(plan, 0)
    expected_groups = sorted((int(table[(w + 5) % 16, 3]), [int(table[w, 0])]) for w in range(16))
    assert groups == expected_groups
    assert unmerged == sorted(table[:, 1].tolist() + table[:, 2].tolist())


def test_idm_frequency_term_changes_the_choice():
    grid = Grid(8, 8, 2, 2)
    table = window_tokens(8, 8, 2, 2)
    first = torch.zeros(1, 16, dtype=torch.int64)
    src_idx, dst_idx = idm_candidates(grid, first)
    x = torch.zeros(1, 64, 128)
    for j in range(16):
        x[0, table[j, 0]] = one_hot(j, 128)
    # 15 sure sources (cos 1), then two competitors for the 16th place: cos 0.96 (young) and 0.95 (old).
    for w in range(15):
        x[0, table[w, 1]] = one_hot(w, 128)
    young, old = int(table[15, 1]), int(table[15, 2])
    x[0, young] = one_hot(15, 128) * 0.96 + one_hot(100, 128) * (1 - 0.96**2) ** 0.5
    x[0, old] = one_hot(15, 128) * 0.95 + one_hot(101, 128) * (1 - 0.95**2) ** 0.5
    for t in range(64):
        if x[0, t].abs().sum() == 0:
            x[0, t] = one_hot(60 + t % 60, 128)
    age = torch.ones(1, 64, dtype=torch.int32)
    age[0, old] = 20
    prio = merge_age_priority(age)

    def chosen(a_d):
        score, best = R.bipartite_match(x, src_idx, dst_idx, prio, a_d)
        plan = idm_plan(grid, 16, src_idx, dst_idx, score, best, pseudo_merge=False)
        return bool(plan.blend[0, young]), bool(plan.blend[0, old])

    assert chosen(0.0) == (True, False)
    assert chosen(0.05) == (False, True)


def test_merge_and_unmerge_known_values():
    # 4 tokens: rows 0 and 1 form a group (dst 1), 2 and 3 stay.
    x = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]]])
    slot = torch.tensor([[2, 2, 0, 1]])
    members = torch.tensor([[2, 3, 1, 0]])
    offsets = torch.tensor([[0, 1, 2, 4]])
    blend = torch.tensor([[True, True, False, False]])
    merged = R.merge(x, slot, members, offsets, pseudo_merge=False)
    assert merged.tolist() == [[[5.0, 50.0], [7.0, 70.0], [2.0, 20.0]]]
    assert R.merge(x, slot, members, offsets, pseudo_merge=True)[0, 2].tolist() == [3.0, 30.0]

    y = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]])
    out, new_cache = R.unmerge(y, slot, blend, None, None, None, 0.1, store_cache=True)
    assert out.tolist() == [[[4.0, 4.0], [4.0, 4.0], [1.0, 1.0], [2.0, 2.0]]]
    assert torch.equal(new_cache, out)
    cache = torch.full((1, 4, 2), 10.0)
    gate = torch.tensor([[1.0, 0.5]])
    residual = torch.ones(1, 4, 2)
    out, new_cache = R.unmerge(y, slot, blend, cache, gate, residual, 0.25, store_cache=True)
    blended = [0.25 * 4.0 + 0.75 * 10.0, 0.25 * 2.0 + 0.75 * 10.0]  # unm rows are never blended
    assert new_cache.tolist() == [[blended, blended, [1.0, 0.5], [2.0, 1.0]]]
    assert torch.equal(out, new_cache + 1.0)
    _, empty = R.unmerge(y, slot, blend, cache, None, None, 0.1, store_cache=False)
    assert empty.numel() == 0


def test_merge_age_update():
    grid, table, similar, x = _ssm_example()
    scores = R.window_scores(x, None, 8, 16, 2, 2, 0.0)
    first = torch.zeros(1, 32, dtype=torch.int64)
    plan = ssm_plan(scores, grid, 60, first, pseudo_merge=False)
    age = update_merge_age(None, plan)  # first merge: starts at 0, +1 for merged tokens
    assert age.dtype == torch.int32
    assert age[0].tolist() == [1 if plan.blend[0, t] else 0 for t in range(128)]
    age2 = update_merge_age(age, plan)
    assert age2[0].tolist() == [2 if plan.blend[0, t] else 0 for t in range(128)]
    pseudo = ssm_plan(scores, grid, 60, first, pseudo_merge=True)
    age3 = update_merge_age(None, pseudo)
    assert age3[0, table[similar[0], 0]] == 0 and age3[0, table[similar[0], 1]] == 1
    assert merge_age_priority(None) is None
    assert torch.allclose(merge_age_priority(torch.zeros(1, 4, dtype=torch.int32)), torch.zeros(1, 4))


def test_empty_plans_keep_every_token():
    grid = Grid(4, 4, 2, 2)
    x = torch.randn(2, 16, 3)
    scores = R.window_scores(x, None, 4, 4, 2, 2, 0.0)
    plan = ssm_plan(scores, grid, 10, torch.zeros(2, 4, dtype=torch.int64), False)  # 10 // 3 < 16 windows
    assert plan.num_merged == 16 and not plan.blend.any()
    assert torch.equal(R.merge(x, plan.slot, plan.members, plan.offsets, False), x)
    src_idx, dst_idx = idm_candidates(grid, torch.zeros(2, 4, dtype=torch.int64))
    score, best = R.bipartite_match(x, src_idx, dst_idx, None, 0.0)
    idm = idm_plan(grid, 10, src_idx, dst_idx, score, best, False)  # r = 0, every dst still blends
    assert idm.num_merged == 16 and idm.blend.sum() == 8
    assert idm.blend[:, dst_idx[0]].all()


def test_window_scores_twin_matches_pairwise_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 5 * 7, 6)
    scores = R.window_scores(x, None, 5, 7, 2, 3, 0.0)
    wins = spec_oracle.windows(5, 7, 2, 3)
    for b in range(2):
        for w, tokens in enumerate(wins):
            expected = sum(spec_oracle.cosine(x[b, i], x[b, j]) for i in tokens for j in tokens) / 36
            assert abs(scores[b, w].item() - expected) < 1e-5
