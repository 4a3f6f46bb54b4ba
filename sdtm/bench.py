"""Timing on this machine: the fused ops per backend, and an SD3-shaped transformer end to end.

Rounds are interleaved across the variants compared and medians reported, so slow drifts of the machine
hit every variant alike. Used by ``sdtm bench`` and by benchmarks/.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from . import reference as R
from .config import SDTMConfig
from .macs import schedule_macs
from .ops import check_backend, cpp_unavailable_reason, ops_for, triton_unavailable_reason
from .patch import apply_sdtm, remove_sdtm
from .plans import Grid, idm_candidates, idm_plan, random_or_first_positions, ssm_plan

TEXT_TOKENS = 333
# Every step a structure step at ratio 0.5: 4096 -> 2080 tokens on a 64 x 64 grid, exactly the token
# count of an unpatched 40 x 52 grid.
ALL_STRUCTURE = dict(ratio=0.5, deviation=0.0, switch_step=1000, protect_steps_frequency=None, use_rand=True)


def machine_info() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def available_backends() -> list[tuple[str, torch.device]]:
    """(backend, device) pairs that run here: torch and cpp on the CPU; torch and triton on CUDA."""
    pairs = [("torch", torch.device("cpu"))]
    if cpp_unavailable_reason() is None:
        pairs.append(("cpp", torch.device("cpu")))
    if torch.cuda.is_available():
        pairs.append(("torch", torch.device("cuda")))
        if triton_unavailable_reason(torch.device("cuda")) is None:
            pairs.append(("triton", torch.device("cuda")))
    return pairs


def kernel_backends(backends: list[str] | None = None) -> list[tuple[str, torch.device]]:
    """The (backend, device) pairs of ``available_backends`` to time: all of them (``backends`` None), or
    torch (the reference of every speedup) and ``backends``; ValueError naming a backend that cannot run."""
    pairs = available_backends()
    if backends is None:
        return pairs
    for name in backends:
        if name not in {n for n, _ in pairs}:
            check_backend(name)  # raises with the reason when the backend is missing altogether
            raise ValueError(f"backend={name!r} cannot run here: the kernel benchmark runs cpp on the CPU and "
                             "triton on a CUDA device; leave it out of --backends.")
    return [(n, d) for n, d in pairs if n == "torch" or n in backends]


def check_cpu_backends(backends: list[str]) -> None:
    """Raise a ValueError saying why one of ``backends`` cannot run on CPU tensors (the end-to-end and
    block benchmarks run on the CPU)."""
    for name in backends:
        ops_for(name, torch.device("cpu"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                        progress: bool = True) -> dict[str, float]:
    """Median seconds per run; each round times every run once, in turn, after one warm-up call each."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in tqdm(range(rounds), desc="rounds", leave=False, disable=not progress):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


@dataclass
class KernelRow:
    op: str
    shape: str
    backend: str
    device: str
    median_ms: float
    speedup_vs_torch: float


def kernel_calls(ops, x, priority, grid: Grid, plans) -> dict[str, Callable[[], object]]:
    """One call of each op (and a whole plan) on SD3-shaped activations."""
    b, n, c = x.shape
    ssm, idm, src_idx, dst_idx = plans
    y = torch.randn(b, ssm.num_merged, c, device=x.device, dtype=x.dtype)
    cache = torch.randn_like(x)
    return {
        "window_scores": lambda: ops.window_scores(x, priority, grid.height, grid.width, 2, 2, 0.05),
        "bipartite_match": lambda: ops.bipartite_match(x, src_idx, dst_idx, priority, 0.05),
        "merge": lambda: ops.merge(x, ssm.slot, ssm.members, ssm.offsets, False),
        "unmerge": lambda: ops.unmerge(y, ssm.slot, ssm.blend, cache, None, x, 0.1, True),
    }


def bench_kernels(grids: list[tuple[int, int]], channels: int = 1536, batch: int = 2, rounds: int = 7,
                  progress: bool = True, backends: list[str] | None = None) -> list[KernelRow]:
    """Each op on each available backend (or torch and ``backends``) at each grid (float32), medians and
    speedups over torch."""
    pairs = kernel_backends(backends)
    rows = []
    for grid_h, grid_w in grids:
        grid = Grid(grid_h, grid_w, 2, 2)
        shape = f"N{grid.num_tokens}-{grid_h}x{grid_w}-C{channels}"
        for device in sorted({d for _, d in pairs}, key=str):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, grid.num_tokens, channels, generator=g).to(device)
            age = torch.randint(0, 6, (batch, grid.num_tokens), generator=g).float().to(device)
            priority = age / (age.mean(1, keepdim=True) + 1e-6)
            position = random_or_first_positions(batch, grid.num_windows, 4, True, g, device)
            scores = R.window_scores(x, priority, grid_h, grid_w, 2, 2, 0.05)
            ssm = ssm_plan(scores, grid, grid.num_tokens // 2, position, False)
            src_idx, dst_idx = idm_candidates(grid, position)
            score, best = R.bipartite_match(x, src_idx, dst_idx, priority, 0.05)
            idm = idm_plan(grid, grid.num_tokens // 2, src_idx, dst_idx, score, best, False)
            names = [name for name, d in pairs if d == device]
            per_backend = {name: kernel_calls(ops_for(name, device), x, priority, grid, (ssm, idm, src_idx, dst_idx))
                           for name in names}
            for op in per_backend[names[0]]:
                medians = interleaved_medians({name: calls[op] for name, calls in per_backend.items()}, rounds,
                                              device, progress)
                for name, seconds in medians.items():
                    rows.append(KernelRow(op, shape, name, device.type, seconds * 1e3, medians["torch"] / seconds))
    return rows


def sd3_shaped_transformer(num_layers: int = 2, heads: int = 12, sample_size: int = 128, seed: int = 0,
                           device="cpu", dtype=torch.float32):
    """SD3's widths (333 text tokens from a 4096-wide context, patch 2, 16 latent channels), fewer blocks
    and C = heads * 64, random weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=heads * 64,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=sample_size // 2,
    )
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even for models such as this one
    # that have no module to keep in float32.
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()


class Denoiser:
    """Runs a transformer over ``steps`` flow-matching steps on [batch, 16, h, w] random latents."""

    def __init__(self, transformer, latent_h: int, latent_w: int, steps: int = 10, batch: int = 2, seed: int = 0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        g = torch.Generator().manual_seed(seed)
        device, dtype = transformer.device, transformer.dtype
        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.steps = steps
        self.latents = torch.randn(batch, 16, latent_h, latent_w, generator=g).to(device, dtype)
        self.context = torch.randn(batch, TEXT_TOKENS, 4096, generator=g).to(device, dtype)
        self.pooled = torch.randn(batch, 2048, generator=g).to(device, dtype)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        self.scheduler.set_timesteps(self.steps, device=self.latents.device)
        x = self.latents
        for t in self.scheduler.timesteps:
            out = self.transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=self.context,
                                   pooled_projections=self.pooled, return_dict=False)[0]
            x = self.scheduler.step(out, t, x, return_dict=False)[0]
        return x

    def patch(self, config: SDTMConfig | None) -> "Denoiser":
        """Apply ``config`` (None: unpatched) to the transformer; returns self."""
        remove_sdtm(self.transformer)
        if config is not None:
            apply_sdtm(self.transformer, config, scheduler=self.scheduler)
        return self


def bench_e2e(backends: list[str], rounds: int = 3, steps: int = 10, progress: bool = True,
              latent: tuple[int, int] = (128, 128), small_latent: tuple[int, int] = (80, 104),
              num_layers: int = 2, heads: int = 12) -> dict:
    """SD3-shaped transformer (C = heads * 64, ``num_layers`` blocks), batch 2: unmerged vs SDTM defaults
    per backend on ``latent`` (with the MAC ratio), and SDTM at ratio 0.5 in every step vs the unpatched
    model on ``small_latent``. The defaults (64 x 64 tokens -> 2080; 40 x 52 = 2080 tokens) compare
    equal token counts."""
    check_cpu_backends(backends)
    transformer = sd3_shaped_transformer(num_layers=num_layers, heads=heads, sample_size=max(*latent, *small_latent))

    def patched(config, h=latent[0], w=latent[1]):
        run = Denoiser(transformer, h, w, steps)

        def call():
            run.patch(config)
            return run()

        return call

    # Theoretical MACs on the meta device: FlopCounterMode misses CPU flash attention in a real run.
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    mac_ratio = schedule_macs(config, latent[0] * 8, latent[1] * 8, steps, batch=2, sdtm=SDTMConfig()).mac_ratio
    defaults = {"unmerged": patched(None)}
    defaults.update({b: patched(SDTMConfig(backend=b)) for b in backends})
    seconds = interleaved_medians(defaults, rounds, torch.device("cpu"), progress)
    overhead_runs = {"unmerged": patched(None, *small_latent)}
    overhead_runs.update({b: patched(SDTMConfig(backend=b, **ALL_STRUCTURE)) for b in backends})
    overhead = interleaved_medians(overhead_runs, rounds, torch.device("cpu"), progress)
    remove_sdtm(transformer)
    return {
        "mac_ratio": mac_ratio,
        "seconds": seconds,
        "speedup": {b: seconds["unmerged"] / seconds[b] for b in backends},
        "realised_share": {b: seconds["unmerged"] / seconds[b] / mac_ratio for b in backends},
        "grids": {"sdtm": [latent[0] // 2, latent[1] // 2], "unmerged_equal_tokens": [small_latent[0] // 2,
                                                                                   small_latent[1] // 2]},
        "overhead_seconds": overhead,
        "overhead_added": {b: overhead[b] / overhead["unmerged"] - 1 for b in backends},
    }


@dataclass
class BlockShare:
    """One unmerged block's median time against what SDTM adds to it in one phase (seconds).

    ``added_seconds`` counts SDTM's ops whole; ``replaced_seconds`` is the block's own work they take
    over (norm2 + modulation, and the gate multiply + residual add after each sub-layer, on all tokens)."""

    phase: str
    backend: str
    block_seconds: float
    added_seconds: float
    replaced_seconds: float

    @property
    def share(self) -> float:
        """Upper bound: SDTM's ops whole, over the unmerged block."""
        return self.added_seconds / self.block_seconds

    @property
    def net_share(self) -> float:
        """SDTM's ops less the block work they replace, over the unmerged block."""
        return (self.added_seconds - self.replaced_seconds) / self.block_seconds


def block_share_runs(backends: list[str], grid: tuple[int, int] = (64, 64), heads: int = 24
                     ) -> dict[str, Callable[[], object]]:
    """An SD3 block (C = heads * 64, batch 2, ``grid`` image tokens, 333 text tokens, CPU float32) run
    unmerged ("unmerged"), the part of it that SDTM's fused ops take over ("replaced"), and for each
    backend and phase ("cpp-ssm", "cpp-idm", ...) everything SDTM adds
    to it when merging half the tokens: the plan (scores, selection, index tables, merge age), the merges
    of the attention and MLP inputs (the latter fused with norm2 and the modulation) and the two fused
    unmerges (blend, cache refresh, gate, residual). The fused ops are counted whole although they also
    do the block's own norm, gate and residual work, so this is an upper bound of what SDTM adds."""
    check_cpu_backends(backends)
    from .engine import compute_plan
    from .schedule import BlockAction, BlockMode, Phase
    from .state import BlockLink, CallStream, SDTMState

    transformer = sd3_shaped_transformer(num_layers=2, heads=heads, sample_size=2 * max(grid))
    block = transformer.transformer_blocks[0]
    channels, batch = heads * 64, 2
    layout = Grid(grid[0], grid[1], 2, 2)
    g = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=g)

    hidden, metric = draw(batch, layout.num_tokens, channels), draw(batch, layout.num_tokens, channels)
    context, temb = draw(batch, TEXT_TOKENS, channels), draw(batch, channels)
    shift, scale, gate = draw(batch, channels), draw(batch, channels), draw(batch, channels)
    caches = [draw(batch, layout.num_tokens, channels) for _ in range(2)]
    spare = torch.empty_like(hidden)

    def unmerged():
        with torch.no_grad():
            return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)

    full_output = draw(batch, layout.num_tokens, channels)

    def replaced():
        """The unmerged block's own ops that SDTM's fused ops take over, in diffusers' op sequence."""
        normed = torch.nn.functional.layer_norm(hidden, (channels,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        after_attention = hidden + gate.unsqueeze(1) * full_output
        return normed, after_attention + gate.unsqueeze(1) * full_output

    def sdtm_added(backend: str, phase: Phase) -> Callable[[], object]:
        ops = ops_for(backend, hidden.device)
        state = SDTMState(SDTMConfig(backend=backend), num_layers=1)
        state.grid, state.ops = layout, ops
        action = BlockAction(BlockMode.MERGED, phase, reduce_num=layout.num_tokens // 2, merge_attn=True,
                             merge_mlp=True)
        stream = CallStream(merge_age=torch.zeros(batch, layout.num_tokens, dtype=torch.int32))
        link = BlockLink(state, 0, action=action, stream=stream,
                         remove=torch.empty(action.reduce_num, dtype=torch.uint8),
                         dst_draw=torch.randint(layout.window_size, (batch, layout.num_windows), generator=g))
        mcw = state.config.mcw

        def run():
            stream.merge_age.zero_()  # every run is a generation's first merge
            plan = compute_plan(link, metric, ops)
            ops.merge(metric, plan.slot, plan.members, plan.offsets, False)
            y = torch.empty(batch, plan.num_merged, channels)  # stands for the sub-layer outputs
            ops.unmerge_into(y, plan.slot, plan.blend, caches[0], gate, hidden, mcw, spare, caches[0])
            ops.norm_modulate_merge(spare, shift, scale, 1e-6, plan.slot, plan.members, plan.offsets, False)
            ops.unmerge_into(y, plan.slot, plan.blend, caches[1], gate, spare, mcw, spare, caches[1])

        return run

    runs: dict[str, Callable[[], object]] = {"unmerged": unmerged, "replaced": replaced}
    for backend in backends:
        for phase in (Phase.STRUCTURE, Phase.DETAIL):
            runs[f"{backend}-{phase.value}"] = sdtm_added(backend, phase)
    return runs


def bench_block_share(backends: list[str], grid: tuple[int, int] = (64, 64), heads: int = 24, rounds: int = 5,
                      progress: bool = True) -> list[BlockShare]:
    """Medians of ``block_share_runs``, interleaved: what SDTM adds to a block, per backend and phase."""
    seconds = interleaved_medians(block_share_runs(backends, grid, heads), rounds, torch.device("cpu"), progress)
    return [BlockShare(name.split("-")[1], name.split("-")[0], seconds["unmerged"], s, seconds["replaced"])
            for name, s in seconds.items() if name not in ("unmerged", "replaced")]
