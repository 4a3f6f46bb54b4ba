"""Interleaved end-to-end timing on this machine: medians and ratios, next to the MAC ratio.

    python benchmarks/e2e.py [--rounds 5] [--backends torch cpp]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from tqdm import tqdm

from e2e_common import ALL_STRUCTURE, Denoiser, sd3_shaped_transformer
from sdtm import SDTMConfig


def interleaved(runs: dict, rounds: int) -> dict:
    """Median seconds of each run, taking one round of every run in turn."""
    for run in runs.values():
        run[0]()  # warm-up
    times = {name: [] for name in runs}
    for _ in tqdm(range(rounds), desc="rounds", leave=False):
        for name, (run, config) in runs.items():
            run.patch(config)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["torch", "cpp"])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    transformer = sd3_shaped_transformer()
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}

    base = Denoiser(transformer, 128, 128)
    runs = {"unmerged": (base, None)}
    runs.update({b: (Denoiser(transformer, 128, 128), SDTMConfig(backend=b)) for b in args.backends})
    baseline_macs = base.patch(None).macs()
    sdtm_macs = Denoiser(transformer, 128, 128).patch(SDTMConfig(backend="torch")).macs()
    medians = interleaved(runs, args.rounds)
    report["defaults"] = {
        "mac_ratio": baseline_macs / sdtm_macs,
        "seconds": medians,
        "speedup": {b: medians["unmerged"] / medians[b] for b in args.backends},
    }

    small = Denoiser(transformer, 80, 104)
    runs = {"unmerged-40x52": (small, None)}
    runs.update({f"{b}-64x64": (Denoiser(transformer, 128, 128), SDTMConfig(backend=b, **ALL_STRUCTURE))
                 for b in args.backends})
    medians = interleaved(runs, args.rounds)
    report["overhead"] = {
        "seconds": medians,
        "added": {b: medians[f"{b}-64x64"] / medians["unmerged-40x52"] - 1 for b in args.backends},
    }
    for run, _ in runs.values():
        run.patch(None)

    if args.json:
        print(json.dumps(report, indent=2))
        return
    d = report["defaults"]
    print(f"machine: {report['machine']}")
    print(f"10 steps, 64x64 tokens, batch 2, SDTM defaults: MAC ratio {d['mac_ratio']:.3f}")
    print(f"  unmerged {d['seconds']['unmerged']:.2f} s")
    for b in args.backends:
        s = d["speedup"][b]
        print(f"  {b:8} {d['seconds'][b]:.2f} s  speedup {s:.3f}  realised {s / d['mac_ratio']:.1%} of the MAC ratio")
    o = report["overhead"]
    print(f"ratio 0.5 in every step on 64x64 vs unmerged 40x52 (both 2080 tokens): "
          f"{o['seconds']['unmerged-40x52']:.2f} s unmerged")
    for b in args.backends:
        print(f"  {b:8} {o['seconds'][f'{b}-64x64']:.2f} s  ({o['added'][b]:+.1%})")


if __name__ == "__main__":
    main()
