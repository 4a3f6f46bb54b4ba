"""sdtm.cli.host_bench: launch counts per step and per block (deterministic, so exact structural facts), the
Triton launch counter, the result's keys and `sdtm bench host`. No wall-clock assertion."""

import json

import pytest
import torch

from support import requires_cpp, requires_triton
from sdtm.cli.main import main
from sdtm.cli.host_bench import (
    OUTSIDE,
    HostDenoiser,
    HostSetting,
    LaunchCounter,
    bench_host,
    count_generation,
    count_triton_launches,
    format_host_report,
    format_targets,
    host_targets,
    host_transformer,
    op_category,
    triton_block_launches,
)
from sdtm.core.ops import cpp_unavailable_reason
from sdtm.core.patch import apply_sdtm

# Two joint blocks and the last block (no text output); steps 0 and 3 protected, 1 structure, 2 detail.
SMALL = HostSetting(layers=3, steps=4, switch_step=1, grid=16)
CPU_BACKENDS = ["torch"] + (["cpp"] if cpp_unavailable_reason() is None else [])
# diffusers' text stream of a joint block: what the last block (context_pre_only) does not launch.
TEXT_STREAM_LAUNCHES = 14


def _counted(backend: str | None, setting: HostSetting = SMALL, per_block: bool = True):
    transformer = host_transformer(setting)
    denoiser = HostDenoiser(transformer, setting, torch.device("cpu"))
    if backend is not None:
        apply_sdtm(transformer, setting.sdtm_config(backend), scheduler=denoiser.scheduler)
    denoiser.generation()  # first calls fill caches
    return count_generation(denoiser, per_block=per_block)


@pytest.fixture(scope="module")
def unmerged():
    return _counted(None)


def test_op_categories():
    aten = torch.ops.aten
    assert op_category(aten.view.default) == "view"
    assert op_category(aten.transpose.int) == "view"
    assert op_category(aten._unsafe_view.default) == "view"
    assert op_category(aten.empty.memory_format) == "allocation"
    assert op_category(aten.add.Tensor) == "kernel"
    assert op_category(aten.copy_.default) == "kernel"


def test_counter_sees_decomposed_ops_and_skips_views():
    x, w = torch.randn(2, 4, 8), torch.randn(3, 8)
    counter = LaunchCounter()
    with counter:
        counter.step = 0
        torch.nn.functional.linear(x, w).transpose(0, 1).reshape(-1)
    # linear -> t (view) + mm (a 3-d input: view, mm, _unsafe_view); transpose is a view; the reshape of
    # a non-contiguous tensor copies (clone) and views.
    assert counter.names[0, OUTSIDE] == {"aten.mm": 1, "aten.clone": 1}
    assert counter.launches(0, OUTSIDE) == 2


def test_unmerged_step_is_its_blocks_plus_the_outside(unmerged):
    per_layer = unmerged.per_layer
    joint, last = per_layer[0][0], per_layer[0][-1]
    assert all(row == [joint] * (SMALL.layers - 1) + [last] for row in per_layer)
    assert joint - last == TEXT_STREAM_LAUNCHES
    outside = unmerged.outside_per_step[0]
    assert unmerged.outside_per_step == [outside] * SMALL.steps
    assert unmerged.per_step == [(SMALL.layers - 1) * joint + last + outside] * SMALL.steps
    assert unmerged.per_block["unmerged"]["typical"] == joint
    # Attributing ops to blocks (module hooks) adds none.
    assert _counted(None, per_block=False).per_step == unmerged.per_step


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sdtm_block_launches_by_phase(unmerged, backend):
    report = _counted(backend)
    assert report.step_kinds == ["protected", "structure", "detail", "protected"]
    blocks = report.per_block
    base = unmerged.per_block["unmerged"]
    # A protected block is diffusers' block plus one copy per stored cache (attention and MLP outputs);
    # the residual add after the MLP runs in place.
    assert blocks["protected"]["typical"] == base["typical"] + 2
    assert blocks["protected"]["ops"]["aten.copy_"] == 2
    for phase in ("protected", "structure", "detail"):
        # Every form of the block leaves the text stream to diffusers: the last block launches that much less.
        steps, typical = report.step_kinds.count(phase), blocks[phase]["typical"]
        assert blocks[phase]["counts"] == {str(typical - TEXT_STREAM_LAUNCHES): steps,
                                           str(typical): steps * (SMALL.layers - 1)}
    assert min(report.outside_per_step) >= unmerged.outside_per_step[0]
    assert sum(report.per_layer[s][layer] for s in range(SMALL.steps) for layer in range(SMALL.layers)) + sum(
        report.outside_per_step) == sum(report.per_step)
    # Counting is deterministic.
    assert _counted(backend).per_step == report.per_step


@requires_cpp
def test_cpp_merged_blocks_call_each_fused_op_once_per_use():
    blocks = _counted("cpp").per_block
    structure, detail = blocks["structure"]["ops"], blocks["detail"]["ops"]
    assert {k: v for k, v in structure.items() if k.startswith("sdtm.")} == {
        "sdtm.norm_modulate": 1, "sdtm.window_scores": 1, "sdtm.ssm_plan": 1, "sdtm.merge": 1,
        "sdtm.norm_modulate_merge": 1, "sdtm.unmerge_into": 2}
    # Detail phase: attention unmerged, only the MLP merges.
    assert {k: v for k, v in detail.items() if k.startswith("sdtm.")} == {
        "sdtm.norm_modulate": 1, "sdtm.idm_candidates": 1, "sdtm.bipartite_match": 1, "sdtm.idm_plan": 1,
        "sdtm.norm_modulate_merge": 1, "sdtm.unmerge_into": 1}


@requires_triton
def test_triton_launches_are_counted_once_each():
    import triton
    import triton.language as tl

    from sdtm_kernels import TRITON_OPS
    from support import TRITON_DEVICE

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    original = triton.runtime.jit.JITFunction.__dict__["run"]
    x = torch.zeros(10, device=TRITON_DEVICE)
    counter = LaunchCounter()
    with count_triton_launches(counter), counter:
        counter.step = 0
        for _ in range(3):
            add_one[(2,)](x, 10, BLOCK=8)
    assert x.tolist() == [3.0] * 10
    assert counter.triton[0, OUTSIDE] == 3
    assert counter.launches(0, OUTSIDE) == 3  # the interpreter's own tensor copies are not counted

    # A fused op: one kernel and its output's allocation.
    tokens = torch.randn(2, 4, 8, device=TRITON_DEVICE)
    slot = torch.tensor([[0, 1, 2, 2]] * 2, device=TRITON_DEVICE)
    members = torch.tensor([[0, 1, 2, 3]] * 2, device=TRITON_DEVICE)
    offsets = torch.tensor([[0, 1, 2, 4]] * 2, device=TRITON_DEVICE)
    counter = LaunchCounter()
    with count_triton_launches(counter), counter:
        counter.step = 0
        merged = TRITON_OPS.merge(tokens, slot, members, offsets, False)
    torch.testing.assert_close(merged[:, 2], tokens[:, 2:].mean(1))
    assert counter.triton[0, OUTSIDE] == 1
    assert dict(counter.names[0, OUTSIDE]) == {"aten.empty": 1}
    assert triton.runtime.jit.JITFunction.__dict__["run"] is original  # the wrapper is gone


@requires_triton
def test_triton_block_launches_by_phase():
    # One block (the last one): protected, structure, detail, protected.
    result = triton_block_launches(HostSetting(layers=1, steps=4, switch_step=1, grid=16))
    unmerged, triton = result["unmerged"], result["triton"]
    assert triton["protected"]["triton"] == 0
    assert triton["protected"]["typical"] == unmerged["typical"] + 2
    for phase in ("structure", "detail"):
        assert triton[phase]["triton"] > 0
        assert triton[phase]["typical"] == triton[phase]["aten"] + triton[phase]["triton"]
    assert len(result["per_step"]["triton"]) == 4


@pytest.fixture(scope="module")
def small_result():
    return bench_host(SMALL, CPU_BACKENDS, rounds=1, compile_backend=None, progress=False)


def test_result_keys(small_result):
    assert set(small_result) == {"machine", "setting", "counted", "variants", "ratios", "targets"}
    assert {"layers", "grid", "image_tokens", "text_tokens", "steps", "switch_step", "compile_backend",
            "threads"} <= set(small_result["setting"])
    labels = [row["label"] for row in small_result["variants"]]
    assert labels == ["eager unmerged"] + [f"eager {b}" for b in CPU_BACKENDS]
    for row in small_result["variants"]:
        assert {"host_ms_per_step", "host_ms_per_step_mean", "host_ms_per_step_kind", "first_generation_s",
                "launches_per_step", "launches_per_step_kind", "launches_outside_blocks_per_step",
                "launches_per_block", "host_breakdown", "launches"} <= set(row)
        assert row["timed_steps"] == SMALL.steps
        assert row["host_ms_per_step"] > 0
    assert set(small_result["ratios"]) == {"eager"}
    for backend in CPU_BACKENDS:
        ratio = small_result["ratios"]["eager"][backend]
        assert {"host_time", "host_time_mean", "launches_per_step", "block_launches"} <= set(ratio)
        assert set(ratio["block_launches"]) == {"protected", "structure", "detail"}
    assert set(small_result["targets"]["host_time_met"]) == set(CPU_BACKENDS)
    json.dumps(small_result)


def test_compiled_variants_are_counted_running_their_graphs():
    """aot_eager runs its functionalised graphs op by op: they are counted (the ops inside the wrappers of
    mutating custom ops too), with no recompilation (which would run the model eagerly) and without
    telling blocks apart."""
    backend = CPU_BACKENDS[-1]
    setting = HostSetting(layers=1, steps=2, switch_step=0, grid=16)  # a protected step, then a detail step
    torch._dynamo.reset()
    try:
        result = bench_host(setting, [backend], rounds=1, compile_backend="aot_eager", progress=False)
    finally:
        torch._dynamo.reset()
    rows = {row["label"]: row for row in result["variants"]}
    assert set(rows) == {"eager unmerged", f"eager {backend}", "compiled unmerged", f"compiled {backend}"}
    for label in ("compiled unmerged", f"compiled {backend}"):
        assert rows[label]["launches_per_block"] is None and rows[label]["host_breakdown"] is None
        assert rows[label]["launches_outside_blocks_per_step"] is None
    assert rows["compiled unmerged"]["launches"]["per_step"] == [rows["compiled unmerged"]["launches_per_step"]] * 2
    assert rows[f"compiled {backend}"]["launches_per_step_kind"].keys() == {"protected", "detail"}
    if backend == "cpp":
        # unmerge_into mutates its arguments: the graph calls it inside auto_functionalized.
        assert rows["compiled cpp"]["launches"]["ops"]["sdtm.unmerge_into"] == 1
    assert set(result["ratios"]["compiled"][backend]) == {"host_time", "host_time_mean", "launches_per_step"}


def test_cli_host_json(capsys):
    args = ["bench", "host", "--json", "--layers", "2", "--steps", "4", "--switch-step", "1", "--grid", "16",
            "--rounds", "1", "--compile", "none", "--backends", "torch"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["label"] for row in result["variants"]] == ["eager unmerged", "eager torch"]


def test_cli_host_options_are_host_only(capsys):
    assert main(["bench", "e2e", "--steps", "3"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["bench", "host", "--compile", "fast"]) == 2
    assert "--compile" in capsys.readouterr().err


@pytest.mark.parametrize("settings", [{"ratio": 0.0, "deviation": 0.0}, {"steps": 1}],
                         ids=["ratio0", "protected-steps-only"])
def test_targets_are_not_measured_when_no_block_merged(settings):
    """A run where no block merges (ratio 0, or a schedule whose only step is protected) meets no target
    over nothing: each says not measured."""
    setting = HostSetting(layers=3, grid=16, **{"steps": 4, "switch_step": 1, **settings})
    result = bench_host(setting, ["torch"], rounds=1, compile_backend=None, progress=False)
    assert not {"structure", "detail"} & set(result["ratios"]["eager"]["torch"]["block_launches"])
    targets = result["targets"]
    assert targets["host_time_met"] == {"torch": None} and targets["block_launches_met"] == {"torch": None}
    assert targets["block_launches_not_measured"] == {"torch": ["structure", "detail"]}
    line = format_host_report(result).splitlines()[-1]
    assert line == ("targets (eager): host time <= 1.15x: torch not measured: no block merged; merged block "
                    "launches <= 1.3x: torch not measured: no block merged in the structure or detail phase")
    assert " met" not in line
    json.dumps(result)


def test_block_target_names_the_merged_phase_it_did_not_measure():
    """Judged on the merged phases that ran: a schedule without detail steps says so beside its verdict."""
    eager = {"torch": {"host_time": 1.1, "block_launches": {"protected": 1.04, "structure": 1.2}},
             "cpp": {"host_time": 1.2, "block_launches": {"protected": 1.04, "structure": 1.4, "detail": 1.1}}}
    targets = host_targets(eager)
    assert targets["host_time_met"] == {"torch": True, "cpp": False}
    assert targets["block_launches_met"] == {"torch": True, "cpp": False}
    assert targets["block_launches_not_measured"] == {"torch": ["detail"], "cpp": []}
    assert format_targets(targets) == (
        "targets (eager): host time <= 1.15x: torch met, cpp missed; merged block launches <= 1.3x: torch met "
        "(detail phase not measured: no block merged in it), cpp missed")


def test_cli_host_says_not_measured_at_ratio_zero(capsys):
    args = ["bench", "host", "--layers", "2", "--steps", "4", "--switch-step", "1", "--grid", "16", "--rounds", "1",
            "--compile", "none", "--backends", "torch", "--ratio", "0", "--deviation", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "merged block launches <= 1.3x: torch not measured: no block merged" in out
    assert "torch met" not in out
