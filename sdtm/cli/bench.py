"""Timing on this machine: the fused ops per backend, and a transformer of each model family's shape (SD3,
FLUX.1-dev, PixArt-Sigma; shrunk for the CPU) end to end.

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
    return _cast(model, device, dtype)


def flux_shaped_transformer(num_layers: int = 1, num_single_layers: int | None = None, heads: int = 6,
                            seed: int = 0, device="cpu", dtype=torch.float32):
    """FLUX.1-dev's widths (head width 128 with rotary axes 16 + 56 + 56, 16 latent channels packed 2x2 into
    64, T5 context 4096 wide, pooled CLIP vector 768 wide, guidance embedding), ``num_layers``
    double-stream blocks and ``num_single_layers`` single-stream ones (default twice as many, as in
    FLUX.1-dev's 19 + 38), C = heads * 128, random weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers,
        num_single_layers=2 * num_layers if num_single_layers is None else num_single_layers,
        attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )
    return _cast(model, device, dtype)


def pixart_shaped_transformer(num_layers: int = 2, heads: int = 8, sample_size: int = 128, seed: int = 0,
                              device="cpu", dtype=torch.float32):
    """PixArt-Sigma's widths (head width 72, 4 latent channels with learned sigma: 8 out, patch 2, T5
    captions 4096 wide, no resolution conditioning), fewer blocks and C = heads * 72, random weights.
    ``sample_size`` (latent side of the default sin-cos table) is no limit: other sizes get their own."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=heads * 72, caption_channels=4096, sample_size=sample_size, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=max(1, sample_size // 64),
    )
    return _cast(model, device, dtype)


def _cast(model, device, dtype):
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even for models such as these that
    # have no module to keep in float32.
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()


# The end-to-end models: the family's pipeline batch (classifier-free guidance doubles it; Flux.1-dev is
# guidance-distilled) and text tokens, and the defaults of the shrunk transformer.
E2E_MODELS = {
    "sd3": dict(title="SD3-shaped transformer", batch=2, text_tokens=TEXT_TOKENS, num_layers=2, heads=12),
    "flux": dict(title="FLUX.1-dev-shaped transformer", batch=1, text_tokens=512, num_layers=1, heads=6),
    "pixart": dict(title="PixArt-Sigma-shaped transformer", batch=2, text_tokens=300, num_layers=2, heads=8),
}


def shaped_transformer(model: str, num_layers: int | None = None, heads: int | None = None, sample_size: int = 128,
                       seed: int = 0, device="cpu", dtype=torch.float32):
    """The shrunk transformer of ``model`` (a key of ``E2E_MODELS``): ``num_layers`` blocks (Flux:
    double-stream blocks, plus twice as many single-stream ones), C = heads x the family's head width."""
    if model not in E2E_MODELS:
        raise ValueError(f"model must be one of {', '.join(E2E_MODELS)}, got {model!r}.")
    spec = E2E_MODELS[model]
    num_layers = spec["num_layers"] if num_layers is None else num_layers
    heads = spec["heads"] if heads is None else heads
    if model == "sd3":
        return sd3_shaped_transformer(num_layers, heads, sample_size, seed, device, dtype)
    if model == "flux":
        return flux_shaped_transformer(num_layers, None, heads, seed, device, dtype)
    return pixart_shaped_transformer(num_layers, heads, sample_size, seed, device, dtype)


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
    (the VAE latent) with random prompt embeddings, called as its family's diffusers pipeline calls it:

    - SD3: [batch, 16, h, w] latents, 333 text tokens and a pooled vector, a flow-matching Euler schedule
      (shift 3);
    - Flux.1: latents packed into (h/2)(w/2) tokens of 2x2 patches placed by ``img_ids``, ``timestep /
      1000``, the distilled guidance 3.5 (models with a guidance embedding), 512 text tokens, FluxPipeline's
      schedule (sigmas 1 .. 1/steps, shift from the image token count);
    - PixArt: [batch, 4, h, w] latents, 300 text tokens with an all-ones mask, no resolution conditions,
      DPM-Solver++ (the first half of the learned-sigma output is the noise prediction).

    ``batch`` is the batch of every transformer call (2: classifier-free guidance's pair);
    ``text_tokens`` None: the family's count above."""

    def __init__(self, transformer, latent_h: int, latent_w: int, steps: int = 10, batch: int = 2, seed: int = 0,
                 text_tokens: int | None = None):
        from ..models import adapter_for

        g = torch.Generator().manual_seed(seed)
        device, dtype = transformer.device, transformer.dtype
        self.family = adapter_for(transformer).name
        self.transformer = transformer
        self.steps = steps
        self.text_tokens = E2E_MODELS[self.family]["text_tokens"] if text_tokens is None else text_tokens
        config = transformer.config

        def draw(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)

        self.extra: dict = {}
        if self.family == "flux":
            from diffusers import FlowMatchEulerDiscreteScheduler

            if latent_h % 2 or latent_w % 2:
                raise ValueError(f"Flux packs 2x2 latent patches: the latent must have even sides, got "
                                 f"{latent_h}x{latent_w}.")
            rows, cols = latent_h // 2, latent_w // 2
            self.scheduler = FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096)
            self.latents = draw(batch, rows * cols, config.in_channels)
            self.context = draw(batch, self.text_tokens, config.joint_attention_dim)
            self.pooled = draw(batch, config.pooled_projection_dim)
            img_ids = torch.zeros(rows, cols, 3)
            img_ids[..., 1] += torch.arange(rows)[:, None]
            img_ids[..., 2] += torch.arange(cols)[None, :]
            self.extra = {"img_ids": img_ids.reshape(-1, 3).to(device, dtype),
                          "txt_ids": torch.zeros(self.text_tokens, 3).to(device, dtype),
                          "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.float32)
                          if config.guidance_embeds else None}
            # FluxPipeline's schedule: the shift grows with the image token count.
            self._mu = 0.5 + (1.15 - 0.5) * (rows * cols - 256) / (4096 - 256)
        elif self.family == "pixart":
            from diffusers import DPMSolverMultistepScheduler

            self.scheduler = DPMSolverMultistepScheduler()
            self.latents = draw(batch, config.in_channels, latent_h, latent_w)
            self.context = draw(batch, self.text_tokens, config.caption_channels)
            self.extra = {"encoder_attention_mask": torch.ones(batch, self.text_tokens, device=device),
                          "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
            self.latents = draw(batch, config.in_channels, latent_h, latent_w)
            self.context = draw(batch, self.text_tokens, config.joint_attention_dim)
            self.pooled = draw(batch, config.pooled_projection_dim)

    def set_timesteps(self) -> torch.Tensor:
        """Start a generation: the scheduler's timesteps for ``steps`` steps."""
        device = self.latents.device
        if self.family == "flux":
            import numpy as np

            sigmas = np.linspace(1.0, 1 / self.steps, self.steps)
            self.scheduler.set_timesteps(self.steps, device=device, sigmas=sigmas, mu=self._mu)
        else:
            self.scheduler.set_timesteps(self.steps, device=device)
        return self.scheduler.timesteps

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The transformer's prediction for latents ``x`` at timestep ``t``, in the scheduler's layout."""
        batch = x.shape[0]
        if self.family == "flux":
            return self.transformer(hidden_states=x, timestep=t.expand(batch).to(x.dtype) / 1000,
                                    encoder_hidden_states=self.context, pooled_projections=self.pooled,
                                    return_dict=False, **self.extra)[0]
        if self.family == "pixart":
            out = self.transformer(hidden_states=x, timestep=t.expand(batch), encoder_hidden_states=self.context,
                                   return_dict=False, **self.extra)[0]
            return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out
        return self.transformer(hidden_states=x, timestep=t.expand(batch), encoder_hidden_states=self.context,
                                pooled_projections=self.pooled, return_dict=False)[0]

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
              latent: tuple[int, int] = (128, 128), small_latent: tuple[int, int] = (80, 104),
              num_layers: int | None = None, heads: int | None = None, model: str = "sd3") -> dict:
    """The shrunk transformer of ``model`` (``E2E_MODELS``: ``num_layers`` blocks, C = heads x the family's
    head width; default SD3: 2 blocks, C = 768; Flux: 1 double-stream + 2 single-stream blocks, C = 768;
    PixArt: 2 blocks, C = 576) at the family's batch and text tokens: unmerged vs SDTM defaults per backend
    on ``latent`` (with the MAC ratio of the same schedule, switch step the family's default), and SDTM at
    ratio 0.5 in every step vs the unpatched model on ``small_latent``. The defaults (64 x 64 tokens ->
    2080; 40 x 52 = 2080 tokens) compare equal token counts."""
    if model not in E2E_MODELS:
        raise ValueError(f"--model must be one of {', '.join(E2E_MODELS)}, got {model!r}.")
    check_cpu_backends(backends)
    spec = E2E_MODELS[model]
    transformer = shaped_transformer(model, num_layers, heads, sample_size=max(*latent, *small_latent))
    batch = spec["batch"]

    def patched(config, h=latent[0], w=latent[1]):
        run = Denoiser(transformer, h, w, steps, batch=batch)

        def call():
            run.patch(config)
            return run()

        return call

    # apply_SDTM's defaults: the family's switch step (SD3: the reference's 20).
    default = SDTMConfig(switch_step=None)
    # Theoretical MACs on the meta device: FlopCounterMode misses CPU flash attention in a real run.
    report = schedule_macs(mac_config(transformer), latent[0] * 8, latent[1] * 8, steps, batch=batch,
                           sdtm=resolved_config(transformer, default, steps), text_tokens=spec["text_tokens"])
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
                   progress: bool = True, model: str = "sd3", num_layers: int | None = None,
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

    if model not in E2E_MODELS:
        raise ValueError(f"--model must be one of {', '.join(E2E_MODELS)}, got {model!r}.")
    check_cache(cache, model)
    check_cpu_backends([backend])
    spec = E2E_MODELS[model]
    latent = 2 * grid  # SD3 / PixArt patches and Flux's packing: 2 x 2 latent pixels a token
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
    """An SD3 block (C = heads * 64, batch 2, ``grid`` image tokens, 333 text tokens, CPU float32) run
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
