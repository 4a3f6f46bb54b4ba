"""Copies of patched pipelines behave like the original; a window that fits no grid is reported, not
silently counted as merging."""

import copy
import gc
import warnings

import pytest
import torch

from support import SD3_SPEC, generate
from sdtm import apply_SDTM, sdtm_state
from sdtm.models.sd3 import tiny_pipeline


@pytest.fixture()
def fresh_pipe():
    return tiny_pipeline(SD3_SPEC)


def test_deep_copy_after_a_generation_generates_like_the_original(fresh_pipe):
    apply_SDTM(fresh_pipe)
    expected = generate(fresh_pipe, batch=2, num_inference_steps=6)
    clone = copy.deepcopy(fresh_pipe)
    assert torch.equal(generate(clone, batch=2, num_inference_steps=6), expected)
    assert torch.equal(generate(fresh_pipe, batch=2, num_inference_steps=6), expected)
    # The copy keeps its own state: its steps were tracked by its own hook.
    assert sdtm_state(clone) is not sdtm_state(fresh_pipe)
    assert sorted({r.step for r in sdtm_state(clone).records}) == list(range(6))


def test_deep_copy_before_any_generation_and_after_the_original_is_gone(fresh_pipe):
    apply_SDTM(fresh_pipe)
    clone = copy.deepcopy(fresh_pipe)
    expected = generate(fresh_pipe, batch=2, num_inference_steps=6)
    del fresh_pipe
    gc.collect()
    assert torch.equal(generate(clone, batch=2, num_inference_steps=6), expected)


def test_deep_copy_of_the_transformer_alone_refuses_at_once(fresh_pipe):
    apply_SDTM(fresh_pipe)
    generate(fresh_pipe, num_inference_steps=3)
    fresh_pipe.transformer = copy.deepcopy(fresh_pipe.transformer)
    with pytest.raises(RuntimeError, match="deep-copied without the pipeline"):
        generate(fresh_pipe, num_inference_steps=3)
    apply_SDTM(fresh_pipe)  # applying again to the copy makes it usable
    assert torch.isfinite(generate(fresh_pipe, num_inference_steps=3)).all()


@pytest.mark.parametrize("window", [{"sx": 17}, {"sy": 17}, {"sx": 10**9}])
def test_window_larger_than_the_grid_warns_and_records_no_merge(sd3_pipe, window):
    expected = generate(sd3_pipe, num_inference_steps=4)  # 16x16 token grid
    apply_SDTM(sd3_pipe, **window)
    with pytest.warns(UserWarning, match=r"fits the 16x16 token grid") as caught:
        out = generate(sd3_pipe, num_inference_steps=4)
    assert len([w for w in caught if "token grid" in str(w.message)]) == 1  # once, not per call
    assert torch.equal(out, expected)
    records = sdtm_state(sd3_pipe).records
    assert records and all(r.mode == "unchanged" and r.attn_tokens == r.mlp_tokens == 256 for r in records)


def test_window_that_fits_does_not_warn(sd3_pipe):
    apply_SDTM(sd3_pipe, sx=16, sy=16, switch_step=0)  # one window: only the detail phase can merge (multiples of 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(sd3_pipe, num_inference_steps=4)
    assert any(r.mode == "merged" for r in sdtm_state(sd3_pipe).records)
