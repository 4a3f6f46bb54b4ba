"""The sdtm command line: macs against hand-computed MACs, demo, bench, and bad arguments."""

import json
import logging
import os
import sys

import pytest
import torch

from sdtm import SDTMConfig, apply_SDTM
from sdtm.cli.main import main
from sdtm.cli.macs import PRESETS, schedule_macs
from sdtm.models.sd3 import TinySpec, tiny_prompt_embeds, tiny_transformer

TINY = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=8, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16)


def hand_block_macs(b, n, t, c, last):
    """One JointTransformerBlock on n image and t text tokens (SD3, no dual attention)."""
    norm1 = b * c * 6 * c
    norm1_context = b * c * (2 * c if last else 6 * c)
    qkv = 3 * b * n * c * c + 3 * b * t * c * c
    sdpa = 2 * b * (n + t) ** 2 * c
    out = b * n * c * c + (0 if last else b * t * c * c)
    ff = 8 * b * n * c * c
    ff_context = 0 if last else 8 * b * t * c * c
    return norm1 + norm1_context + qkv + sdpa + out + ff_context, ff


def hand_outside_macs(b, n, t, c, cfg):
    p, cin, cout = cfg["patch_size"], cfg["in_channels"], cfg["out_channels"]
    patch_embed = b * n * cin * p * p * c
    time_embed = b * (256 * c + c * c)
    pooled_embed = b * (cfg["pooled_projection_dim"] * c + c * c)
    context_embed = b * t * cfg["joint_attention_dim"] * c
    norm_out = b * c * 2 * c
    proj_out = b * n * c * p * p * cout
    return patch_embed + time_embed + pooled_embed + context_embed + norm_out + proj_out


def test_macs_match_hand_computation(capsys, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **TINY}))
    # 128 x 192 pixels -> 16 x 24 latent -> 8 x 12 = 96 tokens; 4 steps; switch at 1; step 0 protected.
    argv = ["macs", "--config", str(config_path), "--height", "128", "--width", "192", "--steps", "4",
            "--batch", "2", "--text-tokens", "7", "--switch-step", "1", "--protect-steps-frequency", "4", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    b, n, t, c = 2, 96, 7, 16
    outside = hand_outside_macs(b, n, t, c, TINY)

    def block(layer, attn_tokens, mlp_tokens):
        last = layer == 1
        return hand_block_macs(b, attn_tokens, t, c, last)[0] + hand_block_macs(b, mlp_tokens, t, c, last)[1]

    full = outside + block(0, n, n) + block(1, n, n)
    assert result["baseline_macs"] == 4 * full
    # ratio_s = 0.1 + 0.4 cos(pi/2 s/3): reduce_num 96*0.5=48 (s0, protected), int(96*0.4464)=42, int(96*0.3)=28,
    # int(96*0.1)=9. 24 windows of 4 tokens. SSM step 1: 42 // 3 // 16 * 16 = 0 windows, IDM step 3:
    # r = 9 // 16 * 16 = 0: a plan would merge nothing, so the blocks run unchanged, without one. IDM step 2:
    # r = 28 // 16 * 16 = 16; the plan matmul is 72 x 24 x C a sample.
    plan = b * 72 * 24 * c
    sdtm = full + full + (2 * plan + outside + block(0, n, n - 16) + block(1, n, n - 16)) + full
    assert result["sdtm_macs"] == sdtm
    assert result["plan_macs"] == 2 * plan
    assert result["mac_ratio"] == pytest.approx(4 * full / sdtm)
    assert [s["mlp_tokens"] for s in result["per_step"]] == [96, 96, 80, 96]


def test_macs_schedule_matches_a_real_run():
    """The token counts schedule_macs assumes per step are the ones a real patched generation uses."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdtm import sdtm_state

    spec = TinySpec(num_layers=3, sample_size=32)
    transformer = tiny_transformer(spec)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    embeds = tiny_prompt_embeds(spec, batch=2)
    settings = dict(ratio=0.5, switch_step=2, protect_steps_frequency=3, backend="torch")
    apply_SDTM(transformer, scheduler=scheduler, **settings)
    scheduler.set_timesteps(7)
    records = []
    for t in scheduler.timesteps:
        transformer(hidden_states=torch.randn(2, 4, 32, 32), timestep=t.expand(2),
                    encoder_hidden_states=embeds["prompt_embeds"], pooled_projections=embeds["pooled_prompt_embeds"])
        records += sdtm_state(transformer).records[-3:]
    cfg = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    report = schedule_macs(cfg, 32 * 8, 32 * 8, 7, batch=2, sdtm=SDTMConfig(**settings), text_tokens=spec.text_tokens)
    for step in report.per_step:
        calls = [r for r in records if r.step == step.step]
        assert step.attn_tokens == sum(r.attn_tokens for r in calls) / 3
        assert step.mlp_tokens == sum(r.mlp_tokens for r in calls) / 3
    assert report.sdtm_macs < report.baseline_macs


def test_macs_presets_and_plot(capsys, tmp_path):
    assert PRESETS["sd3-medium"]["num_layers"] == 24 and PRESETS["sd3-medium"]["caption_projection_dim"] == 1536
    plot = tmp_path / "macs.png"
    assert main(["macs", "--config", "sd3-medium", "--steps", "50", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "MAC ratio 1.21" in text and "8.904 a step" in text  # SD3-medium, 1024x1024, batch 2
    assert plot.stat().st_size > 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["macs", "--config", "nope"], "neither a preset"),
        (["macs", "--config", "sd3-medium", "--height", "1000"], "multiples of 16"),
        (["macs", "--config", "sd3-medium", "--ratio", "2"], "ratio must lie in"),
        (["macs", "--config", "sd3-medium", "--steps", "0"], "must be >= 1"),
        (["demo", "--size", "31"], "must be even"),
        (["bench", "everything"], "invalid choice"),
        (["demo", "--out", "/nonexistent/folder"], "is not a folder"),
        (["demo", "--size", "98"], "use at most 96"),
        (["macs", "--config", "sd3-medium", "--text-tokens", "100000000000"], "cannot count the MACs"),
        (["macs", "--config", "sd3-medium", "--plot", "/nonexistent/folder/macs.png"], "does not exist"),
        (["macs", "--config", "sd3-medium", "--plot", "macs.unknown"], "must end in an image extension"),
        (["macs", "--config", "sd3-medium", "--plot", "/"], "is a folder"),
        (["bench", "kernels", "--plot", "/nonexistent/folder/bench.png"], "does not exist"),
        (["bench", "block", "--model", "flux"], "--model: an option of `sdtm bench e2e` only"),
        (["bench", "e2e", "--model", "sdxl"], "invalid choice"),
        (["demo", "--model", "sdxl"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_every_subcommand_has_help(capsys):
    for command in ("demo", "generate", "macs", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: sdtm " + command in capsys.readouterr().out


def test_demo_runs_and_writes_its_png(capsys, tmp_path):
    assert main(["demo", "--size", "32", "--steps", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "MAC ratio" in out and "protected" in out
    png = tmp_path / "sdtm_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_warms_up_every_variant_before_timing(monkeypatch):
    """The first run of a variant pays one-time costs: each variant runs once, untimed and as long as the
    timed runs, before its first timed run."""
    from sdtm import sdtm_state
    from sdtm.cli import demo

    events = []
    generate, timed = demo._generate, demo._timed

    def logged_generate(pipe, demo_model, size, steps, seed, output_type="latent"):
        events.append(("run", sdtm_state(pipe) is not None, steps))
        return generate(pipe, demo_model, size, steps, seed, output_type)

    def logged_timed(pipe, demo_model, size, steps, repeats):
        events.append(("timed", sdtm_state(pipe) is not None, steps))
        return timed(pipe, demo_model, size, steps, repeats)

    monkeypatch.setattr(demo, "_generate", logged_generate)
    monkeypatch.setattr(demo, "_timed", logged_timed)
    demo.run_demo(size=16, steps=3, repeats=1, backend="torch", out=None, print_fn=lambda line: None)
    for patched in (False, True):
        first_timed = events.index(("timed", patched, 3))
        assert ("run", patched, 3) in events[:first_timed], (patched, events)


def test_demo_reports_no_share_when_nothing_merges():
    """One step is a protected step: SDTM merges nothing, the MACs are equal, and no share is printed."""
    from sdtm.cli import demo

    lines = []
    result = demo.run_demo(size=16, steps=1, repeats=1, backend="torch", out=None, print_fn=lines.append)
    text = "\n".join(lines)
    assert result["mac_ratio"] == 1.0 and result["realised_share"] is None
    assert "no realised share: this setting merges nothing (equal MACs)" in text
    assert "realised share " not in text


def test_demo_speedup_line():
    from sdtm.cli.demo import speedup_line

    assert speedup_line(1.1, 1.25, 0.01) == ("speedup 1.10x, MAC ratio 1.25x, realised share 88%, relative change "
                                             "of the latents 0.010")
    assert "%" not in speedup_line(4.36, 1.0, 0.0)
    assert speedup_line(4.36, 1.0, 0.0).startswith("speedup 4.36x, MAC ratio 1.00x, no realised share: this "
                                                    "setting merges nothing")
    assert "realised share 200% (more than the saved MACs account for: likely timing noise" in speedup_line(
        2.5, 1.25, 0.01)


def test_bench_kernels_json(capsys, monkeypatch):
    from sdtm.cli import bench

    original = bench.bench_kernels
    monkeypatch.setattr(bench, "bench_kernels", lambda grids, rounds, progress, backends: original(
        [(8, 8)], channels=16, rounds=1, progress=False, backends=backends))
    assert main(["bench", "kernels", "--json", "--rounds", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["machine"]["cpu_count"] == os.cpu_count()
    ops = {(row["op"], row["backend"]) for row in result["kernels"]}
    assert ("merge", "torch") in ops and all(row["median_ms"] > 0 for row in result["kernels"])


def test_bench_kernels_times_only_the_backends_asked_for(capsys, monkeypatch):
    """--backends applies to kernels too: torch (the reference) and the backends named, each once."""
    from sdtm.cli import bench

    original = bench.bench_kernels
    monkeypatch.setattr(bench, "bench_kernels", lambda grids, rounds, progress, backends: original(
        [(8, 8)], channels=16, rounds=1, progress=False, backends=backends))
    assert main(["bench", "kernels", "--json", "--backends", "torch", "torch"]) == 0
    rows = json.loads(capsys.readouterr().out)["kernels"]
    assert {row["backend"] for row in rows} == {"torch"}
    assert len(rows) == len({(row["op"], row["shape"], row["device"]) for row in rows})


def test_bench_kernels_rejects_a_backend_with_no_device(monkeypatch):
    from sdtm.cli import bench

    monkeypatch.setattr(bench, "available_backends", lambda: [("torch", torch.device("cpu"))])
    monkeypatch.setattr(bench, "check_backend", lambda name: None)
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        bench.bench_kernels([(8, 8)], channels=16, rounds=1, progress=False, backends=["triton"])


class _StderrHandler(logging.Handler):
    """Writes records to whatever ``sys.stderr`` is when they are emitted (pytest swaps it per phase)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


@pytest.fixture
def diffusers_warnings():
    """diffusers' warnings on (the test session silences them) and written to the captured stderr (its own
    handler holds the stream of the session's start), restored afterwards."""
    from diffusers.utils import logging as diffusers_logging

    logger, level = logging.getLogger("diffusers"), diffusers_logging.get_verbosity()
    handlers = logger.handlers[:]
    logger.handlers[:] = [_StderrHandler()]
    diffusers_logging.set_verbosity_warning()
    yield
    logger.handlers[:] = handlers
    diffusers_logging.set_verbosity(level)


def test_bench_unavailable_backend_is_the_only_line(monkeypatch, capfd, diffusers_warnings):
    """Without CUDA or the Triton interpreter, bench e2e --backends triton fails before any work."""
    from sdtm.cli import bench

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    original = bench.bench_e2e
    monkeypatch.setattr(bench, "bench_e2e", lambda backends, rounds, progress, model: original(
        backends, rounds=1, steps=2, progress=False, latent=(16, 16), small_latent=(8, 16), num_layers=1, heads=1,
        model=model))
    assert main(["bench", "e2e", "--backends", "triton"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("sdtm bench: backend='triton' is not available") and len(err.splitlines()) == 1


def test_sd3_shaped_transformer_casts_without_warnings(capfd, diffusers_warnings):
    from sdtm.models.sd3 import sd3_shaped_transformer

    model = sd3_shaped_transformer(num_layers=1, heads=1, sample_size=8, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert capfd.readouterr().err == ""


def test_demo_checks_its_backend_before_any_output(monkeypatch, capfd):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["demo", "--backend", "triton", "--size", "8", "--steps", "1", "--repeats", "1"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("sdtm demo: backend='triton' is not available") and len(err.splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    ([1, 2], "config.json must hold a JSON object, got a list."),
    ({"_class_name": "SD3Transformer2DModel", "num_layers": "two", "patch_size": 2},
     "config.json: num_layers must be a positive int, got 'two'."),
])
def test_macs_malformed_config_exits_2_with_one_line(capfd, tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    assert main(["macs", "--config", str(path), "--height", "64", "--width", "64", "--steps", "1"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err == f"sdtm macs: {path.parent}/{message}\n"


def test_macs_diffusers_folder_uses_its_vae_factor(capsys, tmp_path):
    """A folder's VAE sets the latent factor: 3 levels (factor 4) give 64 x 96 pixels 8 x 12 tokens."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **TINY}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                              "block_out_channels": [8, 16, 32]}))
    argv = ["macs", "--config", str(tmp_path), "--height", "64", "--width", "96", "--steps", "2", "--text-tokens", "3"]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["grid"] == [8, 12] and result["vae_scale"] == 4
    assert result["per_step"][0]["attn_tokens"] == 96  # step 0 is protected: every token
    assert main(argv) == 0
    assert "64x96 (VAE factor 4, 8x12 = 96 tokens)" in capsys.readouterr().out
    assert main(argv[:3] + ["--height", "60", "--width", "96"]) == 2
    assert "multiples of 8 (VAE factor 4 x patch 2)" in capsys.readouterr().err


def test_bench_block_small(monkeypatch, capsys, tmp_path):
    from sdtm.cli import bench

    original = bench.bench_block_share
    monkeypatch.setattr(bench, "bench_block_share", lambda backends, rounds, progress: original(
        backends, grid=(8, 8), heads=1, rounds=1, progress=False))
    plot = tmp_path / "block.png"
    assert main(["bench", "block", "--json", "--backends", "torch", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(capsys.readouterr().out)["block"]
    assert {(r["backend"], r["phase"]) for r in rows} == {("torch", "ssm"), ("torch", "idm")}
    for r in rows:
        assert r["share"] == pytest.approx(r["added_seconds"] / r["block_seconds"]) and r["added_seconds"] > 0
        assert r["net_share"] == pytest.approx(r["share"] - r["replaced_seconds"] / r["block_seconds"])


def test_bench_e2e_small(monkeypatch, capsys):
    """The end-to-end comparison on a small grid: both comparisons run and report consistent numbers."""
    from sdtm.cli import bench

    original = bench.bench_e2e
    monkeypatch.setattr(bench, "bench_e2e", lambda backends, rounds, progress, model: original(
        backends, rounds=1, steps=3, progress=False, latent=(32, 32), small_latent=(20, 32), num_layers=1,
        heads=2, model=model))
    assert main(["bench", "e2e", "--json", "--backends", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mac_ratio"] > 1.0
    assert set(result["seconds"]) == set(result["overhead_seconds"]) == {"unmerged", "torch"}
    assert result["grids"] == {"sdtm": [16, 16], "unmerged_equal_tokens": [10, 16]}
    assert result["speedup"]["torch"] == pytest.approx(result["seconds"]["unmerged"] / result["seconds"]["torch"])
    assert result["model"] == "sd3" and result["mac_grid"] == [16, 16]
    assert result["transformer"]["batch"] == 2 and result["transformer"]["switch_step"] == 20
