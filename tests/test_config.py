import pytest
import torch

from sdtm import SDTMConfig, apply_SDTM, apply_sdtm


def test_defaults_match_reference_sample_script():
    c = SDTMConfig()
    assert (c.ratio, c.deviation, c.switch_step, c.use_rand, c.sx, c.sy) == (0.3, 0.2, 20, True, 2, 2)
    assert (c.a_s, c.a_d, c.a_p, c.pseudo_merge, c.mcw) == (0.05, 0.05, 2, False, 0.1)
    assert (c.protect_steps_frequency, c.protect_layers_frequency) == (3, -1)
    assert (c.merge_attn, c.merge_mlp, c.cache_each_step, c.backend) == (True, True, True, "auto")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ratio": 1.5}, "ratio must lie in"),
        ({"ratio": -0.1}, "ratio must lie in"),
        ({"mcw": 1.1}, "mcw must lie in"),
        ({"mcw": -0.5}, "mcw must lie in"),
        ({"deviation": -0.1}, "deviation must lie in"),
        ({"ratio": 0.1, "deviation": 0.2}, "ratio - deviation"),
        ({"ratio": 0.9, "deviation": 0.2}, "ratio - deviation"),
        ({"sx": 1, "sy": 1}, "at least 2 tokens"),
        ({"sx": 0}, "sx must be >= 1"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"a_s": float("inf")}, "a_s must be a finite number"),
        ({"a_s": float("-inf")}, "a_s must be a finite number"),
        ({"a_d": float("inf")}, "a_d must be a finite number"),
        ({"a_d": float("nan")}, "a_d must be a finite number"),
        ({"a_p": float("-inf")}, "a_p must be a finite number"),
        ({"ratio": float("nan")}, "ratio must be a finite number"),
        ({"deviation": float("inf")}, "deviation must be a finite number"),
    ],
)
def test_bad_values_raise_value_error_naming_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        SDTMConfig(**changes)


@pytest.mark.parametrize("changes", [{"ratio": "0.3"}, {"sx": 2.0}, {"use_rand": 1}, {"switch_step": 2.5}])
def test_bad_types_raise_type_error(changes):
    with pytest.raises(TypeError):
        SDTMConfig(**changes)


def test_apply_checks_arguments_before_touching_the_model(sd3_pipe):
    with pytest.raises(ValueError, match="mcw"):
        apply_SDTM(sd3_pipe, mcw=2.0)
    assert not hasattr(sd3_pipe.transformer, "_sdtm_state")


def test_pipeline_without_transformer_says_so(sd3_pipe):
    transformer, sd3_pipe.transformer = sd3_pipe.transformer, None
    try:
        with pytest.raises(ValueError, match=r"has no transformer \(its .transformer is None\)"):
            apply_SDTM(sd3_pipe)
    finally:
        sd3_pipe.transformer = transformer


def test_module_without_sd3_blocks_is_rejected():
    with pytest.raises(ValueError, match="SDTM supports diffusers' SD3Transformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel"):
        apply_SDTM(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        apply_SDTM(object())
    with pytest.raises(TypeError, match="SDTMConfig"):
        apply_sdtm(torch.nn.Linear(2, 2), {"ratio": 0.3})


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton is available on this GPU machine")
def test_unavailable_backend_says_why(sd3_pipe, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' is not available: no CUDA device"):
        apply_SDTM(sd3_pipe, backend="triton")
    assert not hasattr(sd3_pipe.transformer, "_sdtm_state")


def test_cpp_backend_refuses_other_devices():
    from sdtm.core.ops import cpp_unavailable_reason, ops_for

    if cpp_unavailable_reason() is not None:
        pytest.skip(cpp_unavailable_reason())
    with pytest.raises(ValueError, match="run on CPU tensors, got meta"):
        ops_for("cpp", torch.device("meta"))


def test_switch_step_none_takes_the_model_familys_default():
    from sdtm.models import FluxAdapter, PixArtAdapter, SD3Adapter

    config = SDTMConfig(switch_step=None)
    assert SD3Adapter().resolve_config(config, 28).switch_step == 20  # the reference's, whatever the steps
    assert FluxAdapter().resolve_config(config, 28).switch_step == 10  # steps 0-10: 11 of 28 structure
    assert PixArtAdapter().resolve_config(config, 20).switch_step == 7
    assert FluxAdapter().resolve_config(config, 4).switch_step == 1
    assert FluxAdapter().resolve_config(SDTMConfig(switch_step=5), 28).switch_step == 5
