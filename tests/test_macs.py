"""sdtm.macs: checking transformer configs, the latent factor of a diffusers folder, counting limits."""

import json

import pytest

from sdtm.macs import PRESETS, VAE_SCALE, load_config, load_vae_scale, schedule_macs

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
