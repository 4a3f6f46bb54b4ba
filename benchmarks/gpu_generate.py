"""Time generation on a CUDA GPU: unmerged, SDTM on the torch path and SDTM on the Triton path.

    python benchmarks/gpu_generate.py --model /path/to/a-diffusers-folder
    python benchmarks/gpu_generate.py --random NAME      # a preset's shapes (sdtm macs' names), random weights

With --model the whole pipeline runs (text encoders included) from a local diffusers folder of any
registered family (the pipeline class its model_index.json names), offline. With --random only the
transformer runs, in a plain denoising loop with random prompt embeddings of the family's text tokens
(sdtm.cli.bench.Denoiser), which is where SDTM acts. Each variant is timed with CUDA events after a warm-up,
rounds interleaved, medians reported, next to the theoretical MAC ratio of the transformer calls
(sdtm.cli.macs: torch's FlopCounterMode on the meta device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from tqdm import tqdm

from sdtm import SDTMConfig, apply_sdtm, remove_sdtm
from sdtm.cli.bench import Denoiser, mac_config
from sdtm.cli.macs import schedule_macs
from sdtm.models import adapter_for, presets


class RandomTransformerRun(Denoiser):
    """A preset's transformer with random weights over its family's schedule (the preset's batch)."""

    def __init__(self, preset_name: str, height: int, width: int, steps: int, dtype: torch.dtype):
        import diffusers

        adapter, preset = presets()[preset_name]
        torch.manual_seed(0)
        config = {k: v for k, v in preset.config.items() if not k.startswith("_")}
        transformer = getattr(diffusers, adapter.config_classes[0])(**config).to("cuda", dtype).eval()
        self.batch = preset.batch
        super().__init__(transformer, height // 8, width // 8, steps, preset.batch,
                         text_tokens=adapter.text_tokens(preset.config))
        self.module = transformer


class PipelineRun:
    """A local diffusers folder of a registered family (sdtm.cli.generate.PIPELINES), loaded offline."""

    def __init__(self, model: str, height: int, width: int, steps: int, dtype: torch.dtype):
        import diffusers

        from sdtm.cli.generate import PIPELINES, _read_json_object

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        pipeline = _read_json_object(os.path.join(model, "model_index.json")).get("_class_name")
        if pipeline not in PIPELINES:
            raise SystemExit(f"--model {model!r}: model_index.json names {pipeline!r}; this script loads "
                             f"{', '.join(PIPELINES)} folders")
        family = PIPELINES[pipeline]
        self.module = getattr(diffusers, pipeline).from_pretrained(model, torch_dtype=dtype, local_files_only=True)
        self.module.to("cuda")
        self.module.set_progress_bar_config(disable=True)
        self.batch = 2 if family.cfg_pairs else 1
        self.kwargs = dict(prompt="a photograph of an astronaut riding a horse", height=height, width=width,
                           num_inference_steps=steps, output_type="latent",
                           **family.generate_call_kwargs(family.default_guidance))

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
    """Theoretical MACs of the transformer's calls over the schedule (sdtm.cli.macs, meta device), with the
    family's default switch step."""
    transformer = run.module.transformer if hasattr(run.module, "transformer") else run.module
    sdtm = adapter_for(transformer).resolve_config(SDTMConfig(switch_step=None), steps)
    return schedule_macs(mac_config(transformer), height, width, steps, batch=run.batch, sdtm=sdtm,
                         text_tokens=getattr(run, "text_tokens", None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local diffusers folder of a registered model family")
    source.add_argument("--random", choices=list(presets()), help="random weights in this preset's shapes")
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
           else RandomTransformerRun(args.random, args.height, args.width, args.steps, dtype))

    variants = {"unmerged": None}
    variants.update({b: SDTMConfig(backend=b, switch_step=None) for b in args.backends})
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
    print(f"{result['device']}, {args.dtype}, {args.height}x{args.width}, {args.steps} steps, batch {run.batch}")
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
