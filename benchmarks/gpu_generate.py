"""Time SD3 generation on a CUDA GPU: unmerged, SDTM on the torch path and SDTM on the Triton path.

    python benchmarks/gpu_generate.py --model /path/to/stable-diffusion-3-medium-diffusers
    python benchmarks/gpu_generate.py --random sd3-medium     # same shapes, random weights, no files

With --model the whole pipeline runs (text encoders included) from a local diffusers folder, offline.
With --random only the transformer runs, in a plain denoising loop with random prompt embeddings (333
text tokens), which is where SDTM acts. Each variant is timed with CUDA events after a warm-up, rounds
interleaved, medians reported, next to the theoretical MAC ratio of the transformer calls (sdtm.cli.macs:
torch's FlopCounterMode on the meta device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from tqdm import tqdm

from sdtm import SDTMConfig, apply_sdtm, remove_sdtm
from sdtm.cli.bench import Denoiser
from sdtm.cli.macs import PRESETS, schedule_macs

class RandomTransformerRun(Denoiser):
    """The SD3-medium transformer with random weights over a flow-matching schedule (batch 2)."""

    def __init__(self, height: int, width: int, steps: int, batch: int, dtype: torch.dtype):
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**PRESETS["sd3-medium"]).to("cuda", dtype).eval()
        super().__init__(transformer, height // 8, width // 8, steps, batch)
        self.module = transformer


class PipelineRun:
    """A local diffusers SD3 / SD3.5 folder, loaded offline."""

    def __init__(self, model: str, height: int, width: int, steps: int, dtype: torch.dtype):
        from diffusers import StableDiffusion3Pipeline

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.module = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
        self.module.to("cuda")
        self.module.set_progress_bar_config(disable=True)
        self.kwargs = dict(prompt="a photograph of an astronaut riding a horse", height=height, width=width,
                           num_inference_steps=steps, output_type="latent")

    def patch(self, config):
        remove_sdtm(self.module)
        if config is not None:
            apply_sdtm(self.module, config)

    @torch.no_grad()
    def __call__(self):
        return self.module(**self.kwargs, generator=torch.Generator("cuda").manual_seed(0)).images


def cuda_seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0


def mac_report(run, height: int, width: int, steps: int):
    """Theoretical MACs of the transformer's calls over the schedule (sdtm.cli.macs, meta device)."""
    transformer = run.module.transformer if hasattr(run.module, "transformer") else run.module
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    return schedule_macs(config, height, width, steps, batch=2, sdtm=SDTMConfig())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local diffusers SD3 / SD3.5 folder")
    source.add_argument("--random", choices=["sd3-medium"], help="random weights in this model's shapes")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--backends", nargs="+", default=["torch", "triton"])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r} is not a folder")
    dtype = getattr(torch, args.dtype)
    run = (PipelineRun(args.model, args.height, args.width, args.steps, dtype) if args.model
           else RandomTransformerRun(args.height, args.width, args.steps, 2, dtype))

    variants = {"unmerged": None}
    variants.update({b: SDTMConfig(backend=b) for b in args.backends})
    report = mac_report(run, args.height, args.width, args.steps)
    baseline_macs, sdtm_macs = report.baseline_macs, report.sdtm_macs
    times = {name: [] for name in variants}
    for config in variants.values():  # warm-up: Triton compiles and autotunes here
        run.patch(config)
        run()
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, config in variants.items():
            run.patch(config)
            times[name].append(cuda_seconds(run))
    run.patch(None)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    mac_ratio = baseline_macs / sdtm_macs
    result = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "steps": args.steps,
              "size": [args.height, args.width], "mac_ratio": mac_ratio, "seconds": medians,
              "speedup": {b: medians["unmerged"] / medians[b] for b in args.backends}}
    print(f"{result['device']}, {args.dtype}, {args.height}x{args.width}, {args.steps} steps, batch 2")
    print(f"theoretical MAC ratio {mac_ratio:.3f} ({baseline_macs / 1e12:.1f} -> {sdtm_macs / 1e12:.1f} TMACs)")
    print(f"  unmerged {medians['unmerged']:.3f} s")
    for b in args.backends:
        s = result["speedup"][b]
        print(f"  {b:8} {medians[b]:.3f} s  speedup {s:.3f}  ({s / mac_ratio:.0%} of the MAC ratio)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
