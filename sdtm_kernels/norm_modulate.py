"""norm_modulate and norm_modulate_merge on the GPU: the adaptive LayerNorm of an SD3 block (LayerNorm
without affine weights, then x * (1 + scale[b]) + shift[b]), alone or fused with merge so the normalised
N-token tensor is never written.

Each program holds BLOCK_T whole output rows (BLOCK_C = next power of two >= C); row statistics are
fp32 and each normalised value, product and sum is rounded to the tensor dtype where torch's op sequence
rounds it. The merging kernel walks its rows' members (CSR, destination first) and averages in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import check_device, check_float


@triton.jit
def _modulated(x_ptr, rows, one_plus, shift, c, mask, channels, eps):
    """Modulated rows ``rows`` [BLOCK_T] of x as [BLOCK_T, BLOCK_C] in x's dtype, from fp32 statistics."""
    x = tl.load(x_ptr + rows[:, None] * channels + c[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1) / channels
    dev = tl.where(mask, xf - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=1) / channels + eps)
    normed = (dev * rstd[:, None]).to(x.dtype)
    scaled = (normed.to(tl.float32) * one_plus.to(tl.float32)).to(x.dtype)
    return (scaled.to(tl.float32) + shift.to(tl.float32)).to(x.dtype)


@triton.jit
def _load_modulation(shift_ptr, scale_ptr, b, c, mask, channels, dtype):
    """shift[b] and (1 + scale[b]) rounded to the dtype (torch forms the tensor 1 + scale), [BLOCK_T, BLOCK_C]
    for the samples ``b`` [BLOCK_T]."""
    offs = b[:, None] * channels + c[None, :]
    scale = tl.load(scale_ptr + offs, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + offs, mask=mask, other=0.0)
    return shift, (1.0 + scale.to(tl.float32)).to(dtype)


@triton.jit
def _norm_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr, num_tokens, total_rows, channels, eps,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = (rows < total_rows)[:, None] & (c < channels)[None, :]
    b = rows // num_tokens
    shift, one_plus = _load_modulation(shift_ptr, scale_ptr, b, c, mask, channels, out_ptr.dtype.element_ty)
    y = _modulated(x_ptr, rows, one_plus, shift, c, mask, channels, eps)
    tl.store(out_ptr + rows[:, None] * channels + c[None, :], y, mask=mask)


@triton.jit
def _norm_modulate_merge_kernel(
    x_ptr, shift_ptr, scale_ptr, members_ptr, offsets_ptr, out_ptr, num_tokens, num_rows, total_rows, channels,
    eps, PSEUDO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    out_rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = out_rows < total_rows
    b = out_rows // num_rows
    m = out_rows % num_rows
    c = tl.arange(0, BLOCK_C)
    mask = row_mask[:, None] & (c < channels)[None, :]
    shift, one_plus = _load_modulation(shift_ptr, scale_ptr, b, c, mask, channels, out_ptr.dtype.element_ty)
    start = tl.load(offsets_ptr + b * (num_rows + 1) + m, mask=row_mask, other=0)
    end = tl.load(offsets_ptr + b * (num_rows + 1) + m + 1, mask=row_mask, other=1)
    first = tl.load(members_ptr + b * num_tokens + start, mask=row_mask, other=0)
    acc = _modulated(x_ptr, (b * num_tokens + first).to(tl.int64), one_plus, shift, c, mask, channels,
                     eps).to(tl.float32)
    if not PSEUDO:
        # Member i of every row in the tile, for i up to the tile's largest group.
        for i in range(1, tl.max(end - start, axis=0)):
            has = row_mask & (start + i < end)
            token = tl.load(members_ptr + b * num_tokens + start + i, mask=has, other=0)
            part = _modulated(x_ptr, (b * num_tokens + token).to(tl.int64), one_plus, shift, c,
                              mask & has[:, None], channels, eps)
            acc += tl.where(has[:, None], part.to(tl.float32), 0.0)
        acc = acc / (end - start).to(tl.float32)[:, None]
    tl.store(out_ptr + out_rows.to(tl.int64)[:, None] * channels + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def _check(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> None:
    check_float(x, "x")
    check_device(x, shift, scale)
    for t, name in ((shift, "shift"), (scale, "scale")):
        if tuple(t.shape) != (x.shape[0], x.shape[2]) or t.dtype != x.dtype:
            raise ValueError(f"{name} must be {x.dtype} of shape {(x.shape[0], x.shape[2])}, got {t.dtype} of "
                             f"shape {tuple(t.shape)}.")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}.")


def _blocks(channels: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C): whole rows (SD3's C = 1536 pads to 2048 lanes, SD3.5-large's 2432 to 4096),
    and as many rows per program as keep a tile at 4096 values (16 fp32 registers per thread at 8 warps)."""
    block_c = triton.next_power_of_2(channels)
    return max(1, 4096 // block_c), block_c


def _make_norm_modulate(wrap):
    def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """Triton twin of ``sdtm.core.reference.norm_modulate``: x [B, N, C] -> [B, N, C]."""
        _check(x, shift, scale, eps)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if out.numel() == 0:
            return out
        batch, num_tokens, channels = x.shape
        block_t, block_c = _blocks(channels)
        wrap(_norm_modulate_kernel)[(triton.cdiv(batch * num_tokens, block_t),)](
            x.contiguous(), shift.contiguous(), scale.contiguous(), out, num_tokens, batch * num_tokens, channels,
            float(eps), BLOCK_T=block_t, BLOCK_C=block_c, num_warps=8,
        )
        return out

    return norm_modulate


def _make_norm_modulate_merge(wrap):
    def norm_modulate_merge(
        x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, slot: torch.Tensor,
        members: torch.Tensor, offsets: torch.Tensor, pseudo_merge: bool,
    ) -> torch.Tensor:
        """Triton twin of ``sdtm.core.reference.norm_modulate_merge``: x [B, N, C] -> [B, M, C]."""
        _check(x, shift, scale, eps)
        check_device(x, slot, members, offsets)
        batch, num_tokens, channels = x.shape
        num_rows = offsets.shape[1] - 1
        out = torch.empty(batch, num_rows, channels, dtype=x.dtype, device=x.device)
        if out.numel() == 0:
            return out
        block_t, block_c = _blocks(channels)
        wrap(_norm_modulate_merge_kernel)[(triton.cdiv(batch * num_rows, block_t),)](
            x.contiguous(), shift.contiguous(), scale.contiguous(), members.contiguous(), offsets.contiguous(), out,
            num_tokens, num_rows, batch * num_rows, channels, float(eps), PSEUDO=bool(pseudo_merge),
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=8,
        )
        return out

    return norm_modulate_merge


# Eager callers use the plain launchers; the custom ops are what torch.compile traces into.
norm_modulate = _make_norm_modulate(lambda kernel: kernel)
norm_modulate_op = triton_op("sdtm_triton::norm_modulate", _make_norm_modulate(wrap_triton), mutates_args=())
norm_modulate_merge = _make_norm_modulate_merge(lambda kernel: kernel)
norm_modulate_merge_op = triton_op("sdtm_triton::norm_modulate_merge", _make_norm_modulate_merge(wrap_triton),
                                   mutates_args=())
