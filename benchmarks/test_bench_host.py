"""Host cost per generation: the SD3-medium topology (24 blocks) with tensors shrunk until compute is small
(sdtm.cli.host_bench.HostSetting: one head of width 16, 16 x 16 image + 16 text tokens, batch 2, 12 steps with
protected, structure and detail steps), eager, one CPU thread.

Group "host": one whole generation, unmerged vs SDTM per CPU backend; each SDTM run records its launches
per step and per block call by phase in extra_info (deterministic: ops reaching the dispatcher's kernels).
`sdtm bench host` runs the same comparison interleaved, adds the compiled variants and the ratios.
"""

import pytest
import torch

from bench_support import BACKENDS
from sdtm.cli.host_bench import HostDenoiser, HostSetting, count_generation, host_transformer
from sdtm.core.patch import apply_sdtm

SETTING = HostSetting()
CPU_BACKENDS = [b for b in BACKENDS if b.values[0] in ("torch", "cpp")]


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(SETTING.threads)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("variant", ["unmerged"] + [b.values[0] for b in CPU_BACKENDS])
def test_host(benchmark, one_thread, variant):
    benchmark.group = "host"
    transformer = host_transformer(SETTING)
    denoiser = HostDenoiser(transformer, SETTING, torch.device("cpu"))
    if variant != "unmerged":
        apply_sdtm(transformer, SETTING.sdtm_config(variant), scheduler=denoiser.scheduler)
    denoiser.generation()
    launches = count_generation(denoiser)
    benchmark.extra_info["launches_per_step"] = launches.per_step_mean
    benchmark.extra_info["launches_per_block"] = {phase: stats["typical"] for phase, stats in launches.per_block.items()}
    benchmark.pedantic(denoiser.generation, rounds=3, iterations=1, warmup_rounds=1)
