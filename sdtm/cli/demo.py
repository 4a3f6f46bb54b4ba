"""The demonstration: a tiny pipeline of one model family (any registered family: its adapter's
``tiny_pipeline``) built from config, generated with and without SDTM."""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from .bench import mac_config
from ..core.config import SDTMConfig
from .macs import schedule_macs
from ..core.patch import apply_SDTM, remove_SDTM, sdtm_state
from ..models import default_family, families, family
from ..models.base import ModelAdapter


@dataclass(frozen=True)
class DemoModel:
    """One family in the demo: its tiny spec, pipeline builder, call arguments and CFG batch."""

    title: str
    spec: Any
    build: Callable[[Any], Any]
    call_kwargs: Callable[[Any], dict]  # spec -> the pipeline's keyword arguments besides size, steps, seed
    batch: int  # the batch of every transformer call
    max_size: int | None  # the largest image side the positional table covers (None: any)
    size_multiple: int = 2  # the image side must be a multiple of it: 2 x 2 pixels a token, or the pipeline's rule
    size_rule: str = "a token spans 2 x 2 pixels"
    blocks: str = ""  # the tiny transformer's blocks in words
    output: Callable[[Any], Any] = lambda result: result.images  # a pipeline result -> its images (or frames)
    adapter: ModelAdapter | None = None  # the family: previews, frames, tokens and the VAE's factor


def demo_model(adapter: ModelAdapter) -> DemoModel:
    """The demo of ``adapter``'s family: its ``demo_spec`` and tiny pipeline, called with its
    ``tiny_call_kwargs`` for one prompt (batch 2 where a batch holds classifier-free guidance's pair)."""
    spec = adapter.demo_spec
    rule = adapter.tiny_size_rule(spec)
    return DemoModel(adapter.demo_title, spec, adapter.tiny_pipeline,
                     lambda spec: adapter.tiny_call_kwargs(spec, batch=1), 2 if adapter.cfg_pairs else 1,
                     rule.max_side, rule.multiple, rule.reason, adapter.describe_blocks(spec), adapter.pipeline_output,
                     adapter)


# The families with a demo (``demo_spec`` set), in registration order.
DEMO_MODELS = {adapter.name: demo_model(adapter) for adapter in families() if adapter.demo_spec is not None}


def check_demo_size(model: str, size: int) -> None:
    """Raise a ValueError before anything is built unless the demo pipeline of ``model`` generates at
    ``size`` pixels a side: a multiple of the family's ``size_multiple`` within its positional table."""
    demo = DEMO_MODELS[model]
    multiple = demo.size_multiple
    if size < 1 or size % multiple:
        lower = size // multiple * multiple
        near = f"{lower} or {lower + multiple}" if lower > 0 else str(multiple)
        raise ValueError(f"--size {size}: the {model} demo model takes multiples of {multiple} ({demo.size_rule}); "
                         f"use {near}.")
    if demo.max_size is not None and size > demo.max_size:
        raise ValueError(f"--size {size} is larger than the {model} demo model's positional table allows; use at "
                         f"most {demo.max_size}.")


def _generate(pipe, demo: DemoModel, size: int, steps: int, seed: int, output_type: str = "latent"):
    return demo.output(pipe(
        **demo.call_kwargs(demo.spec),
        height=size,
        width=size,
        num_inference_steps=steps,
        output_type=output_type,
        generator=torch.Generator().manual_seed(seed),
    ))


def _warm_up(pipe, demo: DemoModel, size: int, steps: int, settings: dict) -> None:
    """One untimed generation of each variant (unmerged, then SDTM), as long as the timed ones: the
    first run of each pays one-time costs (allocations, caches, SDTM's state and ops) that would
    otherwise land in a timed run."""
    remove_SDTM(pipe)
    _generate(pipe, demo, size, steps, seed=0)
    apply_SDTM(pipe, **settings)
    _generate(pipe, demo, size, steps, seed=0)
    remove_SDTM(pipe)


def speedup_line(speedup: float, mac_ratio: float, difference: float) -> str:
    """The demo's verdict: the speedup against the MAC ratio, and the share of that ratio realised. A
    setting that merges nothing (MAC ratio 1.0: e.g. every step protected) has no share to realise, and
    says so; a share above 100% is more than the saved MACs account for (mostly timing noise), and is
    said to be so."""
    text = f"speedup {speedup:.2f}x, MAC ratio {mac_ratio:.2f}x, "
    if mac_ratio <= 1.0:
        text += "no realised share: this setting merges nothing (equal MACs)"
    else:
        share = speedup / mac_ratio
        text += f"realised share {share:.0%}"
        if share > 1.0:
            text += " (more than the saved MACs account for: likely timing noise; more --repeats steady it)"
    return text + f", relative change of the latents {difference:.3f}"


def _timed(pipe, demo, size, steps, repeats) -> tuple[list[float], torch.Tensor]:
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = _generate(pipe, demo, size, steps, seed=0)
        times.append(time.perf_counter() - start)
    return times, out


def demo_settings(model: str, steps: int, backend: str) -> dict:
    """apply_SDTM's settings in the demo: the family's demo switch step (``ModelAdapter.demo_switch_step``;
    None: the family's default)."""
    return {"backend": backend, "switch_step": family(model).demo_switch_step(steps)}


def _mac_report(pipe, size: int, steps: int, settings: dict, text_tokens: int, batch: int, frames: int = 1):
    """Theoretical MACs on the meta device (FlopCounterMode does not see CPU flash attention in a real run),
    with the switch step resolved as the generation resolved it."""
    from ..models import adapter_for

    adapter = adapter_for(pipe.transformer)
    config = adapter.resolve_config(SDTMConfig(**settings), steps)
    return schedule_macs(mac_config(pipe.transformer), size, size, steps, batch=batch, sdtm=config,
                         text_tokens=text_tokens, vae_scale=adapter.vae_scale(pipe), frames=frames)


def run_demo(size: int | None = None, steps: int = 12, repeats: int = 3, backend: str = "auto", out: str | None = ".",
             print_fn=print, model: str | None = None, cache: str = "none") -> dict:
    """Generate on the tiny pipeline of family ``model`` (default: the default family) without and with SDTM; print
    latency, MACs and tokens per phase, and (``out`` not None) write ``out/sdtm_demo.png``: both images
    side by side and the tokens per step. ``cache`` other than "none": four variants instead, with the step
    cache of that name (``run_stacking_demo``).

    ``size`` is the image side in pixels (the demo's VAE does not down-sample, so the token grid is
    size/2 x size/2: every family's tokens span 2 x 2 latent pixels). Returns the numbers it printed.
    """
    model = model or default_family().name
    if model not in DEMO_MODELS:
        raise ValueError(f"--model must be one of {', '.join(DEMO_MODELS)}, got {model!r}.")
    size = family(model).demo_size if size is None else size
    check_demo_size(model, size)
    if out is not None and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is not a folder.")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if cache != "none":
        return run_stacking_demo(cache, size, steps, repeats, backend, out, print_fn, model)
    demo = DEMO_MODELS[model]
    spec = demo.spec
    pipe = demo.build(spec)
    settings = demo_settings(model, steps, backend)
    print_fn(_describe(model, demo, size, steps))
    from ..models import adapter_for

    switch_step = adapter_for(pipe.transformer).resolve_config(SDTMConfig(**settings), steps).switch_step
    family_default = " (the family's default)" if settings["switch_step"] is None else ""
    print_fn(f"SDTM: defaults with switch_step={switch_step}{family_default}, backend={backend}")
    _warm_up(pipe, demo, size, steps, settings)

    baseline_times, sdtm_times = [], []
    for _ in tqdm(range(repeats), desc="timing (interleaved)", leave=False):
        remove_SDTM(pipe)
        baseline_times += _timed(pipe, demo, size, steps, 1)[0]
        apply_SDTM(pipe, **settings)
        sdtm_times += _timed(pipe, demo, size, steps, 1)[0]
    remove_SDTM(pipe)
    baseline_out = _generate(pipe, demo, size, steps, seed=0)
    baseline_image = demo.adapter.preview(_generate(pipe, demo, size, steps, seed=0, output_type="pil")[0])
    apply_SDTM(pipe, **settings)
    sdtm_out = _generate(pipe, demo, size, steps, seed=0)
    sdtm_image = demo.adapter.preview(_generate(pipe, demo, size, steps, seed=0, output_type="pil")[0])
    records = list(sdtm_state(pipe).records)
    grid = sdtm_state(pipe).grid
    report = _mac_report(pipe, size, steps, settings, spec.text_tokens, demo.batch, demo.adapter.tiny_frames(spec))
    baseline_macs, sdtm_macs = report.baseline_macs, report.sdtm_macs
    remove_SDTM(pipe)

    base_s, sdtm_s = statistics.median(baseline_times), statistics.median(sdtm_times)
    mac_ratio = baseline_macs / sdtm_macs
    speedup = base_s / sdtm_s
    difference = ((sdtm_out - baseline_out).norm() / baseline_out.norm()).item()
    print_fn("")
    print_fn(f"{'':12}{'latency (median)':>18}{'MACs':>12}")
    print_fn(f"{'baseline':12}{base_s:>16.3f} s{baseline_macs / 1e9:>10.1f} G")
    print_fn(f"{'SDTM':12}{sdtm_s:>16.3f} s{sdtm_macs / 1e9:>10.1f} G")
    print_fn(speedup_line(speedup, mac_ratio, difference))

    by_phase = defaultdict(list)
    for record in records:
        by_phase[record.mode if record.mode != "merged" else record.phase].append(record)
    print_fn("")
    print_fn(f"{'phase':12}{'block calls':>12}{'attention tokens':>18}{'MLP tokens':>12}")
    for phase in ("protected", "ssm", "idm", "unchanged"):
        if phase in by_phase:
            rs = by_phase[phase]
            attn = statistics.mean(r.attn_tokens for r in rs)
            mlp = statistics.mean(r.mlp_tokens for r in rs)
            print_fn(f"{phase:12}{len(rs):>12}{attn:>18.0f}{mlp:>12.0f}")
    png = None
    if out is not None:
        png = os.path.join(out, "sdtm_demo.png")
        _plot(baseline_image, sdtm_image, records, steps, speedup, mac_ratio, png, demo.title)
        print_fn(f"\nwrote {png}")
    return {"model": model, "png": png, "baseline_s": base_s, "sdtm_s": sdtm_s, "speedup": speedup, "mac_ratio": mac_ratio,
            "realised_share": speedup / mac_ratio if mac_ratio > 1.0 else None,  # None: nothing merged
            "baseline_macs": baseline_macs, "sdtm_macs": sdtm_macs, "relative_change": difference,
            "switch_step": switch_step, "grid": [grid.height, grid.width], "mac_grid": list(report.grid)}


def _describe(model: str, demo: DemoModel, size: int, steps: int) -> str:
    spec = demo.spec
    if demo.batch == 2:
        batch = "batch 2 (CFG)"
    elif demo.adapter.distilled_guidance:
        batch = "batch 1 (guidance-distilled, no CFG)"
    else:
        batch = "batch 1 (CFG: a call per branch)"
    return (f"{demo.title}: {demo.blocks}, C={spec.channels}, {demo.adapter.tiny_tokens(spec, size)} image tokens, "
            f"{batch}, {steps} steps, "
            f"{torch.get_num_threads()} threads")


def run_stacking_demo(cache: str, size: int | None = None, steps: int = 12, repeats: int = 3, backend: str = "auto",
                      out: str | None = ".", print_fn=print, model: str | None = None) -> dict:
    """A step cache stacked with SDTM on the tiny pipeline of ``model``: four pipelines of the same weights
    (unmerged, the cache ``cache`` alone on its deterministic schedule, SDTM alone, both), ``repeats``
    interleaved rounds after one warm-up generation each; prints latency, speedup, what each computed
    (block calls, steps with every block computed) and the stacking efficiency ``speedup(both) /
    (speedup(cache) x speedup(sdtm))``; (``out`` not None) writes ``out/sdtm_demo.png`` with the four
    images. Returns the numbers it printed."""
    from .bench import STACKING_VARIANTS, stacking_efficiency
    from .caches import apply_cache, check_cache, sdtm_record_counts

    model = model or default_family().name
    check_cache(cache, model)
    demo = DEMO_MODELS[model]
    settings = demo_settings(model, steps, backend)
    pipes = {name: demo.build(demo.spec) for name in STACKING_VARIANTS}
    print_fn(_describe(model, demo, size, steps))
    from ..models import adapter_for

    switch_step = adapter_for(pipes["sdtm"].transformer).resolve_config(SDTMConfig(**settings), steps).switch_step
    print_fn(f"SDTM: defaults with switch_step={switch_step}, backend={backend}")
    caches = {}
    try:
        for name, pipe in pipes.items():
            caches[name] = apply_cache(cache if name in ("cache", "both") else "none", pipe, steps)
            if name in ("sdtm", "both"):
                apply_SDTM(pipe, **settings)
        schedule = caches["cache"].schedule()
        print_fn(f"cache {cache}: {schedule['description']}")
        for pipe in pipes.values():  # warm-up
            _generate(pipe, demo, size, steps, seed=0)
        times: dict[str, list[float]] = {name: [] for name in pipes}
        for _ in tqdm(range(repeats), desc="timing (interleaved)", leave=False):
            for name, pipe in pipes.items():
                times[name] += _timed(pipe, demo, size, steps, 1)[0]
        outputs = {name: _generate(pipe, demo, size, steps, seed=0) for name, pipe in pipes.items()}
        computed = {name: caches[name].report() for name in pipes}
        records = {name: sdtm_record_counts(pipes[name].transformer) for name in ("sdtm", "both")}
        images = {name: demo.adapter.preview(_generate(pipe, demo, size, steps, seed=0, output_type="pil")[0])
                  for name, pipe in pipes.items()}
    finally:
        for name, pipe in pipes.items():
            if name in caches:
                caches[name].disable()
            remove_SDTM(pipe)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    speedup = {name: seconds["unmerged"] / seconds[name] for name in STACKING_VARIANTS[1:]}
    efficiency = stacking_efficiency(speedup)
    reference = outputs["unmerged"]
    change = {name: ((outputs[name] - reference).norm() / reference.norm()).item() for name in STACKING_VARIANTS[1:]}
    print_fn("")
    print_fn(f"{'':10}{'latency (median)':>18}{'speedup':>9}{'block calls computed':>22}{'steps all blocks':>18}"
             f"{'change':>8}")
    for name in STACKING_VARIANTS:
        done = computed[name]
        print_fn(f"{name:10}{seconds[name]:>16.3f} s{speedup.get(name, 1.0):>8.2f}x"
                 f"{done['computed_block_calls']:>13}/{done['block_calls']:<8}{done['computed_steps']:>10}/"
                 f"{done['steps']:<7}{change.get(name, 0.0):>8.3f}")
    print_fn(f"stacking efficiency speedup(both) / (speedup(cache) x speedup(sdtm)): {efficiency:.3f}"
             + (" (timing noise at this size; more --repeats steady it)" if abs(efficiency - 1) > 0.1 else ""))
    png = None
    if out is not None:
        png = os.path.join(out, "sdtm_demo.png")
        _plot_stacking(images, speedup, cache, png, demo.title)
        print_fn(f"\nwrote {png}")
    for report in computed.values():
        report.pop("schedule")
    return {"model": model, "cache": cache, "png": png, "seconds": seconds, "speedup": speedup,
            "stacking_efficiency": efficiency, "schedule": schedule, "computed": computed,
            "sdtm_records": records, "relative_change": change, "switch_step": switch_step}


def _plot_stacking(images: dict, speedup: dict, cache: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.6))
    for ax, (name, image) in zip(axes, images.items()):
        ax.imshow(image)
        label = {"cache": cache, "both": f"{cache} + SDTM", "sdtm": "SDTM"}.get(name, name)
        ax.set_title(label + (f" ({speedup[name]:.2f}x)" if name in speedup else ""))
        ax.axis("off")
    fig.suptitle(f"{title} with random weights: the images show noise-like structure, not content")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot(baseline_image, sdtm_image, records, steps: int, speedup: float, mac_ratio: float, path: str,
          title: str = "tiny pipeline") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = defaultdict(list)
    for record in records:
        per_step[record.step].append(record)
    xs = sorted(per_step)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].imshow(baseline_image)
    axes[0].set_title("unmerged")
    axes[1].imshow(sdtm_image)
    axes[1].set_title(f"SDTM ({speedup:.2f}x, MAC ratio {mac_ratio:.2f})")
    for ax in axes[:2]:
        ax.axis("off")
    axes[2].plot(xs, [statistics.mean(r.attn_tokens for r in per_step[s]) for s in xs], label="attention")
    axes[2].plot(xs, [statistics.mean(r.mlp_tokens for r in per_step[s]) for s in xs], "--", label="feed-forward")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("image tokens per block (mean)")
    axes[2].set_xlim(0, steps - 1)
    axes[2].legend()
    fig.suptitle(f"{title} with random weights: the images show noise-like structure, not content")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
