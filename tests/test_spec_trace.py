"""With randomness off and a_d = 0, every plan of a whole generation equals the SPEC transcription."""

import pytest
import torch

import spec_oracle
from support import generate
from sdtm import apply_SDTM, sdtm_state
from sdtm.core import engine as block_module
from sdtm.core.schedule import Phase


@pytest.mark.parametrize("height, width", [(32, 32), (40, 56)], ids=["16x16", "20x28"])
def test_every_plan_follows_the_spec(sd3_pipe, monkeypatch, height, width):
    seen = []
    original = block_module.compute_plan

    def checked(link, metric, ops):
        age_before = link.stream.merge_age.clone() if link.age_exists else None
        plan = original(link, metric, ops)
        seen.append((link.state.step, link.action, metric.detach().clone(), age_before, plan,
                     link.stream.merge_age.clone()))
        return plan

    monkeypatch.setattr(block_module, "compute_plan", checked)
    apply_SDTM(sd3_pipe, use_rand=False, a_d=0.0, a_s=0.05, switch_step=3, protect_steps_frequency=4,
               ratio=0.5, deviation=0.2, backend="torch")
    generate(sd3_pipe, num_inference_steps=8, height=height, width=width)
    grid = sdtm_state(sd3_pipe).grid
    phases = {action.phase for _, action, *_ in seen}
    assert phases == {Phase.STRUCTURE, Phase.DETAIL}
    assert sorted({step for step, *_ in seen}) == [1, 2, 3, 5, 6, 7]  # 0 and 4 protected
    merged_something = False
    for step, action, metric, age_before, plan, age_after in seen:
        for b in range(metric.shape[0]):
            age_row = None if age_before is None else age_before[b]
            args = (metric[b], age_row, grid.height, grid.width, 2, 2, action.reduce_num)
            if action.phase is Phase.STRUCTURE:
                expected = spec_oracle.ssm(*args, a_s=0.05)
            else:
                expected = spec_oracle.idm(*args, a_d=0.0)
            assert spec_oracle.canonical(plan, b) == expected, f"step {step} sample {b}"
            merged_something |= any(srcs for _, srcs in expected[1])
            assert age_after[b].tolist() == spec_oracle.next_age(
                age_row, expected[0], expected[1], grid.num_tokens, False
            )
    assert merged_something


def test_merged_outputs_blend_with_cache_as_specified(sd3_pipe, monkeypatch):
    """Unmerge output of one merged MLP, recomputed by hand from y, the plan and the previous cache."""
    captured = {}
    original_finish = block_module.finish_sublayer

    def spy(link, name, residual, y, gate, plan, ops, residual_is_ours, spare=None):
        cache = link.cache_in.get(name)
        if plan is not None and name == "mlp" and "done" not in captured and cache is not None:
            captured.update(y=y.clone(), gate=gate.clone(), residual=residual.clone(), cache=cache.clone(),
                            plan=plan, mcw=link.state.config.mcw)
            out = original_finish(link, name, residual, y, gate, plan, ops, residual_is_ours, spare)
            captured.update(out=out.clone(), stored=link.cache_out[name].clone(), done=True)
            return out
        return original_finish(link, name, residual, y, gate, plan, ops, residual_is_ours, spare)

    monkeypatch.setattr(block_module, "finish_sublayer", spy)
    apply_SDTM(sd3_pipe, use_rand=False, mcw=0.3, backend="torch")
    generate(sd3_pipe, num_inference_steps=5)
    assert captured.get("done"), "no merged MLP call with a cache happened"
    plan, y, cache = captured["plan"], captured["y"], captured["cache"]
    gated = captured["gate"].unsqueeze(1) * y
    for b in range(y.shape[0]):
        for n in range(plan.slot.shape[1]):
            row = gated[b, plan.slot[b, n]]
            if plan.blend[b, n]:
                row = 0.3 * row + 0.7 * cache[b, n]
            assert torch.allclose(captured["stored"][b, n], row, atol=1e-6)
            assert torch.allclose(captured["out"][b, n], captured["residual"][b, n] + row, atol=1e-6)
