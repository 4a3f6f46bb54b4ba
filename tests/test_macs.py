"""sdtm.cli.macs: checking transformer configs, the latent factor of a diffusers folder, counting limits,
PixArt's and Flux's MACs against hand counts, the family's default switch step, and the Flux presets."""

import json

import pytest

from sdtm.core.config import SDTMConfig
from sdtm.cli.macs import PRESETS, VAE_SCALE, default_text_tokens, load_config, load_vae_scale, schedule_macs

TINY = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=8, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16)


def write_json(path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def sd3_folder(root, vae_levels: int, transformer: dict | None = None):
    """A diffusers SD3 folder of config files only: a VAE with ``vae_levels`` resolution levels."""
    write_json(root / "model_index.json", {"_class_name": "StableDiffusion3Pipeline"})
    write_json(root / "transformer" / "config.json",
               {"_class_name": "SD3Transformer2DModel", **(TINY if transformer is None else transformer)})
    write_json(root / "vae" / "config.json",
               {"_class_name": "AutoencoderKL", "block_out_channels": [8 * 2 ** i for i in range(vae_levels)]})
    return root


def test_load_config_rejects_a_top_level_array(tmp_path):
    path = write_json(tmp_path / "config.json", [1, 2])
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got a list"):
        load_config(path)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("num_layers", "two", "num_layers must be a positive int, got 'two'"),
        ("num_layers", True, "num_layers must be a positive int, got True"),
        ("patch_size", 0, "patch_size must be a positive int, got 0"),
        ("attention_head_dim", 8.0, "attention_head_dim must be a positive int"),
        ("out_channels", "4", "out_channels must be a positive int or null"),
        ("dual_attention_layers", [0, "1"], "dual_attention_layers must be a list of layer indices"),
        ("dual_attention_layers", 3, "dual_attention_layers must be a list of layer indices"),
        ("qk_norm", 1, "qk_norm must be null or a string"),
    ],
)
def test_load_config_names_the_file_and_the_bad_key(tmp_path, key, value, expected):
    path = write_json(tmp_path / "config.json", {"_class_name": "SD3Transformer2DModel", **TINY, key: value})
    with pytest.raises(ValueError) as error:
        load_config(path)
    assert str(error.value).startswith(path) and expected in str(error.value)


def test_load_config_turns_model_construction_errors_into_value_errors(tmp_path):
    path = write_json(tmp_path / "config.json", {"_class_name": "SD3Transformer2DModel", **TINY, "qk_norm": "bogus"})
    with pytest.raises(ValueError, match="config.json: SD3Transformer2DModel cannot be built .*qk_norm"):
        load_config(path)


def test_load_config_checks_the_block_width(tmp_path):
    path = write_json(tmp_path / "config.json",
                      {"_class_name": "SD3Transformer2DModel", **TINY, "caption_projection_dim": 12})
    with pytest.raises(ValueError, match=r"caption_projection_dim \(12\) must equal .*\(2 x 8 = 16\)"):
        load_config(path)


def test_load_config_accepts_nulls_diffusers_accepts(tmp_path):
    path = write_json(tmp_path / "config.json", {"_class_name": "SD3Transformer2DModel", **TINY,
                                                 "out_channels": None, "pos_embed_max_size": None,
                                                 "dual_attention_layers": [0], "qk_norm": "rms_norm"})
    config = load_config(path)
    assert config["dual_attention_layers"] == (0,) and config["pos_embed_max_size"] is None
    # Without a positional table size any grid is allowed.
    report = schedule_macs(config, 8 * 2 * 20, 8 * 2 * 20, steps=2, text_tokens=3)
    assert report.grid == (20, 20) and report.baseline_macs > 0


def test_vae_scale_of_a_diffusers_folder(tmp_path):
    assert load_vae_scale(str(sd3_folder(tmp_path / "three_levels", 3))) == 4
    assert load_vae_scale(str(sd3_folder(tmp_path / "four_levels", 4))) == 8
    bare = write_json(tmp_path / "bare" / "config.json", {"_class_name": "SD3Transformer2DModel", **TINY})
    assert load_vae_scale(bare) == VAE_SCALE  # a transformer config alone: SD3's factor
    assert load_vae_scale(str(tmp_path / "bare")) == VAE_SCALE  # a transformer folder
    assert all(load_vae_scale(name) == VAE_SCALE for name in PRESETS)


def test_vae_scale_errors_name_the_folder_or_file(tmp_path):
    folder = sd3_folder(tmp_path / "no_vae", 3)
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(ValueError, match="has no vae/config.json"):
        load_vae_scale(str(folder))
    folder = sd3_folder(tmp_path / "bad_vae", 3)
    write_json(folder / "vae" / "config.json", {"block_out_channels": 128})
    with pytest.raises(ValueError, match=r"vae/config.json: block_out_channels must be a non-empty list"):
        load_vae_scale(str(folder))


def test_schedule_macs_uses_the_vae_factor():
    report = schedule_macs(dict(TINY), 64, 96, steps=1, text_tokens=3, vae_scale=4)
    assert report.grid == (8, 12) and report.vae_scale == 4 and report.to_json()["vae_scale"] == 4
    with pytest.raises(ValueError, match=r"multiples of 8 \(VAE factor 4 x patch 2\)"):
        schedule_macs(dict(TINY), 60, 96, steps=1, vae_scale=4)


def test_counts_too_large_for_tensor_sizes_are_value_errors():
    with pytest.raises(ValueError, match="cannot count the MACs of 4 image and 100000000000 text tokens"):
        schedule_macs(dict(TINY), 32, 32, steps=1, text_tokens=10 ** 11)


# PixArt: one block of width 3 x 8 = 24 (the size embedding of alpha's extra conditions needs a multiple of 3),
# 12-wide captions projected to 24, no resolution / aspect-ratio conditioning.
PIXART_TINY = dict(_class_name="PixArtTransformer2DModel", num_layers=1, num_attention_heads=3, attention_head_dim=8,
                   in_channels=4, out_channels=8, patch_size=2, sample_size=8, cross_attention_dim=24,
                   caption_channels=12, use_additional_conditions=False)


def pixart_block_macs(b, n, s, c):
    """(attention side, feed-forward) MACs of one PixArt block on n image and s text tokens, by hand.

    Self-attention: q, k, v and output projections on n tokens, QK^T and AV (n x n x c each).
    Cross-attention: q and output projections on n tokens, k and v on the s projected text tokens, QK^T and
    AV (n x s x c each). Feed-forward (gelu-approximate, 4x): c -> 4c -> c. The block's adaLN-single
    modulation is a table plus the timestep embedding, elementwise: no multiply-accumulates of its own.
    """
    self_attn = 4 * n * c * c + 2 * n * n * c
    cross_attn = 2 * n * c * c + 2 * s * c * c + 2 * n * s * c
    return b * (self_attn + cross_attn), b * 8 * n * c * c


def pixart_outside_macs(b, n, s, c, cfg):
    """Patch embedding (a conv), timestep MLP (256 -> c -> c), adaLN-single's c -> 6c, caption projection
    (caption_channels -> c -> c) and the output projection; the final modulation is elementwise."""
    p = cfg["patch_size"]
    patch_embed = b * n * cfg["in_channels"] * p * p * c
    time_embed = b * (256 * c + c * c) + b * c * 6 * c
    caption = b * s * (cfg["caption_channels"] * c + c * c)
    proj_out = b * n * c * p * p * cfg["out_channels"]
    return patch_embed + time_embed + caption + proj_out


def test_pixart_macs_match_hand_computation():
    # 128 x 128 pixels -> 16 x 16 latent -> 8 x 8 = 64 tokens in 16 windows of 2 x 2; 5 text tokens.
    b, n, s, c = 2, 64, 5, 24
    outside = pixart_outside_macs(b, n, s, c, PIXART_TINY)

    def block(attn_tokens, mlp_tokens):
        return pixart_block_macs(b, attn_tokens, s, c)[0] + pixart_block_macs(b, mlp_tokens, s, c)[1]

    plain = schedule_macs(dict(PIXART_TINY), 128, 128, steps=3, batch=b, text_tokens=s)
    assert plain.model == "PixArtTransformer2DModel" and plain.grid == (8, 8)
    assert plain.baseline_macs == 3 * (outside + block(n, n))
    # One step removing int(64 * 0.8) = 51 tokens, no protection.
    merge = dict(ratio=0.8, deviation=0.0, protect_steps_frequency=0)
    # Structure phase: (51 // 3) // 16 * 16 = 16 windows of 4 tokens -> 16 tokens for attention and MLP.
    ssm = schedule_macs(dict(PIXART_TINY), 128, 128, steps=1, batch=b, text_tokens=s,
                        sdtm=SDTMConfig(switch_step=0, **merge))
    assert ssm.sdtm_macs == outside + block(16, 16) and ssm.plan_macs == 0
    assert ssm.per_step[0].attn_tokens == 16 and ssm.per_step[0].phase == "ssm"
    # Detail phase: min(51, 48 sources) // 16 * 16 = 48 sources merged -> 16 tokens for the MLP only;
    # the plan compares 48 sources with 16 destinations.
    idm = schedule_macs(dict(PIXART_TINY), 128, 128, steps=1, batch=b, text_tokens=s,
                        sdtm=SDTMConfig(switch_step=-1, **merge))
    plan = b * c * 48 * 16
    assert idm.plan_macs == plan and idm.sdtm_macs == outside + block(n, 16) + plan
    assert (idm.per_step[0].attn_tokens, idm.per_step[0].mlp_tokens) == (64, 16)


def test_default_text_tokens_per_model():
    assert schedule_macs(dict(TINY), 64, 64, steps=1).text_tokens == 333
    assert schedule_macs(dict(PIXART_TINY), 64, 64, steps=1).text_tokens == 300
    alpha_like = dict(PIXART_TINY, use_additional_conditions=True)
    assert schedule_macs(alpha_like, 64, 64, steps=1).text_tokens == 120
    assert schedule_macs(alpha_like, 64, 64, steps=1, text_tokens=7).text_tokens == 7
    assert PRESETS["pixart-sigma"]["use_additional_conditions"] is False
    assert PRESETS["pixart-alpha"]["use_additional_conditions"] is True


def test_pixart_sigma_preset_cli(capsys):
    """PixArt-Sigma at 1024 x 1024, 50 steps, batch 2, SDTM defaults: the unmerged step matches the hand
    count of 28 blocks of width 1152 on 4096 image and 300 text tokens, and SDTM saves MACs."""
    from sdtm.cli.main import main

    assert main(["macs", "--config", "pixart-sigma", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    b, n, s, c = 2, 4096, 300, 1152
    step = 28 * sum(pixart_block_macs(b, n, s, c)) + pixart_outside_macs(b, n, s, c, PRESETS["pixart-sigma"])
    assert result["baseline_macs"] == 50 * step and result["text_tokens"] == 300
    assert result["model"] == "PixArtTransformer2DModel" and result["grid"] == [64, 64]
    assert result["mac_ratio"] > 1 and result["plan_macs"] > 0


def test_pixart_config_files_and_folders(tmp_path):
    # Older PixArt folders name diffusers' Transformer2DModel with norm_type ada_norm_single.
    older = {**PIXART_TINY, "_class_name": "Transformer2DModel", "norm_type": "ada_norm_single",
             "double_self_attention": False, "only_cross_attention": False, "use_linear_projection": False}
    folder = tmp_path / "pixart"
    write_json(folder / "model_index.json", {"_class_name": "PixArtAlphaPipeline"})
    write_json(folder / "transformer" / "config.json", older)
    write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16, 32, 64]})
    config = load_config(str(folder))
    assert config["_class_name"] == "PixArtTransformer2DModel" and "double_self_attention" not in config
    assert load_vae_scale(str(folder)) == 8
    assert schedule_macs(config, 128, 128, steps=1, text_tokens=5).baseline_macs == schedule_macs(
        dict(PIXART_TINY), 128, 128, steps=1, text_tokens=5).baseline_macs
    # Without a positional table size, any grid: 2048 pixels a side is 128 x 128 tokens.
    assert schedule_macs(config, 2048, 2048, steps=1, text_tokens=5).grid == (128, 128)


def _registered_classes() -> str:
    """The transformer classes of the registered families, in registration order, as macs lists them."""
    from sdtm.models import families

    names = [a.config_classes[0] for a in families() if a.config_classes]
    return ", ".join(names[:-1]) + " or " + names[-1]


_REGISTERED_CLASSES = _registered_classes()


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"norm_type": "ada_norm_zero"}, "norm_type must be \"ada_norm_single\""),
        ({"cross_attention_dim": 16}, r"cross_attention_dim \(16\) must equal .*\(3 x 8 = 24\)"),
        ({"num_attention_heads": 2, "cross_attention_dim": 16, "use_additional_conditions": True},
         r"the width \(2 x 8 = 16\) must be a multiple of 3"),
        ({"caption_channels": "12"}, "caption_channels must be a positive int or null"),
        ({"use_additional_conditions": "yes"}, "use_additional_conditions must be true, false or null"),
        ({"interpolation_scale": 0}, "interpolation_scale must be a positive number or null"),
        ({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"},
         "is a 'Transformer2DModel' config, not an " + _REGISTERED_CLASSES + " one"),
        ({"activation_fn": "bogus"}, "activation_fn must be one of gelu, gelu-approximate"),
        ({"dropout": 2.0}, "PixArtTransformer2DModel cannot be built from this config: dropout probability"),
    ],
)
def test_pixart_config_errors_name_the_file_and_the_key(tmp_path, changes, expected):
    path = write_json(tmp_path / "config.json", {**PIXART_TINY, **changes})
    with pytest.raises(ValueError, match=expected) as error:
        load_config(path)
    assert str(error.value).startswith(path)


def test_load_config_turns_failures_of_the_trial_run_into_value_errors(tmp_path, monkeypatch):
    from sdtm.cli import macs

    def fail(self, latent_h, latent_w):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x12 and 16x24)\nmore")

    monkeypatch.setattr(macs._MetaModel, "forward", fail)
    path = write_json(tmp_path / "config.json", PIXART_TINY)
    with pytest.raises(ValueError, match=r"config.json: PixArtTransformer2DModel cannot run this config: mat1 and "
                                         r"mat2 shapes cannot be multiplied \(2x12 and 16x24\)$"):
        load_config(path)


# Flux: one double-stream and two single-stream blocks of width 2 x 16 = 32; 16 channels a packed token
# (4 latent channels x 2 x 2), 32-wide T5-like and 16-wide pooled text, a guidance embedding (dev-like).
FLUX_TINY = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=16, out_channels=None, num_layers=1,
                 num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def flux_double_macs(b, n, t, c):
    """(attention side, feed-forward) MACs of one FluxTransformerBlock on n image and t text tokens, by hand.

    norm1 and norm1_context: c -> 6c each on the timestep embedding. Joint attention: q, k, v and output
    projections on the n image tokens and on the t text tokens (to_add_out), QK^T and AV over the n + t
    joint sequence ((n + t)^2 x c each). Image feed-forward (gelu-approximate, 4x): c -> 4c -> c on n
    tokens, the feed-forward side; the text feed-forward ff_context (the same on t tokens) is the
    attention side's, as everything that is not ``ff``.
    """
    norms = 12 * c * c
    attn = 4 * n * c * c + 4 * t * c * c + 2 * (n + t) ** 2 * c
    ff_context = 8 * t * c * c
    return b * (norms + attn + ff_context), b * 8 * n * c * c


def flux_single_macs(b, s, c):
    """MACs of one FluxSingleTransformerBlock on a sequence of s = text + image tokens, by hand: the norm's
    c -> 3c on the timestep embedding; q, k, v (3 c x c), the MLP branch c -> 4c, QK^T and AV (s x s x c
    each), and the shared output projection (c + 4c) -> c."""
    return b * (3 * c * c + s * c * (3 * c + 4 * c + 5 * c) + 2 * s * s * c)


def flux_outside_macs(b, n, t, c, cfg):
    """x_embedder (in_channels -> c per image token), the timestep and guidance embeddings (256 -> c -> c
    each; no guidance embedding without guidance_embeds), the pooled text embedding (pooled -> c -> c), the
    context embedder (joint_attention_dim -> c per text token), norm_out's c -> 2c and the output
    projection (c -> patch^2 x out_channels, out_channels null: in_channels)."""
    p, cin = cfg["patch_size"], cfg["in_channels"]
    cout = cfg["out_channels"] or cin
    embed = b * n * cin * c
    time_embed = b * (256 * c + c * c) * (2 if cfg["guidance_embeds"] else 1)
    pooled = b * (cfg["pooled_projection_dim"] * c + c * c)
    context = b * t * cfg["joint_attention_dim"] * c
    norm_out = b * c * 2 * c
    proj_out = b * n * c * p * p * cout
    return embed + time_embed + pooled + context + norm_out + proj_out


def flux_step_macs(b, n, t, c, cfg, double_tokens, single_tokens):
    """One transformer call on n image tokens: ``double_tokens`` (attention, feed-forward) image tokens of
    each double-stream block and ``single_tokens`` image tokens of each single-stream block."""
    doubles = sum(flux_double_macs(b, a, t, c)[0] + flux_double_macs(b, m, t, c)[1] for a, m in double_tokens)
    singles = sum(flux_single_macs(b, t + m, c) for m in single_tokens)
    return flux_outside_macs(b, n, t, c, cfg) + doubles + singles


def test_flux_macs_match_hand_computation():
    # 128 x 128 pixels -> 16 x 16 latent -> 8 x 8 = 64 packed tokens in 16 windows of 2 x 2; 5 text tokens.
    b, n, t, c = 2, 64, 5, 32
    plain = schedule_macs(dict(FLUX_TINY), 128, 128, steps=3, batch=b, text_tokens=t)
    assert plain.model == "FluxTransformer2DModel" and plain.grid == (8, 8)
    full = flux_step_macs(b, n, t, c, FLUX_TINY, [(n, n)], [n, n])
    assert plain.baseline_macs == 3 * full
    # One step removing int(64 * 0.8) = 51 tokens, no protection.
    merge = dict(ratio=0.8, deviation=0.0, protect_steps_frequency=0)
    # Structure phase: (51 // 3) // 16 * 16 = 16 windows of 4 tokens -> 16 tokens; the double-stream block's
    # attention and MLP and both single-stream blocks (on 5 text + 16 image tokens) run on them.
    ssm = schedule_macs(dict(FLUX_TINY), 128, 128, steps=1, batch=b, text_tokens=t,
                        sdtm=SDTMConfig(switch_step=0, **merge))
    assert ssm.sdtm_macs == flux_step_macs(b, n, t, c, FLUX_TINY, [(16, 16)], [16, 16]) and ssm.plan_macs == 0
    assert (ssm.per_step[0].attn_tokens, ssm.per_step[0].mlp_tokens, ssm.per_step[0].phase) == (16, 16, "ssm")
    assert ssm.phases["ssm"]["block_calls"] == 3
    # Detail phase: the double-stream block merges 48 sources -> 16 tokens for its MLP, and its plan compares
    # 48 sources with 16 destinations; the single-stream blocks run unmerged and compute no plan.
    idm = schedule_macs(dict(FLUX_TINY), 128, 128, steps=1, batch=b, text_tokens=t,
                        sdtm=SDTMConfig(switch_step=-1, **merge))
    plan = b * c * 48 * 16
    assert idm.plan_macs == plan
    assert idm.sdtm_macs == flux_step_macs(b, n, t, c, FLUX_TINY, [(n, 16)], [n, n]) + plan
    assert (idm.per_step[0].attn_tokens, idm.per_step[0].mlp_tokens) == (64, (16 + 64 + 64) / 3)
    assert idm.phases["idm"]["block_calls"] == 1 and idm.phases["unchanged"]["block_calls"] == 2
    assert idm.per_step[0].phase == "idm/unchanged"


def test_flux_layer_index_runs_over_both_block_kinds():
    """protect_layers_frequency 2 over layers 0 (double-stream), 1 and 2 (single-stream): layers 0 and 2
    (the last) never merge, the first single-stream block does."""
    b, n, t, c = 2, 64, 5, 32
    report = schedule_macs(dict(FLUX_TINY), 128, 128, steps=1, batch=b, text_tokens=t,
                           sdtm=SDTMConfig(switch_step=0, ratio=0.8, deviation=0.0, protect_steps_frequency=0,
                                           protect_layers_frequency=2))
    assert report.sdtm_macs == flux_step_macs(b, n, t, c, FLUX_TINY, [(n, n)], [16, n])


def test_flux_grids_non_square_and_sizes_that_do_not_pack():
    # 2x2 packing after the VAE's factor 8: a token is 16 x 16 pixels, whatever the config's patch_size 1.
    report = schedule_macs(dict(FLUX_TINY), 128, 192, steps=2, text_tokens=3)
    assert report.grid == (8, 12) and report.vae_scale == 8
    b, t, c = 2, 3, 32
    assert report.baseline_macs == 2 * flux_step_macs(b, 96, t, c, FLUX_TINY, [(96, 96)], [96, 96])
    assert schedule_macs(dict(FLUX_TINY), 1024, 768, steps=1, text_tokens=3).grid == (64, 48)
    # Without a positional table, any grid: 4096 pixels a side is 256 x 256 tokens.
    assert schedule_macs(dict(FLUX_TINY), 4096, 4096, steps=1, text_tokens=3).grid == (256, 256)
    with pytest.raises(ValueError, match=r"multiples of 16 \(VAE factor 8 x packing 2\), got 1000x1024"):
        schedule_macs(dict(FLUX_TINY), 1000, 1024, steps=1)
    with pytest.raises(ValueError, match=r"multiples of 16 \(VAE factor 8 x packing 2\), got 1024x1032"):
        schedule_macs(dict(FLUX_TINY), 1024, 1032, steps=1)
    with pytest.raises(ValueError, match=r"multiples of 8 \(VAE factor 4 x packing 2\)"):
        schedule_macs(dict(FLUX_TINY), 68, 64, steps=1, vae_scale=4)


def test_switch_step_none_is_the_familys_default():
    # No SDTMConfig, or one with switch_step None: 20 for SD3, the first 40% of the steps for PixArt and Flux.
    assert schedule_macs(dict(TINY), 64, 64, steps=28, text_tokens=3).switch_step == 20
    assert schedule_macs(dict(PIXART_TINY), 64, 64, steps=20, text_tokens=3).switch_step == 7
    assert schedule_macs(dict(FLUX_TINY), 64, 64, steps=28, text_tokens=3).switch_step == 10
    assert schedule_macs(dict(FLUX_TINY), 64, 64, steps=4, text_tokens=3,
                         sdtm=SDTMConfig(switch_step=None)).switch_step == 1
    # A given switch step is kept.
    assert schedule_macs(dict(FLUX_TINY), 64, 64, steps=28, text_tokens=3,
                         sdtm=SDTMConfig(switch_step=20)).switch_step == 20
    # The default is the one used: steps 0-3 of 10 are structure steps.
    report = schedule_macs(dict(FLUX_TINY), 256, 256, steps=10, text_tokens=3, sdtm=SDTMConfig(switch_step=None))
    assert [s.step for s in report.per_step if "ssm" in s.phase] == [1, 2]  # 0 and 3 protected
    assert all("ssm" not in s.phase for s in report.per_step[4:])
    assert report.to_json()["switch_step"] == 3


def test_flux_default_text_tokens():
    assert schedule_macs(dict(FLUX_TINY), 64, 64, steps=1).text_tokens == 512  # dev-like: guidance embedding
    schnell_like = dict(FLUX_TINY, guidance_embeds=False)
    assert schedule_macs(schnell_like, 64, 64, steps=1).text_tokens == 256
    assert default_text_tokens(PRESETS["flux-dev"]) == 512 and default_text_tokens(PRESETS["flux-schnell"]) == 256


def test_flux_schedule_matches_a_real_run():
    """The image tokens schedule_macs assumes per block and step are the ones a patched tiny FluxPipeline
    records (its VAE does not down-sample: 32 x 48 pixels are 16 x 24 tokens)."""
    import torch

    from sdtm import apply_SDTM, sdtm_state
    from sdtm.models.flux import TinyFluxSpec, tiny_flux_pipeline, tiny_flux_prompt_embeds

    spec = TinyFluxSpec()
    pipe = tiny_flux_pipeline(spec)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    layers = spec.num_layers + spec.num_single_layers
    for settings in (dict(ratio=0.5, switch_step=3), dict(switch_step=None, protect_layers_frequency=2, cache_each_step=False)):
        apply_SDTM(pipe, backend="torch", **settings)
        pipe(**tiny_flux_prompt_embeds(spec), height=32, width=48, num_inference_steps=8, guidance_scale=3.5,
             output_type="latent", generator=torch.Generator().manual_seed(0))
        records = sdtm_state(pipe).records
        report = schedule_macs(config, 32, 48, 8, batch=1, sdtm=SDTMConfig(backend="torch", **settings),
                               text_tokens=spec.text_tokens, vae_scale=1)
        assert report.grid == (16, 24)
        for step in report.per_step:
            calls = [r for r in records if r.step == step.step]
            assert len(calls) == layers
            assert step.attn_tokens == sum(r.attn_tokens for r in calls) / layers
            assert step.mlp_tokens == sum(r.mlp_tokens for r in calls) / layers
        assert report.sdtm_macs < report.baseline_macs


@pytest.mark.parametrize("preset, steps, text_tokens, guidance", [("flux-dev", None, 512, True),
                                                                   ("flux-schnell", 4, 256, False)])
def test_flux_presets_cli(capsys, preset, steps, text_tokens, guidance):
    """FLUX.1 at 1024 x 1024 (64 x 64 packed tokens), batch 2, SDTM defaults: the unmerged step matches the
    hand count of 19 double-stream and 38 single-stream blocks of width 3072, and SDTM saves MACs."""
    from sdtm.cli.main import main

    argv = ["macs", "--config", preset, "--json"] + (["--steps", str(steps)] if steps else [])
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = PRESETS[preset]
    assert cfg["guidance_embeds"] is guidance and cfg["num_layers"] == 19 and cfg["num_single_layers"] == 38
    b, n, t, c = 2, 4096, text_tokens, 3072
    step = flux_step_macs(b, n, t, c, cfg, [(n, n)] * 19, [n] * 38)
    assert result["baseline_macs"] == result["steps"] * step and result["text_tokens"] == text_tokens
    assert result["model"] == "FluxTransformer2DModel" and result["grid"] == [64, 64]
    assert result["mac_ratio"] > 1
    assert load_vae_scale(preset) == 8


def test_flux_presets_at_their_step_counts_and_non_square():
    dev = schedule_macs(load_config("flux-dev"), 1024, 1024, 28, batch=1)
    schnell = schedule_macs(load_config("flux-schnell"), 1024, 1024, 4, batch=1)
    assert (dev.switch_step, schnell.switch_step) == (10, 1)
    assert dev.mac_ratio > 1 and schnell.mac_ratio > 1 and dev.plan_macs > 0
    wide = schedule_macs(load_config("flux-dev"), 768, 1360, 28, batch=1)
    assert wide.grid == (48, 85) and wide.mac_ratio > 1


def test_flux_config_files_and_folders(tmp_path):
    folder = tmp_path / "flux"
    write_json(folder / "model_index.json", {"_class_name": "FluxPipeline"})
    write_json(folder / "transformer" / "config.json", {**FLUX_TINY, "axes_dims_rope": [4, 6, 6]})
    write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16, 32, 64]})
    config = load_config(str(folder))
    assert config["_class_name"] == "FluxTransformer2DModel" and config["axes_dims_rope"] == (4, 6, 6)
    assert load_vae_scale(str(folder)) == 8
    # Without a _class_name, Flux's keys name the family.
    bare = {k: v for k, v in FLUX_TINY.items() if k != "_class_name"}
    path = write_json(tmp_path / "bare" / "config.json", bare)
    assert load_config(path)["_class_name"] == "FluxTransformer2DModel"
    assert schedule_macs(config, 128, 128, steps=1, text_tokens=5).baseline_macs == schedule_macs(
        dict(FLUX_TINY), 128, 128, steps=1, text_tokens=5).baseline_macs


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"axes_dims_rope": [4, 6, 8]}, r"axes_dims_rope \(\[4, 6, 8\]\) must be three rotary widths, .* summing "
                                        r"to attention_head_dim \(16\)"),
        ({"axes_dims_rope": [4, 12]}, r"axes_dims_rope \(\[4, 12\]\) must be three rotary widths"),
        ({"axes_dims_rope": [4, 5, 7]}, "axes_dims_rope must be a list of positive even ints"),
        ({"axes_dims_rope": 16}, "axes_dims_rope must be a list of positive even ints"),
        ({"guidance_embeds": "yes"}, "guidance_embeds must be true or false, got 'yes'"),
        ({"num_single_layers": 0}, "num_single_layers must be a positive int, got 0"),
        ({"out_channels": "16"}, "out_channels must be a positive int or null"),
        ({"joint_attention_dim": 1.5}, "joint_attention_dim must be a positive int"),
    ],
)
def test_flux_config_errors_name_the_file_and_the_key(tmp_path, changes, expected):
    path = write_json(tmp_path / "config.json", {**FLUX_TINY, **changes})
    with pytest.raises(ValueError, match=expected) as error:
        load_config(path)
    assert str(error.value).startswith(path)
