"""sdtm.cli.caches (a named step cache on a deterministic schedule, with a count of what it computed) and the
commands that use it: ``sdtm bench e2e --cache``, ``sdtm generate --cache``, ``sdtm demo --cache``.

Each cache runs on the tiny SD3, Flux.1 and PixArt pipelines: the block calls it computed (counted by a
torch forward pre-hook on a sub-module each real block forward calls) follow its steps mask exactly, two
generations in a row compute the same, SDTM under it records the blocks skipped, and ``disable`` leaves the
pipeline as it was (no hook, the uncached output bit for bit). No test asserts a timing.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from support import make_pipeline, run_pipeline
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.cli import caches
from sdtm.cli.caches import CACHE_DIT_MISSING, apply_cache, steps_mask, transformer_blocks, warmup_steps
from sdtm.cli.main import main

STEPS = 6
MASK = [1, 1, 0, 1, 0, 1]  # steps_mask(6): 4 of 6 computed
MERGING = dict(ratio=0.5, deviation=0.0, switch_step=2)
CELLS = [("sd3", "taylorseer"), ("sd3", "cache-dit"), ("flux", "fbcache"), ("flux", "taylorseer"),
         ("flux", "cache-dit"), ("pixart", "fbcache"), ("pixart", "taylorseer"), ("pixart", "cache-dit")]


def generate(pipe, family):
    return run_pipeline(pipe, family, steps=STEPS)


def expected_block_calls(family, name, blocks):
    """Block calls the cache computes in one generation: the first block always (fbcache, cache-dit) or SD3's
    last block always (taylorseer), the others at the mask's steps."""
    computed = sum(MASK)
    if name == "taylorseer":
        return computed * blocks if family != "sd3" else computed * (blocks - 1) + STEPS
    return STEPS + computed * (blocks - 1)


def hook_state(pipe):
    """What hooks the transformer and its blocks carry: diffusers registries, forward attributes, torch hooks."""
    modules = [pipe.transformer, *transformer_blocks(pipe.transformer)]
    return [(getattr(getattr(m, "_diffusers_hook", None), "_hook_order", None), "forward" in m.__dict__,
             len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]


def test_steps_mask_computes_about_seventy_percent():
    assert steps_mask(10) == [1, 1, 1, 1, 0, 1, 0, 1, 0, 1] and warmup_steps(10) == 4
    assert steps_mask(STEPS) == MASK and steps_mask(1) == [1] and steps_mask(2) == [1, 0]
    for steps in (5, 10, 20, 28, 50):
        mask = steps_mask(steps)
        assert len(mask) == steps and mask[0] == 1 and abs(sum(mask) - 0.7 * steps) <= 1
        b = warmup_steps(steps)  # TaylorSeer's rule with cache_interval 2, disable_cache_before_step b
        assert mask == [int(s < b or (s - b - 1) % 2 == 0) for s in range(steps)]
    assert sum(steps_mask(28)) == 20 and sum(steps_mask(50)) == 35 and steps_mask(50)[-1] == 1


@pytest.mark.parametrize("family, name", CELLS, ids=[f"{f}-{n}" for f, n in CELLS])
def test_each_cache_follows_its_schedule_and_undoes_itself(family, name):
    pipe = make_pipeline(family)
    plain = generate(pipe, family)
    before = hook_state(pipe)  # after a generation: Flux's pipeline gives its transformer a hook registry
    cache = apply_cache(name, pipe, STEPS)
    try:
        first = generate(pipe, family)
        report = cache.report()
        second = generate(pipe, family)
        assert cache.report() == report and cache.generations == 2
    finally:
        cache.disable()
    blocks = len(transformer_blocks(pipe.transformer))
    assert report["schedule"]["mask"] == MASK and report["schedule"]["computed_steps"] == sum(MASK)
    assert report["calls"] == report["steps"] == STEPS and report["blocks"] == blocks
    assert report["block_calls"] == STEPS * blocks
    assert report["computed_block_calls"] == expected_block_calls(family, name, blocks)
    assert report["steps_all_blocks_computed"] == [s for s, computed in enumerate(MASK) if computed]
    assert report["computed_steps"] == sum(MASK)
    assert torch.equal(first, second)  # each generation starts afresh
    assert torch.isfinite(first).all() and not torch.equal(first, plain)
    assert hook_state(pipe) == before
    assert torch.equal(generate(pipe, family), plain)
    cache.disable()  # a second time: nothing


@pytest.mark.parametrize("family, name", [("sd3", "cache-dit"), ("flux", "taylorseer"), ("pixart", "fbcache")])
def test_sdtm_under_the_cache_records_the_skipped_blocks(family, name):
    pipe = make_pipeline(family)
    plain = make_pipeline(family)
    apply_SDTM(plain, **MERGING)
    cache = apply_cache(name, pipe, STEPS)
    apply_SDTM(pipe, **MERGING)
    try:
        out = generate(pipe, family)
        report = cache.report()
        records = sdtm_state(pipe).records
        counts = caches.sdtm_record_counts(pipe.transformer)
    finally:
        cache.disable()
    assert counts["skipped"] == report["block_calls"] - report["computed_block_calls"] > 0
    assert counts["merged"] > 0 and sum(counts.values()) == len(records) == report["block_calls"]
    assert torch.isfinite(out).all()
    # Without the cache, SDTM's pipeline computes every block.
    uncached = apply_cache("none", plain, STEPS)
    generate(plain, family)
    done = uncached.report()
    uncached.disable()
    assert done["computed_block_calls"] == done["block_calls"] and done["computed_steps"] == STEPS
    assert caches.sdtm_record_counts(plain.transformer)["skipped"] == 0
    remove_SDTM(pipe)
    remove_SDTM(plain)


def test_bad_cache_names_and_families_are_refused_in_one_line():
    with pytest.raises(ValueError, match="--cache fbcache does not run on sd3") as error:
        caches.check_cache("fbcache", "sd3")
    assert "use --cache cache-dit or taylorseer" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--cache must be one of none, fbcache, taylorseer, cache-dit"):
        caches.check_cache("magcache", "flux")
    pipe = make_pipeline("sd3")
    with pytest.raises(ValueError, match="does not run on sd3"):
        apply_cache("fbcache", pipe, STEPS)
    assert getattr(pipe.transformer, "_diffusers_hook", None) is None and not pipe.transformer._forward_pre_hooks


def test_a_generation_of_another_length_is_refused():
    pipe = make_pipeline("flux")
    cache = apply_cache("taylorseer", pipe, STEPS + 1)
    try:
        with pytest.raises(ValueError, match="set up for 7 steps; this generation has 6"):
            generate(pipe, "flux")
    finally:
        cache.disable()


def test_missing_cache_dit_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit raises ImportError
    with pytest.raises(ValueError) as error:
        caches.check_cache("cache-dit", "sd3")
    assert str(error.value) == CACHE_DIT_MISSING == "cache-dit is not installed: pip install -e .[cache]"
    for argv in (["bench", "e2e", "--cache", "cache-dit"], ["demo", "--cache", "cache-dit"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"sdtm {argv[0]}: {CACHE_DIT_MISSING}\n"


TINY_BENCH = ["--rounds", "2", "--steps", "4", "--grid", "12", "--layers", "1", "--heads", "1", "--threads", "1",
              "--backends", "torch"]


@pytest.mark.parametrize("model, name, layers", [("sd3", "cache-dit", "2"), ("flux", "taylorseer", "1")])
def test_bench_e2e_cache_reports_four_variants(capsys, model, name, layers):
    argv = ["bench", "e2e", "--model", model, "--cache", name, "--json", *TINY_BENCH]
    argv[argv.index("--layers") + 1] = layers
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # --threads holds while timing only
    result = json.loads(capsys.readouterr().out)
    assert result["machine"]["torch_threads"] == 1
    variants = ["unmerged", "cache", "sdtm", "both"]
    assert list(result["seconds"]) == variants and all(result["seconds"][v] > 0 for v in variants)
    assert all(len(result["round_seconds"][v]) == 2 for v in variants)
    assert set(result["speedup"]) == {"cache", "sdtm", "both"}
    assert result["stacking_efficiency"] == pytest.approx(
        result["speedup"]["both"] / (result["speedup"]["cache"] * result["speedup"]["sdtm"]))
    assert len(result["stacking_efficiency_per_round"]) == 2
    assert result["cache"] == name and result["model"] == model and result["backend"] == "torch"
    assert result["schedule"]["mask"] == steps_mask(4) == [1, 1, 0, 1]
    computed = result["computed"]
    blocks = result["transformer"]["blocks"]
    for variant in ("unmerged", "sdtm"):
        assert computed[variant]["computed_block_calls"] == computed[variant]["block_calls"] == 4 * blocks
    for variant in ("cache", "both"):
        assert computed[variant]["steps_all_blocks_computed"] == [0, 1, 3]
        assert computed[variant]["computed_block_calls"] < 4 * blocks
    records = result["sdtm_records"]
    assert records["sdtm"]["skipped"] == 0 and records["sdtm"]["merged"] > 0
    assert records["both"]["skipped"] == 4 * blocks - computed["both"]["computed_block_calls"]
    assert set(result["relative_change"]) == {"cache", "sdtm", "both"}
    assert result["transformer"]["grid"] == [12, 12] and result["transformer"]["steps"] == 4


def test_bench_e2e_cache_text_and_option_checks(capsys):
    assert main(["bench", "e2e", "--cache", "none", *TINY_BENCH[:-2]]) == 0
    text = capsys.readouterr().out
    assert "stacking efficiency speedup(both) / (speedup(cache) x speedup(sdtm)):" in text
    assert "cache none: no cache" in text and "both" in text
    for argv, message in (
        (["bench", "e2e", "--cache", "fbcache"], "--cache fbcache does not run on sd3"),
        (["bench", "block", "--cache", "taylorseer"], "--cache: an option of `sdtm bench e2e` only"),
        (["bench", "e2e", "--cache", "taylorseer", "--backends", "torch", "cpp"], "one --backends value"),
        (["bench", "e2e", "--cache", "taylorseer", "--switch-step", "3"], "--switch-step: options of `sdtm bench host`"),
        (["bench", "e2e", "--grid", "12"], "also of `sdtm bench e2e --cache`"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, (argv, err)


def test_demo_cache_runs_the_four_variants(tmp_path):
    from sdtm.cli.demo import run_demo

    lines = []
    result = run_demo(size=24, steps=4, repeats=1, backend="torch", out=str(tmp_path), print_fn=lines.append,
                      model="flux", cache="fbcache")
    text = "\n".join(lines)
    assert "stacking efficiency" in text and "FirstBlockCache" in text
    assert set(result["seconds"]) == {"unmerged", "cache", "sdtm", "both"}
    assert result["stacking_efficiency"] == pytest.approx(
        result["speedup"]["both"] / (result["speedup"]["cache"] * result["speedup"]["sdtm"]))
    assert result["computed"]["cache"]["steps_all_blocks_computed"] == [0, 1, 3]
    assert result["sdtm_records"]["both"]["skipped"] > 0
    assert (tmp_path / "sdtm_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_cache_option(capsys, tmp_path):
    assert main(["demo", "--model", "sd3", "--cache", "fbcache"]) == 2
    assert "does not run on sd3" in capsys.readouterr().err
    assert main(["demo", "--model", "pixart", "--cache", "cache-dit", "--size", "24", "--steps", "3", "--repeats", "1",
                 "--backend", "torch", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cache cache-dit: cache-dit DBCache" in out and "stacking efficiency" in out


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> str:
    from tiny_full_pipeline import save_tiny_full_pipeline

    return save_tiny_full_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "model")


def test_generate_with_a_cache_records_it(sd3_folder, tmp_path, monkeypatch):
    from sdtm.cli import generate

    out = tmp_path / "out"
    argv = ["generate", "--model", sd3_folder, "--prompt", "a red cat", "--out", str(out), "--steps", "3",
            "--height", "32", "--width", "32"]
    assert main([*argv, "--cache", "cache-dit"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["cache"] == "cache-dit" and manifest["settings"]["sdtm"] is not None
    assert (out / "00000.png").is_file()
    plain = tmp_path / "plain"
    assert main([*argv[:6], str(plain), *argv[7:], "--no-sdtm"]) == 0
    assert json.loads((plain / "manifest.json").read_text())["settings"]["cache"] is None

    def refuse(job):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(generate, "load_pipeline", refuse)
    assert main([*argv[:6], str(tmp_path / "x"), *argv[7:], "--cache", "fbcache"]) == 2


def test_generate_applies_the_cache_to_the_pipeline(sd3_folder, tmp_path, monkeypatch):
    """The loaded pipeline carries the step cache, which computes its schedule during the generation."""
    from sdtm.cli import generate

    loaded = {}
    original = generate.load_pipeline

    def load(job):
        loaded["pipe"] = original(job)
        return loaded["pipe"]

    monkeypatch.setattr(generate, "load_pipeline", load)
    assert main(["generate", "--model", sd3_folder, "--prompt", "a dog", "--out", str(tmp_path / "o"), "--steps", "3",
                 "--height", "32", "--width", "32", "--cache", "taylorseer", "--no-sdtm"]) == 0
    report = loaded["pipe"]._sdtm_step_cache.report()
    assert report["cache"] == "taylorseer" and report["steps_all_blocks_computed"] == [0, 2]
    assert report["computed_block_calls"] < report["block_calls"]
