"""merge on the GPU: gather + group mean in one pass, written straight into the [B, M, C] output.

One program per (sample, merged row, channel block) walks the row's members (CSR: members[offsets[m]:
offsets[m + 1]], destination first) and sums them in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import check_device, check_float


@triton.jit
def _merge_kernel(
    x_ptr, members_ptr, offsets_ptr, out_ptr, num_tokens, num_rows, channels,
    PSEUDO: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_rows
    m = pid % num_rows
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    start = tl.load(offsets_ptr + b * (num_rows + 1) + m)
    end = tl.load(offsets_ptr + b * (num_rows + 1) + m + 1)
    first = tl.load(members_ptr + b * num_tokens + start)
    acc = tl.load(x_ptr + (b * num_tokens + first).to(tl.int64) * channels + c, mask=c_mask, other=0.0).to(tl.float32)
    if not PSEUDO:
        for i in range(start + 1, end):
            token = tl.load(members_ptr + b * num_tokens + i)
            acc += tl.load(x_ptr + (b * num_tokens + token).to(tl.int64) * channels + c, mask=c_mask, other=0.0)
        acc = acc / (end - start).to(tl.float32)
    tl.store(out_ptr + pid.to(tl.int64) * channels + c, acc.to(out_ptr.dtype.element_ty), mask=c_mask)


def _make_merge(wrap):
    """The launcher, launching kernels through ``wrap`` (plain in eager use, ``wrap_triton`` inside the
    custom op so torch.compile can trace them)."""

    def merge(
        x: torch.Tensor, slot: torch.Tensor, members: torch.Tensor, offsets: torch.Tensor, pseudo_merge: bool
    ) -> torch.Tensor:
        """Triton twin of ``sdtm.core.reference.merge``: x [B, N, C] -> [B, M, C]."""
        check_float(x, "x")
        check_device(x, slot, members, offsets)
        batch, num_tokens, channels = x.shape
        num_rows = offsets.shape[1] - 1
        out = torch.empty(batch, num_rows, channels, dtype=x.dtype, device=x.device)
        if out.numel() == 0:
            return out
        # Up to 1024 channels per program: a whole SD3 row (C = 1536) in two programs, 4 warps x 8 lanes.
        block_c = min(triton.next_power_of_2(channels), 1024)
        grid = (batch * num_rows, triton.cdiv(channels, block_c))
        wrap(_merge_kernel)[grid](
            x.contiguous(), members.contiguous(), offsets.contiguous(), out, num_tokens, num_rows, channels,
            PSEUDO=bool(pseudo_merge), BLOCK_C=block_c,
        )
        return out

    return merge


# Eager callers use the plain launcher: it skips the custom-op dispatch and wrap_triton's bookkeeping on
# every call (launch overhead dominates at SD3 sizes). The custom op is what torch.compile traces into.
merge = _make_merge(lambda kernel: kernel)
merge_op = triton_op("sdtm_triton::merge", _make_merge(wrap_triton), mutates_args=())
