"""One SD3 block (C=1536, 64x64 image tokens, 333 text tokens, batch 2) unmerged, against everything SDTM
adds to it at ratio 0.5 per phase (plan, merges, unmerges; sdtm.cli.bench.block_share_runs), and the block's
own work that SDTM's fused ops take over ("replaced"). Group "block": the share is the median of a
backend-phase variant over "unmerged" (net: less "replaced"); `sdtm bench block` prints it interleaved."""

import pytest

from bench_support import BACKENDS
from sdtm.cli.bench import block_share_runs

CPU_BACKENDS = [b for b in BACKENDS if b.values[0] in ("torch", "cpp")]


@pytest.fixture(scope="module")
def runs():
    return block_share_runs([b.values[0] for b in CPU_BACKENDS])


@pytest.mark.parametrize("variant", ["unmerged", "replaced"] + [f"{b.values[0]}-{phase}" for b in CPU_BACKENDS
                                                     for phase in ("ssm", "idm")])
def test_block(benchmark, runs, variant):
    benchmark.group = "block"
    benchmark.pedantic(runs[variant], rounds=5, iterations=1, warmup_rounds=1)
