"""Timing on this machine: the fused ops per backend, and a transformer of each model family's shape (its
adapter's ``bench_transformer``, shrunk for the CPU) end to end.

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

from ..core import reference as R
from ..core.config import SDTMConfig
from .macs import schedule_macs
from ..core.ops import check_backend, cpp_unavailable_reason, ops_for, triton_unavailable_reason
from ..core.patch import apply_sdtm, remove_sdtm
from ..core.plans import Grid, idm_candidates, idm_plan, random_or_first_positions, ssm_plan
from ..models import default_family, families, family

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
                        progress: bool = True, samples: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Median seconds per run; each round times every run once, in turn, after one warm-up call each.
    ``samples``: filled with every round's seconds per run."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    if samples is not None:
        samples.update(times)
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
    """One call of each op (and a whole plan) on activations ``x`` [B, N, C]."""
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


def _e2e_models() -> dict[str, dict]:
    """The end-to-end models: per family, the title, the family's pipeline batch (classifier-free guidance
    doubles it; guidance-distilled families run 1) and text tokens, and the defaults of the shrunk
    transformer."""
    return {a.name: dict(title=a.bench_title, batch=2 if a.cfg_pairs else 1, text_tokens=a.bench_text_tokens,
                         num_layers=a.bench_layers, heads=a.bench_heads) for a in families() if a.bench_title}


E2E_MODELS = _e2e_models()


def shaped_transformer(model: str, num_layers: int | None = None, heads: int | None = None, sample_size: int = 128,
                       seed: int = 0, device="cpu", dtype=torch.float32):
    """The shrunk transformer of family ``model`` (``ModelAdapter.bench_transformer``): ``num_layers``
    blocks, C = heads x the family's head width."""
    return family(model).bench_transformer(num_layers, heads, sample_size, seed, device, dtype)


def mac_config(transformer) -> dict:
    """The transformer's config as ``sdtm.cli.macs.schedule_macs`` reads it: its keys and ``_class_name``."""
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    return {"_class_name": type(transformer).__name__, **config}


def resolved_config(transformer, config: SDTMConfig, steps: int) -> SDTMConfig:
    """``config`` with ``switch_step=None`` replaced by the family's default for ``steps`` steps, as
    apply_sdtm resolves it during a generation (the MAC count needs the number)."""
    from ..models import adapter_for

    return adapter_for(transformer).resolve_config(config, steps)


class Denoiser:
    """Runs a transformer over ``steps`` denoising steps on random latents of ``latent_h`` x ``latent_w``
    (the VAE latent) with random prompt embeddings, called as its family's diffusers pipeline calls it
    (``ModelAdapter.denoising_inputs``: its scheduler, latent layout, timestep units and conditioning).

    ``batch`` is the batch of every transformer call (2: classifier-free guidance's pair);
    ``text_tokens`` None: the family's count (``ModelAdapter.bench_text_tokens``); ``frames``: latent frames
    of a video family (1 for images)."""

    def __init__(self, transformer, latent_h: int, latent_w: int, steps: int = 10, batch: int = 2, seed: int = 0,
                 text_tokens: int | None = None, frames: int = 1):
        from ..models import adapter_for

        adapter = adapter_for(transformer)
        self.family = adapter.name
        self.transformer = transformer
        self.steps = steps
        self.text_tokens = adapter.bench_text_tokens if text_tokens is None else text_tokens
        self.inputs = adapter.denoising_inputs(transformer, latent_h, latent_w, batch, self.text_tokens,
                                               torch.Generator().manual_seed(seed), frames=frames)
        self.scheduler = self.inputs.scheduler
        self.latents = self.inputs.latents

    def set_timesteps(self) -> torch.Tensor:
        """Start a generation: the scheduler's timesteps for ``steps`` steps."""
        return self.inputs.set_timesteps(self.steps)

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The transformer's prediction for latents ``x`` at timestep ``t``, in the scheduler's layout."""
        return self.inputs.predict(x, t)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        x = self.latents
        for t in self.set_timesteps():
            x = self.scheduler.step(self.predict(x, t), t, x, return_dict=False)[0]
        return x

    def patch(self, config: SDTMConfig | None) -> "Denoiser":
        """Apply ``config`` (None: unpatched) to the transformer; returns self."""
        remove_sdtm(self.transformer)
        if config is not None:
            apply_sdtm(self.transformer, config, scheduler=self.scheduler)
        return self


def bench_e2e(backends: list[str], rounds: int = 3, steps: int = 10, progress: bool = True,
              latent: tuple[int, int] | None = None, small_latent: tuple[int, int] | None = None,
              num_layers: int | None = None, heads: int | None = None, model: str | None = None) -> dict:
    """The shrunk transformer of ``model`` (``E2E_MODELS``: ``num_layers`` blocks, C = heads x the family's
    head width, the family's defaults when None) at the family's batch and text tokens: unmerged vs SDTM
    defaults per backend
    on ``latent`` (with the MAC ratio of the same schedule, switch step the family's default), and SDTM at
    ratio 0.5 in every step vs the unpatched model on ``small_latent``. The defaults (64 x 64 tokens ->
    2080; 40 x 52 = 2080 tokens) compare equal token counts; a video family runs its ``bench_frames`` on
    its own ``bench_latent`` and ``bench_small_latent``."""
    model = model or default_family().name
    if model not in E2E_MODELS:
        raise ValueError(f"--model must be one of {', '.join(E2E_MODELS)}, got {model!r}.")
    check_cpu_backends(backends)
    spec = E2E_MODELS[model]
    adapter = family(model)
    latent = latent or adapter.bench_latent
    small_latent = small_latent or adapter.bench_small_latent
    frames = adapter.latent_frames(adapter.bench_frames)
    transformer = shaped_transformer(model, num_layers, heads, sample_size=max(*latent, *small_latent))
    batch = spec["batch"]

    def patched(config, h=latent[0], w=latent[1]):
        run = Denoiser(transformer, h, w, steps, batch=batch, frames=frames)

        def call():
            run.patch(config)
            return run()

        return call

    # apply_SDTM's defaults: the family's switch step.
    default = SDTMConfig(switch_step=None)
    # Theoretical MACs on the meta device: FlopCounterMode misses CPU flash attention in a real run.
    report = schedule_macs(mac_config(transformer), latent[0] * 8, latent[1] * 8, steps, batch=batch,
                           sdtm=resolved_config(transformer, default, steps), text_tokens=spec["text_tokens"],
                           frames=adapter.bench_frames)
    mac_ratio = report.mac_ratio
    defaults = {"unmerged": patched(None)}
    defaults.update({b: patched(default.replace(backend=b)) for b in backends})
    seconds = interleaved_medians(defaults, rounds, torch.device("cpu"), progress)
    overhead_runs = {"unmerged": patched(None, *small_latent)}
    overhead_runs.update({b: patched(SDTMConfig(backend=b, **ALL_STRUCTURE)) for b in backends})
    overhead = interleaved_medians(overhead_runs, rounds, torch.device("cpu"), progress)
    remove_sdtm(transformer)
    blocks = len(sdtm_blocks(transformer))
    return {
        "model": model,
        "transformer": {"title": spec["title"], "blocks": blocks, "channels": transformer_channels(transformer),
                        "batch": batch, "text_tokens": spec["text_tokens"], "steps": steps,
                        "switch_step": resolved_config(transformer, default, steps).switch_step},
        "mac_ratio": mac_ratio,
        "mac_grid": list(report.grid),
        "frames": frames,
        "seconds": seconds,
        "speedup": {b: seconds["unmerged"] / seconds[b] for b in backends},
        "realised_share": {b: seconds["unmerged"] / seconds[b] / mac_ratio for b in backends},
        "grids": {"sdtm": [latent[0] // 2, latent[1] // 2], "unmerged_equal_tokens": [small_latent[0] // 2,
                                                                                   small_latent[1] // 2]},
        "overhead_seconds": overhead,
        "overhead_added": {b: overhead[b] / overhead["unmerged"] - 1 for b in backends},
    }


# The variants of a stacking benchmark: no cache and no SDTM, the step cache alone, SDTM alone, both.
STACKING_VARIANTS = ("unmerged", "cache", "sdtm", "both")


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` that shares its parameters and buffers (no memory for weights)."""
    import copy
    import itertools

    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def stacking_efficiency(speedups: dict[str, float]) -> float:
    """speedup(both) / (speedup(cache) x speedup(sdtm)): 1 when the two gains multiply."""
    return speedups["both"] / (speedups["cache"] * speedups["sdtm"])


def bench_stacking(cache: str, backend: str = "cpp", rounds: int = 3, steps: int = 10, grid: int = 32,
                   progress: bool = True, model: str | None = None, num_layers: int | None = None,
                   heads: int | None = None) -> dict:
    """A step cache stacked with SDTM: the shrunk transformer of ``model`` (``E2E_MODELS``; ``grid`` x
    ``grid`` image tokens, the family's batch and text tokens) over ``steps`` steps in four variants,
    rounds interleaved: unmerged, ``cache`` alone (``sdtm.cli.caches``: a deterministic schedule), SDTM
    alone (its defaults, the family's switch step, ``backend``), both. Each variant is a copy of one
    transformer sharing its weights, with its own inputs drawn from the same seed. Reports medians, speedups
    over unmerged, ``stacking_efficiency`` (``speedup(both) / (speedup(cache) x speedup(sdtm))``), what each
    variant computed in its last generation (block calls and steps with every block computed), SDTM's
    records by mode and each variant's relative change of the latents from unmerged."""
    from .caches import apply_cache, check_cache, sdtm_record_counts

    model = model or default_family().name
    if model not in E2E_MODELS:
        raise ValueError(f"--model must be one of {', '.join(E2E_MODELS)}, got {model!r}.")
    check_cache(cache, model)
    check_cpu_backends([backend])
    spec = E2E_MODELS[model]
    latent = 2 * grid  # every family's tokens span 2 x 2 latent pixels (patches or packing)
    base = shaped_transformer(model, num_layers, heads, sample_size=latent)
    config = SDTMConfig(backend=backend, switch_step=None)
    transformers = {name: base if name == "unmerged" else shared_copy(base) for name in STACKING_VARIANTS}
    caches, runs, outputs, samples = {}, {}, {}, {}
    try:
        for name, transformer in transformers.items():
            run = Denoiser(transformer, latent, latent, steps, batch=spec["batch"])
            caches[name] = apply_cache(cache if name in ("cache", "both") else "none", transformer, steps,
                                       run.scheduler)
            if name in ("sdtm", "both"):
                apply_sdtm(transformer, config, scheduler=run.scheduler)

            def call(run=run, name=name):
                outputs[name] = run()

            runs[name] = call
        seconds = interleaved_medians(runs, rounds, torch.device("cpu"), progress, samples)
        computed = {name: caches[name].report() for name in STACKING_VARIANTS}
        records = {name: sdtm_record_counts(transformers[name]) for name in ("sdtm", "both")}
    finally:
        for name, transformer in transformers.items():
            if name in caches:
                caches[name].disable()
            remove_sdtm(transformer)
    speedup = {name: seconds["unmerged"] / seconds[name] for name in STACKING_VARIANTS[1:]}
    # The same figure from each round's own times: how much the rounds scatter.
    per_round = [stacking_efficiency({name: samples["unmerged"][r] / samples[name][r] for name in STACKING_VARIANTS[1:]})
                 for r in range(rounds)]
    reference = outputs["unmerged"]
    schedule = computed["cache"].pop("schedule")
    for report in computed.values():
        report.pop("schedule", None)
    return {
        "model": model, "cache": cache, "backend": backend,
        "transformer": {"title": spec["title"], "blocks": len(sdtm_blocks(base)),
                        "channels": transformer_channels(base), "batch": spec["batch"],
                        "text_tokens": spec["text_tokens"], "steps": steps, "grid": [grid, grid],
                        "switch_step": resolved_config(base, config, steps).switch_step},
        "schedule": schedule,
        "rounds": rounds,
        "seconds": seconds,
        "round_seconds": samples,
        "speedup": speedup,
        "stacking_efficiency": stacking_efficiency(speedup),
        "stacking_efficiency_per_round": per_round,
        "computed": computed,
        "sdtm_records": records,
        "relative_change": {name: ((outputs[name] - reference).norm() / reference.norm()).item()
                            for name in STACKING_VARIANTS[1:]},
    }


def sdtm_blocks(transformer) -> list:
    """The blocks SDTM patches in ``transformer`` (every kind, in module order)."""
    from ..models import adapter_for

    return adapter_for(transformer).blocks(transformer)


def transformer_channels(transformer) -> int:
    """The width C of the transformer's token streams."""
    config = transformer.config
    return config.num_attention_heads * config.attention_head_dim


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
    """A block of the default family's shape (``bench_transformer``: C = heads x its head width, batch 2,
    ``grid`` image tokens, its text tokens, CPU float32) run
    unmerged ("unmerged"), the part of it that SDTM's fused ops take over ("replaced"), and for each
    backend and phase ("cpp-ssm", "cpp-idm", ...) everything SDTM adds
    to it when merging half the tokens: the plan (scores, selection, index tables, merge age), the merges
    of the attention and MLP inputs (the latter fused with norm2 and the modulation) and the two fused
    unmerges (blend, cache refresh, gate, residual). The fused ops are counted whole although they also
    do the block's own norm, gate and residual work, so this is an upper bound of what SDTM adds."""
    check_cpu_backends(backends)
    from ..core.engine import compute_plan
    from ..core.schedule import BlockAction, BlockMode, Phase
    from ..core.state import BlockLink, CallStream, SDTMState

    adapter = default_family()
    transformer = adapter.bench_transformer(num_layers=2, heads=heads, sample_size=2 * max(grid))
    block = adapter.blocks(transformer)[0]
    channels, batch = transformer_channels(transformer), 2
    layout = Grid(grid[0], grid[1], 2, 2)
    g = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=g)

    inputs = adapter.block_inputs(transformer, block, batch, layout.num_tokens, adapter.bench_text_tokens, draw)
    hidden, metric = inputs["hidden_states"], draw(batch, layout.num_tokens, channels)
    shift, scale, gate = draw(batch, channels), draw(batch, channels), draw(batch, channels)
    caches = [draw(batch, layout.num_tokens, channels) for _ in range(2)]
    spare = torch.empty_like(hidden)

    def unmerged():
        with torch.no_grad():
            return block(**inputs)

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
