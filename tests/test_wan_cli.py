"""Wan through the command line: MAC counts (checked by hand on a tiny config, and the released models'
presets at 480p and 720p), frame counts, the demo, and ``sdtm generate`` writing GIFs from a local Wan
folder."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_full_pipeline import _tiny_t5_encoder, tiny_t5_tokenizer, T5_WIDTH
from sdtm.cli.macs import schedule_macs
from sdtm.core.config import SDTMConfig
from sdtm.models.wan import TinyWanSpec, WanAdapter, tiny_wan_pipeline

TINY = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12,
            in_channels=4, out_channels=4, text_dim=16, freq_dim=8, ffn_dim=40, num_layers=3, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=64)


def _hand_count(config, frames, rows, cols, text, batch):
    """MACs of one forward by hand: per block the self-attention's four projections and its N x N scores
    and values, the cross-attention's query and output projections on the N tokens, key and value
    projections on the text and its N x T scores and values, the feed-forward's two projections; outside
    the blocks the patch embedding, the time and text embedders, the time projection and the output."""
    c, f = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    n = frames * rows * cols
    block = 4 * n * c * c + 2 * n * n * c + 2 * n * c * c + 2 * text * c * c + 2 * n * text * c + 2 * n * c * f
    patch = 1 * 2 * 2
    outside = (n * config["in_channels"] * patch * c  # patch embedding
               + config["freq_dim"] * c + c * c  # time embedder
               + c * 6 * c  # time projection
               + text * (config["text_dim"] * c + c * c)  # text embedder
               + n * c * config["out_channels"] * patch)  # output projection
    return batch * (config["num_layers"] * block + outside)


def test_macs_match_a_hand_count_on_a_tiny_config():
    # 9 frames of 64 x 48 pixels: 3 latent frames of 4 x 3 tokens (VAE 8, patch 2), 5 text tokens.
    report = schedule_macs(TINY, 64, 48, steps=4, batch=2, text_tokens=5, sdtm=SDTMConfig(ratio=0.0, deviation=0.0),
                           frames=9)
    assert (report.token_frames, report.grid) == (3, (4, 3))
    assert report.baseline_macs == 4 * _hand_count(TINY, 3, 4, 3, 5, 2)
    assert report.sdtm_macs == report.baseline_macs  # nothing merges at ratio 0


def test_merging_lowers_the_count_per_phase():
    report = schedule_macs(TINY, 256, 256, steps=10, batch=2, text_tokens=5, frames=9)
    assert report.token_frames == 3 and report.grid == (16, 16)
    assert 1.0 < report.mac_ratio < 2.0
    structure = [s for s in report.per_step if "ssm" in s.phase]
    assert structure and all(s.attn_tokens < 3 * 16 * 16 for s in structure)


@pytest.mark.parametrize("preset, height, width, grid", [
    ("wan2.1-1.3b", 480, 832, (30, 52)), ("wan2.1-1.3b", 720, 1280, (45, 80)), ("wan2.1-14b", 480, 832, (30, 52)),
])
def test_presets_count_81_frames_by_default(preset, height, width, grid):
    config = WanAdapter.presets[preset].config
    report = schedule_macs({"_class_name": "WanTransformer3DModel", **config}, height, width, steps=50)
    assert (report.frames, report.token_frames, report.grid) == (81, 21, grid)
    # Wan 2.1-1.3B at 480p: about 283 TMACs a step (batch 2); attention's N^2 term is most of it.
    if preset == "wan2.1-1.3b" and height == 480:
        assert 270e12 < report.baseline_macs / 50 < 300e12
    assert 1.1 < report.mac_ratio < 1.3


@pytest.mark.parametrize("frames", [80, 0, 2])
def test_frame_counts_wan_does_not_generate_are_refused(frames):
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        WanAdapter().latent_frames(frames)


def test_image_families_refuse_frames():
    from sdtm.models import family

    with pytest.raises(ValueError, match="frames must be 1"):
        family("sd3").latent_frames(9)


def _sdtm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "sdtm", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_macs_command_takes_frames():
    result = _sdtm("macs", "--config", "wan2.1-1.3b", "--height", "480", "--width", "832", "--frames", "17",
                   "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["frames"], report["token_frames"], report["grid"]) == (17, 5, [30, 52])
    bad = _sdtm("macs", "--config", "wan2.1-1.3b", "--frames", "16")
    assert bad.returncode == 2 and "4k + 1 frames" in bad.stderr


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A WanPipeline folder with every component (a tiny T5 as the text encoder), random weights."""
    from diffusers import WanPipeline

    spec = TinyWanSpec(text_dim=T5_WIDTH)
    tiny = tiny_wan_pipeline(spec)
    tokenizer = tiny_t5_tokenizer(model_max_length=512)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=_tiny_t5_encoder(len(tokenizer), 1), vae=tiny.vae,
                       scheduler=tiny.scheduler, transformer=tiny.transformer)
    path = tmp_path_factory.mktemp("wan") / "pipe"
    pipe.save_pretrained(str(path))
    return str(path)


def test_generate_writes_a_gif_per_prompt(wan_folder, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    result = _sdtm("generate", "--model", wan_folder, "--prompt", "a red fox", "--out", str(out), "--steps", "3",
                   "--height", "128", "--width", "96", "--frames", "9", "--ratio", "0.5")
    assert result.returncode == 0, result.stderr
    gif = out / "00000.gif"
    with Image.open(gif) as image:
        assert image.n_frames == 9 and image.size == (96, 128)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["frames"] == 9 and manifest["settings"]["sdtm"]["ratio"] == 0.5
    bad = _sdtm("generate", "--model", wan_folder, "--prompt", "x", "--out", str(tmp_path / "bad"), "--frames", "8",
                "--height", "128", "--width", "96")
    assert bad.returncode == 2 and "4k + 1 frames" in bad.stderr


def test_demo_runs_the_tiny_wan_pipeline(tmp_path):
    from sdtm.cli.demo import run_demo

    lines = []
    result = run_demo(steps=4, repeats=1, out=str(tmp_path), print_fn=lines.append, model="wan", backend="torch")
    assert os.path.isfile(result["png"]) and result["mac_ratio"] > 1.0
    assert "9 frames (3 latent)" in lines[0] and "432 image tokens" in lines[0]
    assert torch.isfinite(torch.tensor(result["relative_change"])) and result["relative_change"] > 0
