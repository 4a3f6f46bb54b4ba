"""unmerge (and unmerge_into, writing into given tensors) on the GPU: scatter a merged sub-layer output
back to every token, blend group members with the cache, add the residual and write the new cache, in
one pass over [B, N, C].

    u = gate[b] * y[b, slot[b, n]]                 (gate optional)
    u = mcw * u + (1 - mcw) * cache[b, n]          where blend[b, n] and a cache is given
    out = residual[b, n] + u (or u);  new_cache = u (when store_cache)

Each program covers BLOCK_T tokens x BLOCK_C channels; products are rounded to the tensor dtype in the
order torch's op sequence rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import check_device, check_float


@triton.jit
def _unmerge_kernel(
    y_ptr, slot_ptr, blend_ptr, cache_ptr, gate_ptr, residual_ptr, out_ptr, new_cache_ptr,
    num_tokens, num_rows, channels, total_tokens, keep, refresh,
    HAS_CACHE: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_mask = t < total_tokens
    mask = t_mask[:, None] & (c[None, :] < channels)
    b = t // num_tokens
    slot = tl.load(slot_ptr + t, mask=t_mask, other=0)
    src = (b * num_rows + slot).to(tl.int64) * channels
    dst = t.to(tl.int64) * channels
    u = tl.load(y_ptr + src[:, None] + c[None, :], mask=mask, other=0.0)
    if HAS_GATE:
        g = tl.load(gate_ptr + b[:, None] * channels + c[None, :], mask=mask, other=0.0)
        u = (g.to(tl.float32) * u.to(tl.float32)).to(u.dtype)
    if HAS_CACHE:
        blend = tl.load(blend_ptr + t, mask=t_mask, other=0) != 0
        cached = tl.load(cache_ptr + dst[:, None] + c[None, :], mask=mask, other=0.0)
        fresh = (keep * u.to(tl.float32)).to(u.dtype)
        old = (refresh * cached.to(tl.float32)).to(u.dtype)
        mixed = (fresh.to(tl.float32) + old.to(tl.float32)).to(u.dtype)
        u = tl.where(blend[:, None], mixed, u)
    if STORE:
        tl.store(new_cache_ptr + dst[:, None] + c[None, :], u, mask=mask)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + dst[:, None] + c[None, :], mask=mask, other=0.0)
        u = (r.to(tl.float32) + u.to(tl.float32)).to(u.dtype)
    tl.store(out_ptr + dst[:, None] + c[None, :], u, mask=mask)


def _check_full(t: torch.Tensor | None, name: str, shape: tuple, dtype: torch.dtype) -> None:
    if t is not None and (tuple(t.shape) != shape or t.dtype != dtype):
        raise ValueError(f"{name} must be {dtype} of shape {shape}, got {t.dtype} of shape {tuple(t.shape)}.")


def _check_args(y, slot, blend, cache, gate, residual, mcw) -> tuple[int, int, int]:
    """Validates one call's inputs; returns the full shape (B, N, C)."""
    check_float(y, "y")
    check_device(y, slot, blend, cache, gate, residual)
    batch, _, channels = y.shape
    full = (batch, slot.shape[1], channels)
    _check_full(cache, "cache", full, y.dtype)
    _check_full(residual, "residual", full, y.dtype)
    _check_full(gate, "gate", (batch, channels), y.dtype)
    if not 0.0 <= mcw <= 1.0:
        raise ValueError(f"mcw must lie in [0, 1], got {mcw}.")
    return full


def _launch(wrap, y, slot, blend, cache, gate, residual, mcw, out, new_cache) -> None:
    """One kernel launch writing ``out`` (and ``new_cache`` unless None); both contiguous."""
    batch, num_rows, channels = y.shape
    num_tokens = slot.shape[1]
    if out.numel() == 0:
        return
    # 8 tokens x up to 256 channels per program: 2048 values, 16 per thread at 4 warps, and whole
    # 128-byte lines per token row on both Ampere and Hopper.
    block_c = min(triton.next_power_of_2(channels), 256)
    block_t = 8
    grid = (triton.cdiv(batch * num_tokens, block_t), triton.cdiv(channels, block_c))
    placeholder = out  # any pointer for the absent optional inputs; never read
    wrap(_unmerge_kernel)[grid](
        y.contiguous(), slot.contiguous(), blend.contiguous(),
        cache.contiguous() if cache is not None else placeholder,
        gate.contiguous() if gate is not None else placeholder,
        residual.contiguous() if residual is not None else placeholder,
        out, new_cache if new_cache is not None else placeholder,
        num_tokens, num_rows, channels, batch * num_tokens, float(mcw), float(1.0 - mcw),
        HAS_CACHE=cache is not None, HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None,
        STORE=new_cache is not None, BLOCK_T=block_t, BLOCK_C=block_c,
    )


def _make_unmerge(wrap):
    """The functional launcher, launching kernels through ``wrap`` (plain in eager use, ``wrap_triton``
    inside the custom op so torch.compile can trace them)."""

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
        """Triton twin of ``sdtm.core.reference.unmerge``: y [B, M, C] -> (out [B, N, C], new cache or empty)."""
        full = _check_args(y, slot, blend, cache, gate, residual, mcw)
        out = torch.empty(full, dtype=y.dtype, device=y.device)
        new_cache = torch.empty(full if store_cache else (0,), dtype=y.dtype, device=y.device)
        _launch(wrap, y, slot, blend, cache, gate, residual, mcw, out, new_cache if store_cache else None)
        return out, new_cache

    return unmerge


def _check_writable(t: torch.Tensor, name: str, full: tuple, dtype: torch.dtype, inputs: dict) -> None:
    _check_full(t, name, full, dtype)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous: it is written in place.")
    for other_name, (other, may_be_same) in inputs.items():
        if other is None or other.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            continue
        same = other.data_ptr() == t.data_ptr() and other.shape == t.shape and other.is_contiguous()
        if not (may_be_same and same):
            raise ValueError(f"{name} shares memory with {other_name}; pass a separate tensor"
                             + (f" or {other_name} itself." if may_be_same else "."))


def _make_unmerge_into(wrap):
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
        """Triton twin of ``sdtm.core.reference.unmerge_into``: out may be residual, cache_out may be cache."""
        full = _check_args(y, slot, blend, cache, gate, residual, mcw)
        check_device(y, out, cache_out)
        _check_writable(out, "out", full, y.dtype,
                        {"y": (y, False), "gate": (gate, False), "cache": (cache, False), "residual": (residual, True)})
        if cache_out is not None:
            _check_writable(cache_out, "cache_out", full, y.dtype,
                            {"y": (y, False), "gate": (gate, False), "residual": (residual, False),
                             "out": (out, False), "cache": (cache, True)})
        _launch(wrap, y, slot, blend, cache, gate, residual, mcw, out, cache_out)

    return unmerge_into


# Eager callers use the plain launcher: it skips the custom-op dispatch and wrap_triton's bookkeeping on
# every call (launch overhead dominates at SD3 sizes). The custom op is what torch.compile traces into.
unmerge = _make_unmerge(lambda kernel: kernel)
unmerge_op = triton_op("sdtm_triton::unmerge", _make_unmerge(wrap_triton), mutates_args=())
unmerge_into = _make_unmerge_into(lambda kernel: kernel)
unmerge_into_op = triton_op("sdtm_triton::unmerge_into", _make_unmerge_into(wrap_triton),
                            mutates_args=("out", "cache_out"))
