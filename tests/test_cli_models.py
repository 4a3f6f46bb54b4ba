"""Every model family through the command line: ``sdtm demo --model``, ``sdtm generate`` on Flux.1 and
PixArt folders (the pipeline class read from model_index.json), ``sdtm bench e2e --model`` and the
denoising loop it times."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtm import SDTMConfig, sdtm_state
from sdtm.cli import demo, generate
from sdtm.cli.main import main
from sdtm.cli.bench import E2E_MODELS, Denoiser, shaped_transformer
from test_generate import cli, manifest, only_files, refuse_to_load
from tiny_full_pipeline import CLIP_HIDDEN, CLIP_TOKENS, T5_WIDTH, _tiny_t5_encoder, tiny_clip_tokenizer, tiny_t5_tokenizer


# ------------------------------------------------------------------------------- complete tiny pipelines
def _clip_text_encoder(vocab_size: int, seed: int):
    """FluxPipeline's CLIP encoder: a ``CLIPTextModel`` (its pooled output is the pooled embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_TOKENS,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def build_flux(seed: int = 0):
    """A ``FluxPipeline`` with every component (guidance-distilled tiny transformer, CLIP and T5)."""
    from diffusers import FluxPipeline

    from sdtm.models.flux import TinyFluxSpec, tiny_flux_pipeline

    base = tiny_flux_pipeline(TinyFluxSpec(joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_HIDDEN), seed)
    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer(model_max_length=512)
    pipe = FluxPipeline(scheduler=base.scheduler, vae=base.vae,
                        text_encoder=_clip_text_encoder(len(clip_tokenizer), seed + 1), tokenizer=clip_tokenizer,
                        text_encoder_2=_tiny_t5_encoder(len(t5_tokenizer), seed + 2), tokenizer_2=t5_tokenizer,
                        transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pixart(pipeline: str = "PixArtSigmaPipeline", seed: int = 0):
    """A PixArt pipeline (``pipeline``: the Sigma or alpha class) with every component (T5 included)."""
    import diffusers

    from sdtm.models.pixart import TinyPixArtSpec, tiny_pixart_pipeline

    base = tiny_pixart_pipeline(TinyPixArtSpec(caption_channels=T5_WIDTH), seed)
    tokenizer = tiny_t5_tokenizer(model_max_length=300)
    pipe = getattr(diffusers, pipeline)(tokenizer=tokenizer, text_encoder=_tiny_t5_encoder(len(tokenizer), seed + 1),
                                        vae=base.vae, transformer=base.transformer, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FAMILIES = {
    "flux": ("FluxPipeline", build_flux),
    "pixart-sigma": ("PixArtSigmaPipeline", build_pixart),
    "pixart-alpha": ("PixArtAlphaPipeline", lambda: build_pixart("PixArtAlphaPipeline")),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folder of each family's tiny pipeline, saved on first use."""
    folders: dict[str, str] = {}

    def folder(name: str) -> str:
        if name not in folders:
            path = tmp_path_factory.mktemp(name) / "model"
            FAMILIES[name][1]().save_pretrained(str(path))
            folders[name] = str(path)
        return folders[name]

    return folder


class LoadSpy:
    """Stands in for ``generate.load_pipeline``: loads for real and records every pipeline call's
    keyword arguments."""

    def __init__(self):
        self.original = generate.load_pipeline
        self.pipe = None
        self.calls: list[dict] = []

    def load(self, job):
        self.pipe = self.original(job)
        return self

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)


def fake_folder(path, pipeline: str, transformer: dict, vae_levels: int = 4, missing: tuple[str, ...] = ()) -> str:
    """A diffusers folder with config files only: ``model_index.json`` naming ``pipeline`` (its components:
    transformer, vae and the text encoders and tokenizers, but ``missing`` listed as null), the
    transformer's config and a VAE of ``vae_levels`` levels."""
    components = {"transformer": ["diffusers", transformer["_class_name"]], "vae": ["diffusers", "AutoencoderKL"]}
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        components[name] = [None, None] if name in missing else ["transformers", "Whatever"]
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}))
    for name, config in (("transformer", transformer),
                         ("vae", {"_class_name": "AutoencoderKL", "block_out_channels": [8] * vae_levels})):
        (path / name).mkdir()
        (path / name / "config.json").write_text(json.dumps(config))
    return str(path)


SD3_CONFIG = {"_class_name": "SD3Transformer2DModel", "patch_size": 2, "pos_embed_max_size": 96}
FLUX_CONFIG = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "guidance_embeds": True}
SCHNELL_CONFIG = {**FLUX_CONFIG, "guidance_embeds": False}
SIGMA_CONFIG = {"_class_name": "PixArtTransformer2DModel", "patch_size": 2, "sample_size": 128}
# PixArt-alpha folders as released name the transformer Transformer2DModel.
ALPHA_CONFIG = {"_class_name": "Transformer2DModel", "patch_size": 2, "norm_type": "ada_norm_single"}


def job(argv: list[str]):
    parser = argparse.ArgumentParser()
    generate.configure_parser(parser)
    return generate.job_from_args(parser.parse_args(argv))


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


# ------------------------------------------------------------------------------------------ sdtm generate
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_loads_the_pipeline_class_of_the_folder_and_calls_it_as_its_family_needs(
        saved, tmp_path, monkeypatch, family):
    pipeline = FAMILIES[family][0]
    spy = LoadSpy()
    monkeypatch.setattr(generate, "load_pipeline", spy.load)
    out = tmp_path / "out"
    assert cli(["generate", "--model", saved(family), "--prompt", "a red cat", "--out", str(out), "--steps", "5",
                "--height", "32", "--width", "48", "--ratio", "0.5", "--deviation", "0", "--backend", "torch"]) == 0
    assert type(spy.pipe).__name__ == pipeline
    assert only_files(out) == ["00000.png", "manifest.json"]
    image = pixels(out / "00000.png")
    assert image.shape == (32, 48, 3) and image.std() > 0
    settings = manifest(out)["settings"]
    assert settings["pipeline"] == pipeline
    assert settings["sdtm"]["switch_step"] == 1  # the family's default: the first 40% of 5 steps
    (kwargs,) = spy.calls
    assert "negative_prompt" not in kwargs and "true_cfg_scale" not in kwargs
    if family == "flux":
        assert settings["guidance"] == kwargs["guidance_scale"] == 3.5  # the distilled guidance
        assert "use_resolution_binning" not in kwargs and "clean_caption" not in kwargs
    else:
        assert settings["guidance"] == kwargs["guidance_scale"] == 4.5
        assert kwargs["use_resolution_binning"] is False and kwargs["clean_caption"] is False
    state = sdtm_state(spy.pipe)
    # Generated at 32 x 48 pixels, not at an aspect-ratio bin of PixArt's, with SDTM merging.
    assert (state.grid.height, state.grid.width) == (16, 24)
    assert state.config.switch_step == 1
    assert any(r.mode == "merged" and r.mlp_tokens < 16 * 24 for r in state.records)


def test_flux_guidance_is_the_distilled_guidance(saved, tmp_path, monkeypatch):
    spy = LoadSpy()
    monkeypatch.setattr(generate, "load_pipeline", spy.load)
    out = tmp_path / "out"
    assert cli(["generate", "--model", saved("flux"), "--prompt", "a dog", "--out", str(out), "--steps", "2",
                "--height", "16", "--width", "16", "--guidance", "0.5", "--no-sdtm"]) == 0
    assert spy.calls[0]["guidance_scale"] == 0.5  # below 1 and still passed: no CFG to switch off
    assert manifest(out)["settings"]["guidance"] == 0.5 and manifest(out)["settings"]["sdtm"] is None


def test_family_defaults_and_explicit_settings(tmp_path):
    sd3 = fake_folder(tmp_path / "sd3", "StableDiffusion3Pipeline", SD3_CONFIG)
    flux = fake_folder(tmp_path / "flux", "FluxPipeline", FLUX_CONFIG)
    sigma = fake_folder(tmp_path / "sigma", "PixArtSigmaPipeline", SIGMA_CONFIG, missing=("text_encoder_2",
                                                                                             "tokenizer_2"))
    common = ["--prompt", "a cat", "--out", str(tmp_path / "out"), "--steps", "28"]
    assert (job(["--model", sd3, *common]).guidance, job(["--model", sd3, *common]).sdtm.switch_step) == (7.0, 20)
    assert (job(["--model", flux, *common]).guidance, job(["--model", flux, *common]).sdtm.switch_step) == (3.5, 10)
    assert (job(["--model", sigma, *common]).guidance, job(["--model", sigma, *common]).sdtm.switch_step) == (4.5, 10)
    given = job(["--model", flux, *common, "--switch-step", "3", "--guidance", "2"])
    assert (given.guidance, given.sdtm.switch_step) == (2.0, 3)
    assert job(["--model", flux, *common, "--no-sdtm"]).sdtm is None


def test_a_flux_model_without_guidance_embedding_takes_no_guidance(tmp_path, capsys, monkeypatch):
    schnell = fake_folder(tmp_path / "schnell", "FluxPipeline", SCHNELL_CONFIG)
    common = ["--prompt", "a cat", "--out", str(tmp_path / "out"), "--steps", "4"]
    quiet = job(["--model", schnell, *common])
    assert quiet.guidance is None and "guidance_scale" not in generate.pipeline_kwargs(quiet)
    assert quiet.settings()["guidance"] is None
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    assert cli(["generate", "--model", schnell, *common, "--guidance", "3.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtm generate: --guidance: this FluxPipeline has no guidance embedding") and \
        err.count("\n") == 1, err


@pytest.mark.parametrize("pipeline, config, geometry, good, bad, message", [
    ("StableDiffusion3Pipeline", SD3_CONFIG, (8, 2, 96), (1024, 1536), (1552, 1024), "positional table covers 96x96"),
    ("FluxPipeline", FLUX_CONFIG, (8, 2, None), (1008, 2048), (1000, 1024), "multiples of 16 for this model (VAE "
                                                                            "factor 8 x 2x2 packing)"),
    ("PixArtSigmaPipeline", SIGMA_CONFIG, (8, 2, None), (4096, 2048), (1000, 1024), "multiples of 16 for this model "
                                                                                    "(VAE factor 8 x patch 2)"),
    ("PixArtAlphaPipeline", ALPHA_CONFIG, (8, 2, None), (1024, 1024), (1024, 1032), "multiples of 16"),
])
def test_geometry_per_family(tmp_path, capsys, monkeypatch, pipeline, config, geometry, good, bad, message):
    """VAE factor x token side (Flux: the pipeline's 2x2 packing of a patch-1 transformer) and the largest
    grid (SD3's positional table; none for the rotary and computed sin-cos positions)."""
    folder = fake_folder(tmp_path / "model", pipeline, config)
    assert generate.model_geometry(folder) == geometry
    common = ["--prompt", "a cat", "--out", str(tmp_path / "out")]
    assert job(["--model", folder, *common, "--height", str(good[0]), "--width", str(good[1])]).pipeline == pipeline
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    assert cli(["generate", "--model", folder, *common, "--height", str(bad[0]), "--width", str(bad[1])]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("family", ["pixart-sigma", "pixart-alpha"])
def test_pixart_sides_are_multiples_of_8_whatever_the_vae(saved, tmp_path, capsys, monkeypatch, family):
    """PixArt's pipeline takes sides divisible by 8 only (PixArtSigmaPipeline.check_inputs): the tiny
    pipeline's VAE does not down-sample, so its tokens span 2 pixels, and 12 is refused up front."""
    pipeline, folder = FAMILIES[family][0], saved(family)
    assert generate.model_geometry(folder) == (1, 2, None)
    common = ["--prompt", "a cat", "--out", str(tmp_path / "out")]
    assert job(["--model", folder, *common, "--height", "16", "--width", "24"]).height == 16
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    capsys.readouterr()  # saving the folder wrote progress bars
    assert cli(["generate", "--model", folder, *common, "--height", "12", "--width", "16"]) == 2
    err = capsys.readouterr().err
    assert err == (f"sdtm generate: --height and --width must be positive multiples of 8 for this model (VAE factor "
                   f"1 x patch 2, and the {pipeline} takes multiples of 8 only), got 12x16.\n")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pixart_rule_keeps_the_token_grid_of_the_patches():
    """The multiple of 8 is the pipeline's rule on pixels; the token grid is still pixels / (VAE x patch)."""
    generate.check_size(24, 8, 1, 2, 12, pixel_multiple=8)
    with pytest.raises(ValueError, match="needs a 16x4 token grid .* covers 12x12 tokens .at most 24 pixels a side"):
        generate.check_size(32, 8, 1, 2, 12, pixel_multiple=8)


@pytest.mark.parametrize("case, message", [
    ("unsupported", "model_index.json names the pipeline 'StableDiffusionXLPipeline'; sdtm generate loads "
                    f"{', '.join(generate.PIPELINES)} folders."),  # every registered family's pipeline classes
    ("no-class", "model_index.json names the pipeline None"),
    ("wrong-transformer", "transformer/config.json names 'SD3Transformer2DModel', not the FluxTransformer2DModel of a "
                          "FluxPipeline."),
    ("not-pixart", "transformer/config.json names 'Transformer2DModel', not the PixArtTransformer2DModel of a "
                   "PixArtSigmaPipeline."),
    ("no-text-encoder", "model_index.json lists no text_encoder_2 (got [null, null]); sdtm generate turns the "
                        "prompts into embeddings with the pipeline's text encoders"),
])
def test_folders_that_cannot_generate_exit_2_before_loading(tmp_path, capsys, monkeypatch, case, message):
    folder = {
        "unsupported": lambda: fake_folder(tmp_path / "m", "StableDiffusionXLPipeline", SD3_CONFIG),
        "no-class": lambda: fake_folder(tmp_path / "m", None, SD3_CONFIG),
        "wrong-transformer": lambda: fake_folder(tmp_path / "m", "FluxPipeline", SD3_CONFIG),
        "not-pixart": lambda: fake_folder(tmp_path / "m", "PixArtSigmaPipeline",
                                          {**ALPHA_CONFIG, "norm_type": "ada_norm_zero"}),
        "no-text-encoder": lambda: fake_folder(tmp_path / "m", "FluxPipeline", FLUX_CONFIG,
                                               missing=("text_encoder_2",)),
    }[case]()
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    assert cli(["generate", "--model", folder, "--prompt", "a cat", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdtm generate: --model {folder!r}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_saved_tiny_pipeline_without_text_encoders_is_refused(tmp_path, capsys, monkeypatch):
    from sdtm.models.flux import tiny_flux_pipeline

    folder = tmp_path / "model"
    tiny_flux_pipeline().save_pretrained(str(folder))  # text encoders None: saved as null
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    assert cli(["generate", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "out"),
                "--height", "32", "--width", "32"]) == 2
    assert "model_index.json lists no tokenizer (got [null, null])" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- sdtm demo
def test_demo_switch_step_sd3_in_proportion_others_by_family():
    assert demo.demo_settings("sd3", 12, "auto") == {"backend": "auto", "switch_step": 5}
    assert demo.demo_settings("flux", 12, "cpp") == {"backend": "cpp", "switch_step": None}
    assert demo.demo_settings("pixart", 12, "torch")["switch_step"] is None


@pytest.mark.parametrize("model, size, message", [
    ("flux", 128, None), ("pixart", 128, None), ("flux", 12, None), ("sd3", 12, None),
    ("sd3", 128, "--size 128 is larger than the sd3 demo model's positional table allows; use at most 96."),
    ("pixart", 12, "--size 12: the pixart demo model takes multiples of 8 (PixArtSigmaPipeline takes sides "
                   "divisible by 8 only); use 8 or 16."),
    ("pixart", 4, "--size 4: the pixart demo model takes multiples of 8 (PixArtSigmaPipeline takes sides "
                  "divisible by 8 only); use 8."),
])
def test_demo_passes_the_model_and_checks_its_size(monkeypatch, capsys, tmp_path, model, size, message):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    assert main(["demo", "--model", model, "--size", str(size), "--out", str(tmp_path)]) == (2 if message else 0)
    if message is None:
        assert calls[0]["model"] == model and calls[0]["size"] == size
    else:
        assert calls == [] and capsys.readouterr().err == f"sdtm demo: {message}\n"


def test_demo_refuses_a_pixart_size_before_building(monkeypatch):
    monkeypatch.setitem(demo.DEMO_MODELS, "pixart", dataclasses.replace(demo.DEMO_MODELS["pixart"], build=refuse_to_load))
    with pytest.raises(ValueError, match="--size 12: the pixart demo model takes multiples of 8"):
        demo.run_demo(size=12, steps=2, repeats=1, out=None, model="pixart")


@pytest.mark.parametrize("model, title, batch", [("flux", "tiny Flux.1 pipeline", "batch 1"),
                                                 ("pixart", "tiny PixArt-Sigma pipeline", "batch 2 (CFG)")])
def test_demo_of_each_family(tmp_path, model, title, batch):
    lines: list[str] = []
    # 12 x 12 tokens: on 8 x 8 no structure-phase window merges.
    result = demo.run_demo(size=24, steps=5, repeats=1, backend="torch", out=str(tmp_path), print_fn=lines.append,
                           model=model)
    text = "\n".join(lines)
    assert text.startswith(title) and batch in lines[0] and "switch_step=1 (the family's default)" in text
    assert "speedup" in text and "MAC ratio" in text and "ssm" in text
    assert result["model"] == model and result["switch_step"] == 1
    # The MAC count covers the grid the generation ran on (Flux: 2x2 packed latent pixels).
    assert result["grid"] == result["mac_grid"] == [12, 12]
    assert result["mac_ratio"] > 1 and result["baseline_macs"] > result["sdtm_macs"]
    assert (tmp_path / "sdtm_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ sdtm bench e2e
@pytest.mark.parametrize("model", ["sd3", "flux", "pixart"])
def test_denoiser_calls_each_family_as_its_pipeline(model):
    """Every step is found (Flux: from timestep / 1000) and the grid read (Flux: from img_ids)."""
    transformer = shaped_transformer(model, num_layers=1, heads=1, sample_size=24)
    run = Denoiser(transformer, 16, 24, steps=5, batch=E2E_MODELS[model]["batch"], text_tokens=8)
    run.patch(SDTMConfig(backend="torch", switch_step=None))
    out = run()
    state = sdtm_state(transformer)
    assert (state.grid.height, state.grid.width) == (8, 12)
    assert sorted({r.step for r in state.records}) == list(range(5))
    assert out.shape == run.latents.shape and torch.isfinite(out).all()
    run.patch(None)


@pytest.mark.parametrize("model, batch, text_tokens", [("flux", 1, 512), ("pixart", 2, 300)])
def test_bench_e2e_of_each_family(monkeypatch, capsys, model, batch, text_tokens):
    from sdtm.cli import bench

    original = bench.bench_e2e
    monkeypatch.setattr(bench, "bench_e2e", lambda backends, rounds, progress, model: original(
        backends, rounds=1, steps=5, progress=False, latent=(32, 32), small_latent=(20, 32), num_layers=1, heads=1,
        model=model))
    assert main(["bench", "e2e", "--json", "--backends", "torch", "--model", model]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == model and result["mac_ratio"] > 1
    assert result["mac_grid"] == result["grids"]["sdtm"] == [16, 16]
    shape = result["transformer"]
    assert (shape["batch"], shape["text_tokens"], shape["steps"], shape["switch_step"]) == (batch, text_tokens, 5, 1)
    assert shape["blocks"] == (3 if model == "flux" else 1)  # Flux: one double-stream, two single-stream blocks
    assert result["realised_share"]["torch"] == pytest.approx(result["speedup"]["torch"] / result["mac_ratio"])


def test_bench_e2e_text_names_the_model(monkeypatch, capsys):
    from sdtm.cli import bench

    canned = {"model": "flux", "mac_ratio": 1.25, "mac_grid": [64, 64],
              "transformer": {"title": "FLUX.1-dev-shaped transformer", "blocks": 3, "channels": 768, "batch": 1,
                              "text_tokens": 512, "steps": 10, "switch_step": 3},
              "seconds": {"unmerged": 2.0, "cpp": 1.6}, "speedup": {"cpp": 1.25}, "realised_share": {"cpp": 1.0},
              "grids": {"sdtm": [64, 64], "unmerged_equal_tokens": [40, 52]},
              "overhead_seconds": {"unmerged": 1.0, "cpp": 1.1}, "overhead_added": {"cpp": 0.1}}
    seen = []
    monkeypatch.setattr(bench, "bench_e2e", lambda backends, rounds, progress, model: seen.append(model) or canned)
    assert main(["bench", "e2e", "--backends", "cpp", "--model", "flux"]) == 0
    out = capsys.readouterr().out
    assert seen == ["flux"]
    assert ("FLUX.1-dev-shaped transformer (C=768, 3 blocks), 64x64 tokens + 512 text tokens, batch 1, 10 steps, "
            "switch step 3; MAC ratio 1.250") in out
    assert main(["bench", "e2e", "--backends", "cpp"]) == 0
    assert seen == ["flux", "sd3"]  # the default
