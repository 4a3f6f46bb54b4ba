"""End to end: an SD3-shaped transformer (C=768, 2 blocks, 333 text tokens) over a 10-step schedule.

Group "e2e": unmerged vs SDTM defaults on the torch path vs the cpp path; each SDTM run records the
theoretical MAC ratio (torch's FlopCounterMode on the meta device, sdtm.macs) in extra_info. Group "e2e-overhead": SDTM at ratio 0.5
in every step (64 x 64 grid -> 2080 tokens) vs the unpatched model on a 40 x 52 grid (2080 tokens): the
difference is everything SDTM adds. `python benchmarks/e2e.py` runs the same comparisons interleaved.
"""

import pytest

from bench_support import BACKENDS
from e2e_common import ALL_STRUCTURE, Denoiser, sd3_shaped_transformer
from sdtm import SDTMConfig
from sdtm.macs import schedule_macs


@pytest.fixture(scope="module")
def transformer():
    return sd3_shaped_transformer()


@pytest.mark.parametrize("variant", ["unmerged"] + [f"sdtm-{b.values[0]}" for b in BACKENDS])
def test_e2e(benchmark, transformer, variant):
    benchmark.group = "e2e"
    run = Denoiser(transformer, 128, 128)
    config = None if variant == "unmerged" else SDTMConfig(backend=variant.removeprefix("sdtm-"))
    run.patch(config)
    if config is not None:
        model_config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        benchmark.extra_info["mac_ratio"] = schedule_macs(model_config, 1024, 1024, 10, batch=2, sdtm=config).mac_ratio
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    run.patch(None)


@pytest.mark.parametrize("variant", ["unmerged-40x52"] + [f"sdtm-{b.values[0]}-64x64" for b in BACKENDS])
def test_e2e_overhead(benchmark, transformer, variant):
    benchmark.group = "e2e-overhead"
    if variant.startswith("unmerged"):
        run = Denoiser(transformer, 80, 104).patch(None)
    else:
        backend = variant.split("-")[1]
        run = Denoiser(transformer, 128, 128).patch(SDTMConfig(backend=backend, **ALL_STRUCTURE))
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    run.patch(None)
