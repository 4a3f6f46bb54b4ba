"""End to end: a transformer of each family's shape, shrunk for the CPU, over a 10-step schedule on a
64 x 64 token grid (sdtm.cli.bench.E2E_MODELS): SD3 (C=768, 2 blocks, 333 text tokens, batch 2), FLUX.1-dev
(C=768, 1 double-stream + 2 single-stream blocks, 512 text tokens, batch 1), PixArt-Sigma (C=576, 2
blocks, 300 text tokens, batch 2).

Group "e2e-<model>": unmerged vs SDTM defaults (the family's switch step) on the torch path vs the cpp
path; each SDTM run records the theoretical MAC ratio (torch's FlopCounterMode on the meta device,
sdtm.cli.macs) in extra_info. Group "e2e-overhead-<model>": SDTM at ratio 0.5 in every step (64 x 64 grid ->
2080 tokens) vs the unpatched model on a 40 x 52 grid (2080 tokens): the difference is everything SDTM
adds. `python benchmarks/e2e.py --model <model>` runs the same comparisons interleaved.
"""

import pytest

from bench_support import BACKENDS
from e2e_common import ALL_STRUCTURE, E2E_MODELS, Denoiser, mac_config, resolved_config, shaped_transformer
from sdtm import SDTMConfig
from sdtm.cli.macs import schedule_macs

MODELS = list(E2E_MODELS)
STEPS = 10


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    """(family, its shrunk transformer)."""
    return request.param, shaped_transformer(request.param)


@pytest.mark.parametrize("variant", ["unmerged"] + [f"sdtm-{b.values[0]}" for b in BACKENDS])
def test_e2e(benchmark, model, variant):
    family, transformer = model
    spec = E2E_MODELS[family]
    benchmark.group = f"e2e-{family}"
    run = Denoiser(transformer, 128, 128, STEPS, batch=spec["batch"])
    config = None if variant == "unmerged" else SDTMConfig(backend=variant.removeprefix("sdtm-"), switch_step=None)
    run.patch(config)
    if config is not None:
        counted = schedule_macs(mac_config(transformer), 1024, 1024, STEPS, batch=spec["batch"],
                                sdtm=resolved_config(transformer, config, STEPS), text_tokens=spec["text_tokens"])
        benchmark.extra_info["mac_ratio"] = counted.mac_ratio
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    run.patch(None)


@pytest.mark.parametrize("variant", ["unmerged-40x52"] + [f"sdtm-{b.values[0]}-64x64" for b in BACKENDS])
def test_e2e_overhead(benchmark, model, variant):
    family, transformer = model
    batch = E2E_MODELS[family]["batch"]
    benchmark.group = f"e2e-overhead-{family}"
    if variant.startswith("unmerged"):
        run = Denoiser(transformer, 80, 104, STEPS, batch=batch).patch(None)
    else:
        backend = variant.split("-")[1]
        run = Denoiser(transformer, 128, 128, STEPS, batch=batch).patch(SDTMConfig(backend=backend, **ALL_STRUCTURE))
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    run.patch(None)
