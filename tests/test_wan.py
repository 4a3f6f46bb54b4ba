"""SDTM on a tiny Wan 2.x pipeline (video): exact where nothing merges, windows inside frames, every
backend equal to the torch path, odd frame counts and frame shapes, batches and classifier-free guidance,
half precision, torch.compile, Wan 2.2's two experts, and merged block calls recomputed from diffusers'
own sub-modules."""

import pytest
import torch

from oracle_support import record_merged_calls
from support import fresh_dynamo, relative_difference, requires_cpp, requires_triton  # noqa: F401  (fixture)
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.models.wan import TinyWanSpec, merged_rotary, tiny_wan_pipeline, tiny_wan_prompt_embeds

SPEC = TinyWanSpec()
MERGING = dict(ratio=0.5, deviation=0.0, switch_step=2)
# 128 x 96 pixels, 9 frames: 3 latent frames of 8 x 6 tokens (144 tokens, 36 windows of 2 x 2).
HEIGHT, WIDTH, FRAMES = 128, 96, 9
TOKENS = 3 * 8 * 6


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline(SPEC)


@pytest.fixture(autouse=True)
def _unpatched(wan):
    yield
    remove_SDTM(wan)


def generate(pipe, height=HEIGHT, width=WIDTH, frames=FRAMES, steps=6, batch=1, guidance=5.0,
             dtype=torch.float32, **kwargs):
    embeds = tiny_wan_prompt_embeds(SPEC, dtype=dtype)
    return pipe(**embeds, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                guidance_scale=guidance, num_videos_per_prompt=batch, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).frames


@pytest.mark.parametrize("settings", [{"ratio": 0.0, "deviation": 0.0}, {"protect_steps_frequency": 1},
                                      {"protect_layers_frequency": 1}], ids=["ratio0", "steps", "layers"])
def test_nothing_merged_reproduces_unpatched_bit_for_bit(wan, settings):
    expected = generate(wan)
    apply_SDTM(wan, **settings)
    assert torch.equal(generate(wan), expected)


def test_merging_changes_the_output_and_removal_restores_it(wan):
    expected = generate(wan)
    apply_SDTM(wan, **MERGING)
    merged = generate(wan)
    assert not torch.equal(merged, expected) and torch.isfinite(merged).all()
    state = sdtm_state(wan)
    assert (state.grid.frames, state.grid.height, state.grid.width) == (3, 8, 6)
    records = state.records
    assert sorted({r.step for r in records}) == list(range(6))  # UniPC's timesteps located
    structure = [r for r in records if r.mode == "merged" and r.phase == "ssm"]
    detail = [r for r in records if r.mode == "merged" and r.phase == "idm"]
    assert structure and all(r.attn_tokens == r.mlp_tokens < TOKENS for r in structure)
    assert detail and all(r.attn_tokens == TOKENS > r.mlp_tokens for r in detail)
    # Classifier-free guidance calls the transformer twice a step: 2 layers x 2 calls per step.
    assert len(records) == 6 * 2 * 2
    remove_SDTM(wan)
    assert torch.equal(generate(wan), expected)


@pytest.mark.parametrize("height, width, frames, grid", [(144, 128, 13, (4, 9, 8)), (80, 192, 17, (5, 5, 12)),
                                                         (128, 64, 9, (3, 8, 4))],
                         ids=["odd-rows-4-frames", "5-frames-wide", "3-frames-tall"])
def test_windows_stay_inside_frames(wan, height, width, frames, grid):
    """Odd rows per frame (as at 720p), odd frame counts, non-square frames: every merged group lies in one
    frame, and a frame's last row, when it cannot fill a window, never merges."""
    apply_SDTM(wan, backend="torch", **MERGING)
    monkeypatch = pytest.MonkeyPatch()
    try:
        calls = record_merged_calls(wan, monkeypatch, lambda: generate(wan, height, width, frames, steps=4))
    finally:
        monkeypatch.undo()
    state = sdtm_state(wan)
    assert (state.grid.frames, state.grid.height, state.grid.width) == grid
    frames_, rows, cols = grid
    frame_of = torch.arange(frames_ * rows * cols) // (rows * cols)
    row_of = torch.arange(frames_ * rows * cols) % (rows * cols) // cols
    merged_some = False
    for call in calls:
        plan = call.plan
        for b in range(plan.slot.shape[0]):
            groups = plan.slot[b][plan.blend[b]]
            for group in groups.unique():
                members = (plan.slot[b] == group).nonzero().flatten()
                assert frame_of[members].unique().numel() == 1
                merged_some = merged_some or members.numel() > 1
            if rows % 2:
                assert not plan.blend[b][row_of == rows - 1].any()
    assert calls and merged_some


@requires_cpp
def test_cpp_backend_equals_torch_backend(wan):
    apply_SDTM(wan, backend="torch", **MERGING)
    reference = generate(wan, height=144, width=128, frames=13)
    apply_SDTM(wan, backend="cpp", **MERGING)
    assert relative_difference(generate(wan, height=144, width=128, frames=13), reference) <= 1e-5


@requires_triton
def test_triton_backend_equals_torch_backend(wan):
    apply_SDTM(wan, backend="torch", **MERGING)
    reference = generate(wan, steps=4)
    apply_SDTM(wan, backend="triton", **MERGING)
    assert relative_difference(generate(wan, steps=4), reference) <= 1e-5


@pytest.mark.parametrize("batch, guidance", [(1, 1.0), (1, 5.0), (2, 5.0), (3, 1.0)],
                         ids=["B1", "B1-cfg", "B2-cfg", "B3"])
def test_batches(wan, batch, guidance):
    apply_SDTM(wan, use_rand=True, **MERGING)
    out = generate(wan, batch=batch, guidance=guidance, steps=4)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    calls_per_step = 2 if guidance > 1 else 1
    assert len(sdtm_state(wan).records) == 4 * 2 * calls_per_step
    assert any(r.mode == "merged" and r.mlp_tokens < TOKENS for r in sdtm_state(wan).records)


# Relative difference of the latents with MERGING against unmerged, 4 steps, measured: fp16 0.0192,
# bf16 0.0222 (float32: 0.0191). Bounds: a factor 4 either side, while an SDTM that merges nothing (0) or
# changes the video far more fails.
HALF_PRECISION_EFFECT = {torch.float16: 0.0192, torch.bfloat16: 0.0222}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    pipe = tiny_wan_pipeline(SPEC, dtype=dtype)
    expected = generate(pipe, dtype=dtype, steps=4)
    apply_SDTM(pipe, ratio=0.0, deviation=0.0)
    assert torch.equal(generate(pipe, dtype=dtype, steps=4), expected)
    apply_SDTM(pipe, protect_steps_frequency=1)
    assert torch.equal(generate(pipe, dtype=dtype, steps=4), expected)
    apply_SDTM(pipe, **MERGING)
    merged = generate(pipe, dtype=dtype, steps=4)
    assert merged.dtype == expected.dtype and torch.isfinite(merged).all()  # WanPipeline's latents: float32
    assert pipe.transformer.dtype == dtype
    measured = HALF_PRECISION_EFFECT[dtype]
    assert measured / 4 < relative_difference(merged, expected) < measured * 4


def test_two_experts_each_merge_their_own_steps():
    """Wan 2.2: ``transformer`` denoises the high-noise steps, ``transformer_2`` the rest; both patched."""
    pipe = tiny_wan_pipeline(SPEC, experts=2)
    expected = generate(pipe, steps=6)
    apply_SDTM(pipe, ratio=0.0, deviation=0.0)
    assert torch.equal(generate(pipe, steps=6), expected)
    apply_SDTM(pipe, **MERGING)
    merged = generate(pipe, steps=6)
    assert not torch.equal(merged, expected)
    high = sorted({r.step for r in sdtm_state(pipe.transformer).records})
    low = sorted({r.step for r in sdtm_state(pipe.transformer_2).records})
    assert high and low and max(high) < min(low) and sorted(high + low) == list(range(6))
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert any(r.mode == "merged" and r.mlp_tokens < TOKENS for r in sdtm_state(transformer).records)
    remove_SDTM(pipe)
    assert sdtm_state(pipe.transformer) is None and sdtm_state(pipe.transformer_2) is None
    assert torch.equal(generate(pipe, steps=6), expected)


def test_compiled_wan_has_no_recompiles_over_generations(fresh_dynamo):
    from torch._dynamo.utils import counters

    pipe = tiny_wan_pipeline(SPEC)
    apply_SDTM(pipe, **MERGING)
    expected = {steps: generate(pipe, steps=steps) for steps in (5, 7)}
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    graphs = []
    for steps, reference in expected.items():
        assert relative_difference(generate(pipe, steps=steps), reference) <= 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    with torch.compiler.set_stance("fail_on_recompile"):
        assert relative_difference(generate(pipe, steps=7), expected[7]) <= 1e-5
    assert graphs[0] == graphs[1] == WAN_GRAPHS and sum(counters["graph_break"].values()) == 0


WAN_GRAPHS = 3  # the transformer around the blocks, a merging block, a protected block (measured)


def test_refuses_per_token_timesteps(wan):
    apply_SDTM(wan, **MERGING)
    latents = torch.randn(1, SPEC.latent_channels, 3, 16, 12)
    embeds = tiny_wan_prompt_embeds(SPEC)["prompt_embeds"]
    wan.scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="per-token timesteps"):
        wan.transformer(latents, torch.full((1, TOKENS), 999), embeds)


# ----------------------------------------------------------------------------- the block oracle
def _oracle_block(block, call, mcw):
    """A merged ``WanTransformerBlock`` call recomputed from diffusers' sub-modules and the recorded plan:
    group means, the destination's rotary rows, unmerge with blending."""
    hidden, text, temb, rotary = (call.inputs[k] for k in ("hidden_states", "encoder_hidden_states", "temb",
                                                           "rotary_emb"))
    plan = call.plan
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    out = []
    for b in range(hidden.shape[0]):
        slot, blend = plan.slot[b], plan.blend[b]
        rows = int(slot.max()) + 1
        members = torch.nn.functional.one_hot(slot, rows).float()  # [N, M]

        def merge(x):
            return (members.T @ x) / members.sum(0)[:, None]

        def unmerge(y, name):
            u = y[slot]
            cache = call.caches.get(name)
            return u if cache is None else torch.where(blend[:, None], mcw * u + (1 - mcw) * cache[b], u)

        h = hidden[b:b + 1]
        destination = torch.full((rows,), slot.shape[0]).scatter_reduce(0, slot, torch.arange(slot.shape[0]), "amin")
        norm = block.norm1(h.float()) * (1 + scale[b:b + 1]) + shift[b:b + 1]
        cos, sin = rotary
        if call.merge_attn:
            merged_rotary_rows = (cos[:, destination], sin[:, destination])
            attn = block.attn1(merge(norm[0])[None], None, None, merged_rotary_rows)[0]
            h = h + unmerge(attn * gate[b, 0], "attn")[None]
            norm = block.norm2(h.float())
            cross = block.attn2(merge(norm[0])[None], text[b:b + 1], None, None)[0]
            h = h + unmerge(cross, "cross")[None]
        else:
            h = h + block.attn1(norm, None, None, rotary) * gate[b:b + 1]
            h = h + block.attn2(block.norm2(h.float()), text[b:b + 1], None, None)
        norm = block.norm3(h.float()) * (1 + c_scale[b:b + 1]) + c_shift[b:b + 1]
        ff = block.ffn(merge(norm[0])[None])[0] if call.merge_mlp else None
        h = h + (unmerge(ff * c_gate[b, 0], "mlp")[None] if ff is not None else block.ffn(norm) * c_gate[b:b + 1])
        out.append(h)
    return torch.cat(out)


def test_merged_blocks_equal_the_oracle(wan):
    mcw = 0.25
    apply_SDTM(wan, backend="torch", use_rand=False, protect_steps_frequency=0, mcw=mcw, **MERGING)
    monkeypatch = pytest.MonkeyPatch()
    try:
        calls = record_merged_calls(wan, monkeypatch, lambda: generate(wan, steps=4, guidance=1.0))
    finally:
        monkeypatch.undo()
    phases = {(c.merge_attn, c.merge_mlp) for c in calls}
    assert phases == {(True, True), (False, True)}  # structure and detail steps both checked
    with torch.no_grad():
        for call in calls:
            expected = _oracle_block(call.block, call, mcw)
            assert relative_difference(call.outputs, expected) <= 1e-5


def test_merged_rotary_takes_each_groups_destination_rows():
    from sdtm.core.plans import Grid, ssm_plan

    grid = Grid(4, 4, 2, 2, frames=2)
    scores = torch.arange(grid.num_windows, dtype=torch.float32)[None]
    plan = ssm_plan(scores, grid, 48, torch.zeros(1, grid.num_windows, dtype=torch.int64), False)
    cos = torch.arange(grid.num_tokens, dtype=torch.float64).view(1, -1, 1, 1).expand(1, -1, 1, 6)
    merged_cos, merged_sin = merged_rotary((cos, -cos), plan)
    assert merged_cos.shape == (1, plan.num_merged, 1, 6)
    anchors = merged_cos[0, :, 0, 0].long()
    for row, token in enumerate(anchors.tolist()):
        members = (plan.slot[0] == row).nonzero().flatten()
        assert token == members.min()  # the first token of a window is its destination without randomness
    assert torch.equal(merged_sin, -merged_cos)
    with pytest.raises(ValueError, match="rotary tables"):
        merged_rotary((cos[:, :5], cos[:, :5]), plan)
