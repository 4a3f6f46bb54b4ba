"""Pure-torch twins of the four fused SDTM ops: readable, fp32 inside, the ground truth of every kernel.

Each function has the signature of its compiled counterpart (``torch.ops.sdtm.<name>``) and follows the
SPEC's definition literally. Shapes: B batch, N image tokens, C channels, W complete windows of K tokens,
M merged tokens, A / D source / destination candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .caching import eager_cache

COSINE_EPS = 1e-8  # the eps of torch.nn.functional.cosine_similarity


@eager_cache(maxsize=64)
def window_tokens(
    grid_h: int, grid_w: int, sy: int, sx: int, device=None, frames: int = 1, st: int = 1
) -> torch.Tensor:
    """Token indices of the complete windows, in window order and position order inside each window.

    The grid is ``frames`` frames of grid_h x grid_w tokens, frame-major (token n = (frame * grid_h + row)
    * grid_w + col); a window is st frames x sy rows x sx columns. Windows are ordered by frame block,
    then row-major inside a frame; positions by frame, then row-major. Images have frames = st = 1.
    Returns [W, K] int64 with W = (frames // st) * (grid_h // sy) * (grid_w // sx), K = st * sy * sx.
    Tokens of incomplete border windows (the last rows and columns of every frame, the last frames) appear
    nowhere. Cached per grid and device: treat as read-only.
    """
    frame_tokens = grid_h * grid_w
    blocks = torch.arange(frames // st * st, device=device).view(frames // st, 1, 1, st, 1, 1) * frame_tokens
    rows = torch.arange(grid_h // sy * sy, device=device).view(1, grid_h // sy, 1, 1, sy, 1) * grid_w
    cols = torch.arange(grid_w // sx * sx, device=device).view(1, 1, grid_w // sx, 1, 1, sx)
    tokens = blocks + rows + cols  # [wt, wy, wx, dt, dy, dx]
    return tokens.reshape(-1, st * sy * sx)


def window_scores(
    x: torch.Tensor,
    priority: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    sy: int,
    sx: int,
    a_s: float,
    frames: int = 1,
    st: int = 1,
) -> torch.Tensor:
    """SSM window score: mean cosine similarity over all K*K ordered token pairs of each window
    (self-pairs included) plus ``a_s`` times the window mean of ``priority``.

    Args:
        x: [B, N, C] tokens on ``frames`` frames of grid_h x grid_w (N = frames * grid_h * grid_w);
            windows st x sy x sx (``window_tokens``).
        priority: [B, N] float32 merge-age priority ``T / (mean(T) + 1e-6)``, or None for none.
    Returns:
        [B, W] float32 scores, in window order.
    """
    table = window_tokens(grid_h, grid_w, sy, sx, x.device, frames, st)
    k = table.shape[1]
    windows = x.float()[:, table]  # [B, W, K, C]
    sims = F.cosine_similarity(windows.unsqueeze(3), windows.unsqueeze(2), dim=-1, eps=COSINE_EPS)
    scores = sims.sum(dim=(-1, -2)) / (k * k)  # [B, W]
    if priority is not None:
        scores = scores + a_s * priority.float()[:, table].mean(-1)
    return scores


def bipartite_match(
    x: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    priority: torch.Tensor | None,
    a_d: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IDM matching: for every source its best destination by cosine similarity.

    Args:
        x: [B, N, C] tokens.
        src_idx: [B, A] int64 token indices of the source candidates.
        dst_idx: [B, D] int64 token indices of the destinations.
        priority: [B, N] float32 merge-age priority, or None.
    Returns:
        score: [B, A] float32, ``max_d cos(x_a, x_d) + a_d * priority[a]``.
        best: [B, A] int64, the argmax d (position in dst_idx; first on ties).
    """
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    channels = x.shape[-1]
    src = unit.gather(1, src_idx.unsqueeze(-1).expand(-1, -1, channels))
    dst = unit.gather(1, dst_idx.unsqueeze(-1).expand(-1, -1, channels))
    sims = src @ dst.transpose(1, 2)  # [B, A, D]
    if sims.shape[-1] == 0:
        raise ValueError("bipartite_match needs at least one destination token.")
    score = sims.amax(dim=-1)
    best = sims.argmax(dim=-1)  # documented to return the first maximum
    if priority is not None:
        score = score + a_d * priority.float().gather(1, src_idx)
    return score, best


def merge(
    x: torch.Tensor,
    slot: torch.Tensor,
    members: torch.Tensor,
    offsets: torch.Tensor,
    pseudo_merge: bool,
) -> torch.Tensor:
    """Merge tokens into their groups: each merged row is the mean of its members (fp32 sum), or the
    group's first member (its destination) with ``pseudo_merge``.

    Args:
        x: [B, N, C].
        slot: [B, N] int64, the merged row of each token.
        members: [B, N] int64, token indices grouped by slot, each group's destination first.
        offsets: [B, M + 1] int64, group m is members[b, offsets[b, m]:offsets[b, m + 1]].
    Returns:
        [B, M, C] in x's dtype.
    """
    batch, _, channels = x.shape
    num_merged = offsets.shape[1] - 1
    if pseudo_merge:
        first = members.gather(1, offsets[:, :-1])
        return x.gather(1, first.unsqueeze(-1).expand(-1, -1, channels))
    sums = torch.zeros(batch, num_merged, channels, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, channels), x.float())
    counts = (offsets[:, 1:] - offsets[:, :-1]).unsqueeze(-1)
    return (sums / counts).to(x.dtype)


def unmerge(
    y: torch.Tensor,
    slot: torch.Tensor,
    blend: torch.Tensor,
    cache: torch.Tensor | None,
    gate: torch.Tensor | None,
    residual: torch.Tensor | None,
    mcw: float,
    store_cache: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmerge a sub-layer's output back to all tokens, blending merged tokens with the cache.

    ``u[b, n] = g * y[b, slot[b, n]]`` (g = gate[b] if given, else 1); where ``blend[b, n]`` and a cache
    exists, ``u[b, n] = mcw * u[b, n] + (1 - mcw) * cache[b, n]``.

    Args:
        y: [B, M, C] the sub-layer output on merged tokens.
        slot: [B, N] int64. blend: [B, N] bool (dst and src tokens).
        cache: [B, N, C] previous full output of this sub-layer, or None.
        gate: [B, C] multiplied into y first, or None.
        residual: [B, N, C] added to the result, or None.
    Returns:
        out: [B, N, C], ``residual + u`` (or ``u``).
        new_cache: ``u`` as [B, N, C] when ``store_cache``, else an empty tensor.
    """
    if gate is not None:
        y = gate.unsqueeze(1) * y
    u = y.gather(1, slot.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    if cache is not None:
        blended = mcw * u + (1.0 - mcw) * cache
        u = torch.where(blend.unsqueeze(-1), blended, u)
    out = u if residual is None else residual + u
    new_cache = u if store_cache else u.new_empty(0)
    return out, new_cache


def unmerge_into(
    y: torch.Tensor,
    slot: torch.Tensor,
    blend: torch.Tensor,
    cache: torch.Tensor | None,
    gate: torch.Tensor | None,
    residual: torch.Tensor | None,
    mcw: float,
    out: torch.Tensor,
    cache_out: torch.Tensor | None,
) -> None:
    """``unmerge`` writing into given tensors: ``out`` [B, N, C] gets the output and ``cache_out``
    [B, N, C] (if given) the new cache. ``out`` may be ``residual`` itself and ``cache_out`` may be
    ``cache`` itself: a block then updates its residual stream and its cache in place."""
    result, new_cache = unmerge(y, slot, blend, cache, gate, residual, mcw, cache_out is not None)
    out.copy_(result)
    if cache_out is not None:
        cache_out.copy_(new_cache)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The adaptive LayerNorm of an SD3 block: LayerNorm without affine weights, then modulation.

    Args:
        x: [B, N, C]. shift, scale: [B, C].
    Returns:
        [B, N, C], ``layer_norm(x) * (1 + scale) + shift`` (diffusers' op sequence).
    """
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def norm_modulate_merge(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    slot: torch.Tensor,
    members: torch.Tensor,
    offsets: torch.Tensor,
    pseudo_merge: bool,
) -> torch.Tensor:
    """``merge(norm_modulate(x, shift, scale, eps), ...)``: [B, N, C] -> [B, M, C]."""
    return merge(norm_modulate(x, shift, scale, eps), slot, members, offsets, pseudo_merge)
