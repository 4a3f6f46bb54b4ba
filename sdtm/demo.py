"""The demonstration: a tiny SD3 pipeline built from config, generated with and without SDTM."""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from .config import SDTMConfig
from .macs import schedule_macs
from .patch import apply_SDTM, remove_SDTM, sdtm_state
from .tiny import TinySpec, tiny_pipeline, tiny_prompt_embeds

# Large enough that the transformer dominates (2304 image tokens, 4 blocks of width 256), small enough
# to finish in well under a minute on two CPU cores.
DEMO_SPEC = TinySpec(num_layers=4, heads=4, head_dim=64, joint_attention_dim=64, pooled_projection_dim=32,
                     sample_size=96, text_tokens=16)


def _generate(pipe, spec: TinySpec, size: int, steps: int, seed: int, output_type: str = "latent"):
    return pipe(
        **tiny_prompt_embeds(spec, batch=1),
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=4.0,
        output_type=output_type,
        generator=torch.Generator().manual_seed(seed),
    ).images


def _timed(pipe, spec, size, steps, repeats) -> tuple[list[float], torch.Tensor]:
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = _generate(pipe, spec, size, steps, seed=0)
        times.append(time.perf_counter() - start)
    return times, out


def _mac_report(pipe, size: int, steps: int, settings: dict, text_tokens: int):
    """Theoretical MACs on the meta device (FlopCounterMode does not see CPU flash attention in a real run)."""
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    return schedule_macs(config, size, size, steps, batch=2, sdtm=SDTMConfig(**settings), text_tokens=text_tokens,
                         vae_scale=pipe.vae_scale_factor)


def run_demo(size: int = 96, steps: int = 12, repeats: int = 3, backend: str = "auto", out: str | None = ".",
             print_fn=print) -> dict:
    """Generate on the tiny pipeline without and with SDTM; print latency, MACs and tokens per phase, and
    (``out`` not None) write ``out/sdtm_demo.png``: both images side by side and the tokens per step.

    ``size`` is the image side in pixels (the demo's VAE does not down-sample, so the latent grid is
    size/2 x size/2 tokens). Returns the numbers it printed.
    """
    if out is not None and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is not a folder.")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    spec = DEMO_SPEC
    pipe = tiny_pipeline(spec)
    # The reference switches phase at step 20 of 50; keep that proportion so both phases show.
    settings = {"backend": backend, "switch_step": round(steps * 20 / 50)}
    print_fn(f"tiny SD3 pipeline: {spec.num_layers} blocks, C={spec.channels}, {(size // 2) ** 2} image tokens, "
             f"batch 2 (CFG), {steps} steps, {torch.get_num_threads()} threads")
    print_fn(f"SDTM: defaults with switch_step={settings['switch_step']}, backend={backend}")
    _generate(pipe, spec, size, 2, seed=0)  # warm-up

    baseline_times, sdtm_times = [], []
    for _ in tqdm(range(repeats), desc="timing (interleaved)", leave=False):
        remove_SDTM(pipe)
        baseline_times += _timed(pipe, spec, size, steps, 1)[0]
        apply_SDTM(pipe, **settings)
        sdtm_times += _timed(pipe, spec, size, steps, 1)[0]
    remove_SDTM(pipe)
    baseline_out = _generate(pipe, spec, size, steps, seed=0)
    baseline_image = _generate(pipe, spec, size, steps, seed=0, output_type="pil")[0]
    apply_SDTM(pipe, **settings)
    sdtm_out = _generate(pipe, spec, size, steps, seed=0)
    sdtm_image = _generate(pipe, spec, size, steps, seed=0, output_type="pil")[0]
    records = list(sdtm_state(pipe).records)
    report = _mac_report(pipe, size, steps, settings, spec.text_tokens)
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
    print_fn(f"speedup {speedup:.2f}x, MAC ratio {mac_ratio:.2f}x, realised share {speedup / mac_ratio:.0%}, "
             f"relative change of the latents {difference:.3f}")

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
        _plot(baseline_image, sdtm_image, records, steps, speedup, mac_ratio, png)
        print_fn(f"\nwrote {png}")
    return {"png": png, "baseline_s": base_s, "sdtm_s": sdtm_s, "speedup": speedup, "mac_ratio": mac_ratio,
            "baseline_macs": baseline_macs, "sdtm_macs": sdtm_macs, "relative_change": difference}


def _plot(baseline_image, sdtm_image, records, steps: int, speedup: float, mac_ratio: float, path: str) -> None:
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
    fig.suptitle("tiny SD3 pipeline with random weights: the images show noise-like structure, not content")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
