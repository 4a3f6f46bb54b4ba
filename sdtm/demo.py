"""The demonstration: a tiny SD3 pipeline built from config, generated with and without SDTM."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from .patch import apply_SDTM, remove_SDTM, sdtm_state
from .tiny import TinySpec, tiny_pipeline, tiny_prompt_embeds

# Large enough that the transformer dominates (2304 image tokens, 4 blocks of width 256), small enough
# to finish in well under a minute on two CPU cores.
DEMO_SPEC = TinySpec(num_layers=4, heads=4, head_dim=64, joint_attention_dim=64, pooled_projection_dim=32,
                     sample_size=96, text_tokens=16)


def _generate(pipe, spec: TinySpec, size: int, steps: int, seed: int):
    return pipe(
        **tiny_prompt_embeds(spec, batch=1),
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=4.0,
        output_type="latent",
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


def _macs(pipe, spec, size, steps) -> int:
    with FlopCounterMode(display=False) as counter:
        _generate(pipe, spec, size, steps, seed=0)
    return counter.get_total_flops() // 2


def run_demo(size: int = 96, steps: int = 12, repeats: int = 3, backend: str = "auto", print_fn=print) -> dict:
    """Generate on the tiny pipeline without and with SDTM; print latency, MACs and tokens per phase.

    ``size`` is the image side in pixels (the demo's VAE does not down-sample, so the latent grid is
    size/2 x size/2 tokens). Returns the numbers it printed.
    """
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
    baseline_macs = _macs(pipe, spec, size, steps)
    apply_SDTM(pipe, **settings)
    sdtm_out = _generate(pipe, spec, size, steps, seed=0)
    records = list(sdtm_state(pipe).records)
    sdtm_macs = _macs(pipe, spec, size, steps)
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
    return {"baseline_s": base_s, "sdtm_s": sdtm_s, "speedup": speedup, "mac_ratio": mac_ratio,
            "baseline_macs": baseline_macs, "sdtm_macs": sdtm_macs, "relative_change": difference}
