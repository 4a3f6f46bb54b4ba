"""A slow, loop-by-loop transcription of SPEC sections 3a, 4 and 5, used to check the vectorised plans.

Plans are compared in a canonical form per sample: (sorted unmerged tokens, sorted (dst, sorted srcs)).
Randomness is off (destinations: first token / largest merge age).
"""

from __future__ import annotations

import math

import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.dot(a, b) / max(float(a.norm() * b.norm()), 1e-8))


def windows(grid_h, grid_w, sy, sx):
    out = []
    for wy in range(grid_h // sy):
        for wx in range(grid_w // sx):
            out.append([(wy * sy + dy) * grid_w + wx * sx + dx for dy in range(sy) for dx in range(sx)])
    return out


def priority(age_row):
    if age_row is None:
        return None
    values = [float(v) for v in age_row]
    mean = sum(values) / len(values) + 1e-6
    return [v / mean for v in values]


def ssm(x_row, age_row, grid_h, grid_w, sy, sx, reduce_num, a_s):
    wins = windows(grid_h, grid_w, sy, sx)
    k = sy * sx
    prio = priority(age_row)
    scores = []
    for tokens in wins:
        p_sim = sum(cosine(x_row[i], x_row[j]) for i in tokens for j in tokens) / (k * k)
        if prio is not None:
            p_sim += a_s * sum(prio[t] for t in tokens) / k
        scores.append(p_sim)
    n_win = min(((reduce_num // (k - 1)) // 16) * 16, len(wins))
    chosen = sorted(range(len(wins)), key=lambda w: -scores[w])[:n_win]
    groups = [(wins[w][0], sorted(wins[w][1:])) for w in chosen]
    merged = {t for w in chosen for t in wins[w]}
    unmerged = [t for t in range(grid_h * grid_w) if t not in merged]
    return unmerged, sorted(groups)


def idm(x_row, age_row, grid_h, grid_w, sy, sx, reduce_num, a_d):
    wins = windows(grid_h, grid_w, sy, sx)
    prio = priority(age_row)
    dsts, srcs = [], []
    for tokens in wins:
        if age_row is None:
            pick = 0
        else:
            ages = [int(age_row[t]) for t in tokens]
            pick = ages.index(max(ages))
        dsts.append(tokens[pick])
        srcs.extend(t for i, t in enumerate(tokens) if i != pick)
    best, score = [], []
    for a in srcs:
        sims = [cosine(x_row[a], x_row[d]) for d in dsts]
        top = max(sims)
        best.append(sims.index(top))
        score.append(top + (a_d * prio[a] if prio is not None else 0.0))
    r = (min(len(srcs), reduce_num) // 16) * 16
    chosen = sorted(range(len(srcs)), key=lambda i: -score[i])[:r]
    members = {j: [] for j in range(len(dsts))}
    for i in chosen:
        members[best[i]].append(srcs[i])
    groups = [(dsts[j], sorted(members[j])) for j in range(len(dsts))]
    merged = set(dsts) | {srcs[i] for i in chosen}
    unmerged = [t for t in range(grid_h * grid_w) if t not in merged]
    return unmerged, sorted(groups)


def next_age(age_row, unmerged, groups, num_tokens, pseudo_merge):
    age = [0] * num_tokens if age_row is None else [int(v) for v in age_row]
    independent = set(unmerged) | ({d for d, _ in groups} if pseudo_merge else set())
    return [0 if t in independent else age[t] + 1 for t in range(num_tokens)]


def canonical(plan, sample: int):
    """The plan of one sample as (sorted unmerged tokens, sorted (dst, sorted srcs))."""
    offsets = plan.offsets[sample].tolist()
    members = plan.members[sample].tolist()
    blend = plan.blend[sample].tolist()
    unmerged, groups = [], []
    for m in range(len(offsets) - 1):
        group = members[offsets[m] : offsets[m + 1]]
        if not blend[group[0]]:
            assert len(group) == 1, "an unmerged row must hold one token"
            unmerged.append(group[0])
        else:
            groups.append((group[0], sorted(group[1:])))
    return sorted(unmerged), sorted(groups)


def mean_rows(x_row, tokens):
    return torch.stack([x_row[t].double() for t in tokens]).mean(0)


__all__ = ["ssm", "idm", "next_age", "canonical", "cosine", "windows", "mean_rows", "math"]
