"""bipartite_match on the GPU: for every source token its most similar destination (cosine) and that
similarity (+ a_d * priority), without the |A| x |D| matrix.

A program owns BLOCK_A sources of one sample and walks the destinations in BLOCK_D tiles: each tile's
raw dot products come from tl.dot over BLOCK_C channel chunks (fp32 accumulation), are scaled by the
inverse norms of both sides, and fold into a running (max, argmax) kept in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import COSINE_EPS, check_device, check_float, interpreting, pick


@triton.jit
def _bipartite_match_kernel(
    x_ptr, inv_norm_ptr, src_ptr, dst_ptr, priority_ptr, score_ptr, best_ptr,
    num_tokens, channels, num_src, num_dst, a_d,
    HAS_PRIORITY: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_a = tl.program_id(0)
    b = tl.program_id(1)
    a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = a < num_src
    src_token = tl.load(src_ptr + b * num_src + a, mask=a_mask, other=0)
    src_row = (b * num_tokens + src_token).to(tl.int64) * channels
    inv_a = tl.load(inv_norm_ptr + b * num_tokens + src_token, mask=a_mask, other=0.0)

    run_max = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    run_arg = tl.zeros((BLOCK_A,), dtype=tl.int64)
    for d0 in range(0, num_dst, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < num_dst
        dst_token = tl.load(dst_ptr + b * num_dst + d, mask=d_mask, other=0)
        dst_row = (b * num_tokens + dst_token).to(tl.int64) * channels
        acc = tl.zeros((BLOCK_A, BLOCK_D), dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < channels
            xa = tl.load(x_ptr + src_row[:, None] + c[None, :], mask=a_mask[:, None] & c_mask[None, :], other=0.0)
            xd = tl.load(x_ptr + dst_row[None, :] + c[:, None], mask=c_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                xa = xa.to(tl.float32)
                xd = xd.to(tl.float32)
            if IEEE:
                acc = tl.dot(xa, xd, acc, input_precision="ieee")
            else:
                acc = tl.dot(xa, xd, acc)
        inv_d = tl.load(inv_norm_ptr + b * num_tokens + dst_token, mask=d_mask, other=0.0)
        sims = acc * inv_a[:, None] * inv_d[None, :]
        sims = tl.where(d_mask[None, :], sims, float("-inf"))
        tile_max = tl.max(sims, axis=1)
        tile_arg = tl.argmax(sims, axis=1, tie_break_left=True).to(tl.int64) + d0
        better = tile_max > run_max  # strict: an earlier tile keeps a tie, as torch.argmax does
        run_max = tl.where(better, tile_max, run_max)
        run_arg = tl.where(better, tile_arg, run_arg)

    if HAS_PRIORITY:
        run_max += a_d * tl.load(priority_ptr + b * num_tokens + src_token, mask=a_mask, other=0.0)
    tl.store(score_ptr + b * num_src + a, run_max, mask=a_mask)
    tl.store(best_ptr + b * num_src + a, run_arg, mask=a_mask)


# Ampere (A100) and Hopper (H100) both run a 64 x 64 fp32 accumulator tile comfortably in 4 warps; the
# wider 128-source tile halves destination re-reads when |A| is large (3072 at 1024 x 1024) and pays off
# on Hopper's larger register file with 8 warps. 32-channel chunks keep fp32 operand tiles at 8 KB.
_CONFIGS = [
    triton.Config({"BLOCK_A": 64, "BLOCK_D": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_A": 128, "BLOCK_D": 64, "BLOCK_C": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_A": 64, "BLOCK_D": 128, "BLOCK_C": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_A": 64, "BLOCK_D": 64, "BLOCK_C": 64}, num_warps=4, num_stages=2),
]
_tuned = triton.autotune(configs=_CONFIGS, key=["channels", "num_src", "num_dst", "IEEE", "UPCAST"])(_bipartite_match_kernel)
_INTERPRETER_META = {"BLOCK_A": 16, "BLOCK_D": 16, "BLOCK_C": 16}


def _make_bipartite_match(wrap):
    """The launcher, launching kernels through ``wrap`` (plain in eager use, ``wrap_triton`` inside the
    custom op so torch.compile can trace them)."""

    def bipartite_match(
        x: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, priority: torch.Tensor | None, a_d: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton twin of ``sdtm.core.reference.bipartite_match``: (score [B, A] float32, best [B, A] int64)."""
        check_float(x, "x")
        check_device(x, src_idx, dst_idx, priority)
        batch, num_tokens, channels = x.shape
        num_src, num_dst = src_idx.shape[1], dst_idx.shape[1]
        if num_dst == 0 and num_src > 0:
            raise ValueError("bipartite_match needs at least one destination token.")
        score = torch.empty(batch, num_src, dtype=torch.float32, device=x.device)
        best = torch.empty(batch, num_src, dtype=torch.int64, device=x.device)
        if score.numel() == 0:
            return score, best
        x = x.contiguous()
        inv_norm = 1.0 / torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(COSINE_EPS)
        priority = priority.float().contiguous() if priority is not None else None
        kernel = pick(_tuned, _bipartite_match_kernel)
        meta = {} if kernel is _tuned else _INTERPRETER_META

        def grid(meta_args):
            return (triton.cdiv(num_src, meta_args["BLOCK_A"]), batch)

        wrap(kernel)[grid](
            x, inv_norm, src_idx.contiguous(), dst_idx.contiguous(), priority if priority is not None else score,
            score, best, num_tokens, channels, num_src, num_dst, float(a_d),
            HAS_PRIORITY=priority is not None, IEEE=x.dtype == torch.float32,
            # Triton's interpreter has no bfloat16 dot; upcast there (GPUs take fp16/bf16 tiles natively).
            UPCAST=interpreting(), **meta,
        )
        return score, best

    return bipartite_match


# Eager callers use the plain launcher: it skips the custom-op dispatch and wrap_triton's bookkeeping on
# every call (launch overhead dominates at SD3 sizes). The custom op is what torch.compile traces into.
bipartite_match = _make_bipartite_match(lambda kernel: kernel)
bipartite_match_op = triton_op("sdtm_triton::bipartite_match", _make_bipartite_match(wrap_triton), mutates_args=())
