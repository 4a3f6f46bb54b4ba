"""window_scores on the GPU: per complete window, the mean cosine similarity of all K*K ordered token
pairs (+ a_s * window mean of the merge-age priority), reading each token row once.

One program per (sample, window): it loads the window's K rows in BLOCK_C-wide chunks and accumulates
their Gram matrix in fp32; sum_ij G_ij / (|x_i| |x_j|) is the sum of the pairwise cosines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import COSINE_EPS, check_device, check_float


@triton.jit
def _window_scores_kernel(
    x_ptr, priority_ptr, out_ptr,
    num_tokens, channels, grid_h, grid_w, windows_x, windows_per_block, num_windows, a_s, eps,
    HAS_PRIORITY: tl.constexpr, ST: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_windows
    w = pid % num_windows
    block = w // windows_per_block  # the window's first frame is block * ST
    wy = (w % windows_per_block) // windows_x
    wx = w % windows_x
    k = tl.arange(0, K_PAD)
    k_valid = k < ST * SY * SX
    frame = block * ST + k // (SY * SX)
    token = (frame * grid_h + wy * SY + (k % (SY * SX)) // SX) * grid_w + wx * SX + k % SX
    row = (b * num_tokens + token).to(tl.int64) * channels

    gram = tl.zeros((K_PAD, K_PAD), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = k_valid[:, None] & (c[None, :] < channels)
        v = tl.load(x_ptr + row[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        gram += tl.sum(v[:, None, :] * v[None, :, :], axis=2)

    eye = k[:, None] == k[None, :]
    sq_rows = tl.sum(tl.where(eye, gram, 0.0), axis=1)  # |x_i|^2
    sq_cols = tl.sum(tl.where(eye, gram, 0.0), axis=0)
    denominator = tl.sqrt(tl.maximum(sq_rows[:, None] * sq_cols[None, :], eps * eps))
    pair_valid = k_valid[:, None] & k_valid[None, :]
    cosines = tl.where(pair_valid, gram / denominator, 0.0)
    score = tl.sum(tl.sum(cosines, axis=1), axis=0) / (ST * SY * SX * ST * SY * SX)
    if HAS_PRIORITY:
        p = tl.load(priority_ptr + b * num_tokens + token, mask=k_valid, other=0.0)
        score += a_s * tl.sum(p, axis=0) / (ST * SY * SX)
    tl.store(out_ptr + pid, score)


def _block_c(k_pad: int, channels: int) -> int:
    # The [K_PAD, K_PAD, BLOCK_C] product lives in registers: keep it near 4096 values (16 per thread at
    # 4 warps), which for 2 x 2 windows means 256 channels per chunk.
    return max(16, min(triton.next_power_of_2(max(channels, 1)), 4096 // (k_pad * k_pad)))


def _make_window_scores(wrap):
    """The launcher, launching kernels through ``wrap`` (plain in eager use, ``wrap_triton`` inside the
    custom op so torch.compile can trace them)."""

    def window_scores(
        x: torch.Tensor, priority: torch.Tensor | None, grid_h: int, grid_w: int, sy: int, sx: int, a_s: float,
        frames: int = 1, st: int = 1,
    ) -> torch.Tensor:
        """Triton twin of ``sdtm.core.reference.window_scores``: x [B, N, C] -> scores [B, W] float32."""
        check_float(x, "x")
        check_device(x, priority)
        if sy < 1 or sx < 1 or st < 1 or st * sy * sx < 2:
            raise ValueError(f"a window must hold at least 2 tokens, got st={st}, sy={sy}, sx={sx}.")
        if frames < 1 or frames * grid_h * grid_w != x.shape[1]:
            raise ValueError(f"grid {frames}x{grid_h}x{grid_w} does not match N={x.shape[1]}.")
        batch, num_tokens, channels = x.shape
        windows_x = grid_w // sx
        windows_per_block = (grid_h // sy) * windows_x
        num_windows = (frames // st) * windows_per_block
        out = torch.empty(batch, num_windows, dtype=torch.float32, device=x.device)
        if out.numel() == 0:
            return out
        x = x.contiguous()
        priority = priority.float().contiguous() if priority is not None else None
        k_pad = triton.next_power_of_2(st * sy * sx)
        wrap(_window_scores_kernel)[(batch * num_windows,)](
            x, priority if priority is not None else out, out,
            num_tokens, channels, grid_h, grid_w, windows_x, windows_per_block, num_windows, float(a_s), COSINE_EPS,
            HAS_PRIORITY=priority is not None, ST=st, SY=sy, SX=sx, K_PAD=k_pad, BLOCK_C=_block_c(k_pad, channels),
        )
        return out

    return window_scores


# Eager callers use the plain launcher: it skips the custom-op dispatch and wrap_triton's bookkeeping on
# every call (launch overhead dominates at SD3 sizes). The custom op is what torch.compile traces into.
window_scores = _make_window_scores(lambda kernel: kernel)
window_scores_op = triton_op("sdtm_triton::window_scores", _make_window_scores(wrap_triton), mutates_args=())
