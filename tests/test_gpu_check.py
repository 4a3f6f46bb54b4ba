"""benchmarks/gpu_check.py and gpu_check.sh: the one-command GPU check, smoke-run on the CPU.

The script's smoke mode (--device cpu --tiny: a 2-block transformer of the --model family, float32, a few
steps) runs every variant and writes the same JSON as on a GPU; these tests check its keys and types,
never its timings."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SHELL = ROOT / "benchmarks" / "gpu_check.sh"
VARIANTS = ("unmerged_eager", "unmerged_fast", "sdtm_eager", "sdtm_fast", "sdtm_aggressive_eager",
            "sdtm_aggressive_fast")
SDTM_VARIANTS = VARIANTS[2:]
PHASES = ("protected", "structure", "detail")


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *options: str, out: Path | None = None) -> dict:
    """Run the script in smoke mode into ``tmp_path``; returns the JSON it wrote."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out is not None:
        env["OUT"] = str(out)
    results = tmp_path / "results"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out-dir", str(results), *options]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = sorted(results.glob("gpu-*-cpu.json"))
    assert len(written) == 1, written
    assert "wrote" in done.stdout and "median s" in done.stdout  # the readable summary
    return json.loads(written[0].read_text())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_common(data: dict, batch: int = 2, rounds: int = 1) -> None:
    for key in ("device", "torch", "date", "fast_path", "status"):
        assert isinstance(data[key], str), key
    assert data["triton"] is None or isinstance(data["triton"], str)
    datetime.datetime.fromisoformat(data["date"])
    assert data["status"] == "complete" and data["errors"] == {}
    assert _is_number(data["mac_ratio"]) and data["mac_ratio"] >= 1
    assert _is_number(data["mac_ratio_aggressive"]) and data["mac_ratio_aggressive"] >= 1
    assert _is_number(data["wall_seconds"]) and data["wall_seconds"] >= 0
    settings = data["settings"]
    assert settings["size"] == [256, 256] and settings["batch"] == batch and settings["dtype"] == "float32"
    assert settings["rounds"] == rounds
    tree = data["tree"]  # the commit that ran and whether the working tree differed from it
    assert tree["commit"] == data["versions"]["commit"]
    if tree["commit"] == "unknown":
        assert tree["dirty"] == "unknown" and "git" in tree["note"]
    else:
        assert len(tree["commit"]) == 40 and isinstance(tree["dirty"], bool)
        assert tree["dirty"] == bool(tree["changed"]) and len(tree["changed"]) <= 20
        assert not any(p.startswith((".whl/", "benchmarks/results/")) for p in tree["changed"])
    assert data["passed"] is True and data["failure"] is None and data["output_check_failures"] == []
    tolerances = data["output_check_tolerances"]
    assert _is_number(tolerances["fast_vs_eager"]) and _is_number(tolerances["backend_vs_torch"])
    assert "instrumented generation" in data["per_step_source"]
    assert data["memory"]["note"].startswith("null") and data["peak_memory_note"] == data["memory"]["note"]
    for key in ("seconds", "per_phase_ms", "peak_memory_bytes", "first_generation_seconds", "per_step_ms"):
        assert set(data[key]) == set(VARIANTS), key
    assert set(data["speedup"]) == set(data["realised_share"]) == set(SDTM_VARIANTS)
    assert data["peak_memory_bytes"] == dict.fromkeys(VARIANTS)  # no CUDA memory on the CPU
    assert len(data["step_phases"]) == settings["steps"]
    assert set(data["step_phases"]) <= set(PHASES)


def _check_variant(data: dict, name: str) -> None:
    assert _is_number(data["seconds"][name]) and data["seconds"][name] > 0
    stats, rounds = data["seconds_stats"][name], data["round_seconds"][name]
    assert stats["rounds"] == len(rounds) == data["settings"]["rounds"]
    assert stats["min"] <= stats["median"] == data["seconds"][name] <= stats["max"]
    assert stats["min"] == pytest.approx(min(rounds), abs=1e-5)
    assert stats["max"] == pytest.approx(max(rounds), abs=1e-5)
    assert _is_number(data["first_generation_seconds"][name])
    phases = data["per_phase_ms"][name]
    assert set(phases) == set(PHASES)
    assert all(v is None or _is_number(v) for v in phases.values())
    assert _is_number(phases["protected"]) and _is_number(phases["structure"])  # step 0 and step 1
    assert len(data["per_step_ms"][name]) == data["settings"]["steps"]
    assert data["output_check"][name]["finite"] is True
    if name in data["speedup"]:
        assert _is_number(data["speedup"][name]) and _is_number(data["realised_share"][name])


def test_smoke_run_with_graphs_writes_every_key(tmp_path):
    """All six variants, the graphed path with sdtm.core.graphs' CPU stand-in capture, the test results of the
    shell script recorded, the JSON copied into $OUT."""
    out = tmp_path / "out"
    data = _run(tmp_path, "--fast", "graphs", "--steps", "5", "--rounds", "3", "--tests-exit-code", "0",
                "--tests-summary", "3 passed in 1.00s", out=out)
    _check_common(data, rounds=3)
    assert data["model"] == "sd3-medium" and data["settings"]["text_tokens"] == 333
    assert data["settings"]["switch_step"] == 20
    assert data["mac_ratio"] > 1 and data["mac_ratio_aggressive"] > 1  # steps 1, 2 and 4 merge
    for name in VARIANTS:
        _check_variant(data, name)
    assert data["fast_path"] == "cuda_graphs" and data["fast_path_note"] is None
    assert data["tests"] == {"exit_code": 0, "summary": "3 passed in 1.00s", "seconds": None}
    assert data["skipped"] == {}
    for name in ("unmerged_fast", "sdtm_fast", "sdtm_aggressive_fast"):
        stats = data["graph_stats"][name]
        assert stats["graphs"] >= 1 and stats["replays"] >= 1 and stats["eager"] == 0
        assert data["output_check"][name]["relative_difference_vs_eager"] < 1e-5
        assert data["output_check"][name]["within_tolerance"] is True
    assert data["output_check_tolerances"]["fast_vs_eager"] == 0.01  # graph replay
    # sdtm_eager (backend auto on the CPU) against one more generation with the torch backend
    backend = data["output_check_backend"]
    assert backend["checked"] is True and backend["reference_backend"] == "torch"
    assert data["output_check"]["sdtm_eager"]["relative_difference_vs_torch_backend"] < 1e-3
    assert data["output_check"]["sdtm_eager"]["within_backend_tolerance"] is True
    assert "sdtm_eager_torch_backend" not in data["output_check"]
    assert json.loads((out / next((tmp_path / "results").glob("*.json")).name).read_text()) == data


def test_smoke_run_with_compiled_blocks_and_no_aggressive_variants(tmp_path):
    data = _run(tmp_path, "--fast", "compile", "--steps", "2", "--skip-aggressive")
    _check_common(data)
    for name in ("unmerged_eager", "unmerged_fast", "sdtm_eager", "sdtm_fast"):
        _check_variant(data, name)
    assert data["fast_path"] == "torch.compile" and "compile" in data["fast_path_detail"]
    for name in ("sdtm_aggressive_eager", "sdtm_aggressive_fast"):
        assert data["seconds"][name] is None and data["speedup"][name] is None
        assert data["skipped"][name] == "--skip-aggressive"
    assert data["tests"] == {"exit_code": None, "summary": None, "seconds": None}


@pytest.mark.parametrize("model, batch, text_tokens", [("flux-dev", 1, 512), ("pixart-sigma", 2, 300)])
def test_smoke_run_of_each_model(tmp_path, model, batch, text_tokens):
    """The other models' shapes (tiny): their batch and text tokens, their family's switch step (the first
    40% of 5 steps: steps 0 and 1), every variant."""
    data = _run(tmp_path, "--model", model, "--fast", "graphs", "--steps", "5")
    _check_common(data, batch=batch)
    assert data["model"] == model
    settings = data["settings"]
    assert settings["text_tokens"] == text_tokens and settings["switch_step"] == 1
    assert model in next((tmp_path / "results").glob("*.json")).name
    assert data["step_phases"] == ["protected", "structure", "detail", "protected", "detail"]
    assert data["mac_ratio"] > 1 and data["mac_ratio_aggressive"] > 1
    for name in VARIANTS:
        _check_variant(data, name)
    for name in ("unmerged_fast", "sdtm_fast", "sdtm_aggressive_fast"):
        assert data["output_check"][name]["relative_difference_vs_eager"] < 1e-5


CACHE_VARIANTS = ("unmerged_eager", "cache_eager", "sdtm_eager", "both_eager")


@pytest.mark.parametrize("model, cache, batch, blocks", [("sd3-medium", "cache-dit", 2, 2), ("flux-dev", "taylorseer", 1, 3)])
def test_smoke_run_of_the_cache_variant(tmp_path, model, cache, batch, blocks):
    """--cache: the four eager variants (unmerged, the cache alone, SDTM alone, both) on the cache's steps mask,
    what each computed, SDTM's records and the stacking efficiency in the JSON."""
    data = _run(tmp_path, "--model", model, "--cache", cache, "--steps", "5")
    assert data["status"] == "complete" and data["errors"] == {} and data["skipped"] == {}
    assert data["model"] == model and data["cache"] == cache and data["settings"]["batch"] == batch
    assert cache in next((tmp_path / "results").glob("*.json")).name
    assert data["variants"] == list(CACHE_VARIANTS) and data["fast_path"] == "none"
    for name in CACHE_VARIANTS:
        assert _is_number(data["seconds"][name]) and data["seconds"][name] > 0
        assert len(data["per_step_ms"][name]) == 5 and data["output_check"][name]["finite"] is True
    speedup = data["speedup"]
    assert set(speedup) == set(CACHE_VARIANTS[1:]) and all(_is_number(v) for v in speedup.values())
    assert data["stacking_efficiency"] == pytest.approx(
        speedup["both_eager"] / (speedup["cache_eager"] * speedup["sdtm_eager"]))
    stacking = data["stacking"]
    assert stacking["schedule"]["mask"] == [1, 1, 1, 0, 1]
    computed = stacking["computed"]
    assert set(computed) == set(CACHE_VARIANTS)
    for name in CACHE_VARIANTS:
        assert computed[name]["block_calls"] == 5 * blocks and computed[name]["blocks"] == blocks
    for name in ("unmerged_eager", "sdtm_eager"):
        assert computed[name]["computed_block_calls"] == 5 * blocks and computed[name]["computed_steps"] == 5
    for name in ("cache_eager", "both_eager"):
        assert computed[name]["steps_all_blocks_computed"] == [0, 1, 2, 4]
        assert computed[name]["computed_block_calls"] < 5 * blocks
    records = stacking["sdtm_records"]
    assert set(records) == {"sdtm_eager", "both_eager"} and records["sdtm_eager"]["skipped"] == 0
    assert records["both_eager"]["skipped"] == 5 * blocks - computed["both_eager"]["computed_block_calls"]
    for name in CACHE_VARIANTS[1:]:
        assert _is_number(data["output_check"][name]["relative_difference_vs_unmerged"])


def test_output_past_the_tolerances_fails_the_run(tmp_path, monkeypatch):
    """An output off its reference beyond the tolerance: the JSON is written with "passed": false and the
    reasons, and the exit code is 1."""
    gpu_check = _gpu_check_module()
    monkeypatch.setattr(gpu_check, "relative_difference", lambda a, b: 0.5)
    monkeypatch.delenv("OUT", raising=False)
    threads = str(torch.get_num_threads())
    path = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--fast", "graphs", "--steps", "2", "--skip-aggressive",
                           "--json", str(path), "--threads", threads, "--backend-tolerance", "0.1"])
    data = json.loads(path.read_text())
    assert code == 1 and data["status"] == "complete" and data["passed"] is False
    failures = data["output_check_failures"]
    assert any(f.startswith("unmerged_fast:") and "0.01" in f for f in failures)
    assert any(f.startswith("sdtm_fast:") for f in failures)
    assert any("torch backend" in f and "0.1" in f for f in failures)
    assert data["failure"] == "; ".join(failures)
    assert data["output_check"]["sdtm_eager"]["within_backend_tolerance"] is False
    assert data["output_check_tolerances"]["backend_vs_torch"] == 0.1


def test_tree_state_is_unknown_without_git(monkeypatch):
    gpu_check = _gpu_check_module()

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(gpu_check.subprocess, "run", no_git)
    tree = gpu_check.tree_state()
    assert tree["commit"] == "unknown" and tree["dirty"] == "unknown" and tree["changed"] is None
    assert "FileNotFoundError" in tree["note"]


def test_tree_state_leaves_out_the_wheels_and_the_results(monkeypatch):
    gpu_check = _gpu_check_module()
    porcelain = "?? .whl/diffusers.whl\n?? benchmarks/results/gpu-x.json\n M sdtm/core/ops.py\n"

    def fake_git(command, **kwargs):
        out = "a" * 40 if "rev-parse" in command else porcelain
        return subprocess.CompletedProcess(command, 0, stdout=out, stderr="")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_git)
    tree = gpu_check.tree_state()
    assert tree["commit"] == "a" * 40 and tree["dirty"] is True and tree["changed"] == ["sdtm/core/ops.py"]
    porcelain = "?? .whl/diffusers.whl\n"
    assert gpu_check.tree_state()["dirty"] is False


def test_rounds_default_to_five_on_a_gpu_run():
    gpu_check = _gpu_check_module()
    threads = str(torch.get_num_threads())
    args = gpu_check.resolve(gpu_check.parse_args(["--device", "cpu", "--threads", threads]))
    assert args.rounds == 5


def test_fbcache_is_refused_for_sd3_medium(capsys):
    gpu_check = _gpu_check_module()
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--cache", "fbcache"])
    assert exit_info.value.code == 2 and "does not run on --model sd3-medium" in capsys.readouterr().err
    assert gpu_check.parse_args(["--model", "flux-dev", "--cache", "fbcache"]).cache == "fbcache"


def test_model_configs_build_the_released_shapes():
    """FLUX.1-dev's and PixArt-Sigma-XL-2-1024-MS's transformers, built on the meta device: their sizes."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    from sdtm.models import presets

    def config(name):  # the preset's transformer config (keys starting with _ are not arguments)
        return {k: v for k, v in presets()[name][1].config.items() if not k.startswith("_")}

    with torch.device("meta"):
        flux = FluxTransformer2DModel(**config("flux-dev"))
        pixart = PixArtTransformer2DModel(**config("pixart-sigma"))
    assert sum(p.numel() for p in flux.parameters()) / 1e9 == pytest.approx(11.9, abs=0.05)
    assert sum(p.numel() for p in pixart.parameters()) / 1e9 == pytest.approx(0.61, abs=0.01)
    assert len(flux.transformer_blocks) == 19 and len(flux.single_transformer_blocks) == 38
    assert flux.inner_dim == 3072 and pixart.inner_dim == 1152 and len(pixart.transformer_blocks) == 28


def test_defaults_follow_the_model():
    gpu_check = _gpu_check_module()
    threads = str(torch.get_num_threads())  # resolve() sets torch's thread count: keep this process's
    for model, steps, batch in (("sd3-medium", 50, 2), ("flux-dev", 28, 1), ("pixart-sigma", 20, 2)):
        args = gpu_check.resolve(gpu_check.parse_args(["--device", "cpu", "--model", model, "--threads", threads]))
        assert (args.steps, args.batch, args.dtype) == (steps, batch, "float32")
    args = gpu_check.resolve(gpu_check.parse_args(["--device", "cpu", "--model", "flux-dev", "--batch", "2",
                                                   "--threads", threads]))
    assert args.batch == 2
    assert gpu_check.resolved(args, gpu_check.default_config(args)).switch_step == 10  # 40% of 28 steps


def test_help_needs_neither_diffusers_nor_a_gpu():
    code = ("import runpy, sys; sys.modules['diffusers'] = None; sys.argv = ['gpu_check.py', '--help']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--fast", "--rounds", "--steps", "--size", "--skip-aggressive", "--tiny", "--budget", "--model",
                   "--cache", "cache-dit", "taylorseer"):
        assert option in done.stdout


def test_help_lists_the_models_of_the_registry(capsys):
    """With diffusers installed, --help lists every preset the check offers (read from sdtm.models)."""
    gpu_check = _gpu_check_module()
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--help"])
    out = capsys.readouterr().out
    assert list(gpu_check.gpu_models())[:3] == ["sd3-medium", "flux-dev", "pixart-sigma"]
    for name in gpu_check.gpu_models():
        assert name in out


def test_fast_path_falls_back_to_compile_without_sdtm_graphs(monkeypatch):
    gpu_check = _gpu_check_module()
    monkeypatch.setattr(gpu_check, "graphs_module", lambda: (None, "sdtm.core.graphs cannot be used (ImportError: x)"))
    threads = str(torch.get_num_threads())  # resolve() sets torch's thread count: keep this process's
    args = gpu_check.resolve(gpu_check.parse_args(["--device", "cpu", "--tiny", "--fast", "graphs",
                                                   "--threads", threads]))
    fast = gpu_check.FastPath(args)
    assert fast.kind == "torch.compile" and "ImportError" in fast.note


def test_steps_are_classified_by_the_default_schedule():
    gpu_check = _gpu_check_module()
    phases = gpu_check.step_phases(50)
    # Protected: s % 3 == 0; structure: s <= 20; detail: the rest.
    assert phases[:5] == ["protected", "structure", "structure", "protected", "structure"]
    assert phases[21] == "protected" and phases[22] == "detail" and phases[49] == "detail"
    assert [phases.count(p) for p in PHASES] == [17, 14, 19]
    medians = gpu_check.phase_medians([3.0, 1.0, 2.0, 5.0, 4.0], phases[:5])
    assert medians == {"protected": 4.0, "structure": 2.0, "detail": None}


def test_shell_script_parses():
    done = subprocess.run(["bash", "-n", str(SHELL)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
