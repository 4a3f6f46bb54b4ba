"""``sdtm generate`` end to end on a complete tiny SD3 pipeline saved to disk (text encoders included)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdtm.cli import generate
from sdtm.cli.prompts import load_prompts, safe_file_stems
from tiny_full_pipeline import build_tiny_full_pipeline, save_tiny_full_pipeline, tiny_clip_tokenizer, tiny_t5_tokenizer

SIZE = 32
FAST = ["--steps", "3", "--height", str(SIZE), "--width", str(SIZE), "--guidance", "4.0"]
PROMPTS = ["a photo of a cat", "a red dog", "blue cat 7"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(argv: list[str]) -> int:
    """The command line as ``sdtm generate ...`` runs it."""
    parser = argparse.ArgumentParser(prog="sdtm")
    generate.add_parser(parser.add_subparsers(dest="command", required=True))
    return generate.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_tiny_full_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "model")


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def only_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refuse_to_load(job):
    raise AssertionError("the model must not be loaded")


def run_out_of_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def unwritable_system_folder() -> str | None:
    """A folder that even root cannot create files in, or None."""
    for folder in ("/proc/self", "/sys", "/proc"):
        probe = os.path.join(folder, ".sdtm-probe.tmp")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError:
            if os.path.isdir(folder):
                return folder
        else:
            os.remove(probe)
    return None


def test_tokenizers_and_pipeline_round_trip(model):
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    for tokenizer in (tiny_clip_tokenizer(), tiny_t5_tokenizer()):
        ids = tokenizer(PROMPTS, padding="max_length", max_length=12, truncation=True).input_ids
        assert len({tuple(i) for i in ids}) == len(PROMPTS)  # the prompts are told apart
        assert all(tokenizer.unk_token not in tokenizer.tokenize(text) for text in PROMPTS)
    built = build_tiny_full_pipeline()
    loaded = StableDiffusion3Pipeline.from_pretrained(model, local_files_only=True)
    assert isinstance(loaded.tokenizer, CLIPTokenizer) and isinstance(loaded.tokenizer_3, T5TokenizerFast)
    for a, b in ((built.tokenizer, loaded.tokenizer), (built.tokenizer_3, loaded.tokenizer_3)):
        assert a(PROMPTS).input_ids == b(PROMPTS).input_ids
    embeds = [p.encode_prompt(PROMPTS[0], None, None, device="cpu", do_classifier_free_guidance=False)
              for p in (built, loaded)]
    assert embeds[0][0].shape == (1, 16 + 256, 32) and embeds[0][2].shape == (1, 32)
    assert all((x == y).all() for x, y in zip(embeds[0], embeds[1]) if x is not None)


def test_txt_prompts_give_one_png_each_and_a_manifest(model, tmp_path):
    prompts = write(tmp_path / "p.txt", "\n".join([PROMPTS[0], "", PROMPTS[1], "   ", PROMPTS[2]]) + "\n")
    out = tmp_path / "out"
    assert cli(["generate", "--model", model, "--prompts", prompts, "--out", str(out), *FAST]) == 0
    assert only_files(out) == ["00000.png", "00001.png", "00002.png", "manifest.json"]
    data = manifest(out)
    assert [(r["id"], r["prompt"], r["seed"], r["file"]) for r in data["images"]] == [
        (f"{i:05d}", text, i, f"{i:05d}.png") for i, text in enumerate(PROMPTS)]
    assert all(r["seconds"] > 0 and r["macs"] is None for r in data["images"])
    settings = data["settings"]
    assert (settings["steps"], settings["height"], settings["width"], settings["guidance"]) == (3, SIZE, SIZE, 4.0)
    assert (settings["dtype"], settings["device"], settings["world_size"]) == ("float32", "cpu", 1)
    assert settings["model"] == os.path.abspath(model) and settings["sdtm"]["ratio"] == 0.3
    assert settings["pipeline"] == "StableDiffusion3Pipeline"
    assert settings["sdtm"]["switch_step"] == 20  # SD3's default, recorded as a number
    images = [pixels(out / f"{i:05d}.png") for i in range(3)]
    assert all(image.shape == (SIZE, SIZE, 3) for image in images)
    assert not np.array_equal(images[0], images[1])


def test_resume_regenerates_only_missing_images_identically(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", "\n".join(PROMPTS))
    out = tmp_path / "out"
    argv = ["generate", "--model", model, "--prompts", prompts, "--out", str(out), *FAST]
    assert cli(argv) == 0
    first = manifest(out)
    original = (out / "00001.png").read_bytes()
    kept = {name: (out / name).stat().st_mtime_ns for name in ("00000.png", "00002.png")}
    (out / "00001.png").unlink()
    (out / ".00001.png.0123456789ab.tmp").write_bytes(b"left by an interrupted run")
    assert cli(argv) == 0
    assert (out / "00001.png").read_bytes() == original
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    second = manifest(out)
    assert second["images"][0] == first["images"][0] and second["images"][2] == first["images"][2]
    assert second["images"][1]["file"] == "00001.png" and second["images"][1]["seed"] == 1
    capsys.readouterr()
    assert cli([*argv, "--ratio", "0.4"]) == 0  # nothing left to do: the model is not even loaded
    assert "sdtm.ratio 0.3 -> 0.4" in capsys.readouterr().err  # kept images were made with other settings
    third = manifest(out)
    assert third["settings"]["sdtm"]["ratio"] == 0.4
    # Each kept record says which settings its image was made with.
    assert all(record.pop("settings")["sdtm"]["ratio"] == 0.3 for record in third["images"])
    assert third["images"] == second["images"]
    assert only_files(out) == ["00000.png", "00001.png", "00002.png", "manifest.json"]


def test_seed_does_not_depend_on_batching(model, tmp_path):
    prompts = write(tmp_path / "p.txt", "\n".join(PROMPTS))
    single, batched = tmp_path / "single", tmp_path / "batched"
    base = ["generate", "--model", model, "--prompts", prompts, *FAST, "--no-sdtm"]
    assert cli([*base, "--out", str(single)]) == 0
    assert cli([*base, "--out", str(batched), "--batch-size", "2"]) == 0
    for i in range(3):
        difference = np.abs(pixels(single / f"{i:05d}.png").astype(int) - pixels(batched / f"{i:05d}.png"))
        assert difference.max() <= 1  # the same noise; batched matmuls may round differently


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_coco_ids_are_sanitised_and_unique_inside_out(model, tmp_path, kind):
    entries = [
        {"image_id": "../../evil", "caption": "a cat"},
        {"image_id": 42, "caption": "a dog"},
        {"image_id": 42, "caption": "a red dog"},
        {"id": ".hidden/..", "prompt": "blue"},
        {"text": "no id here"},
    ]
    if kind == "json":
        path = write(tmp_path / "p.json", json.dumps({"annotations": entries}))
    else:
        path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(e) for e in entries) + "\n\n")
    out = tmp_path / "sub" / "out"
    assert cli(["generate", "--model", model, "--prompts", path, "--out", str(out), *FAST, "--no-sdtm"]) == 0
    expected = ["00004.png", "42-1.png", "42.png", "_.._evil.png", "hidden_...png", "manifest.json"]
    assert only_files(out) == expected
    assert only_files(tmp_path) == ["p." + kind, "sub"] and only_files(tmp_path / "sub") == ["out"]
    assert [r["id"] for r in manifest(out)["images"]] == ["../../evil", "42", "42", ".hidden/..", "00004"]
    assert [r["file"] for r in manifest(out)["images"]] == ["_.._evil.png", "42.png", "42-1.png", "hidden_...png",
                                                            "00004.png"]


def test_file_stems_and_prompt_formats(tmp_path):
    assert safe_file_stems(["a", "a", "a-1", "A", "", "...", "x" * 300, "é/ü"]) == [
        "a", "a-1", "a-1-1", "A-2", "_", "_-1", "x" * 100, "___"]
    path = write(tmp_path / "p.json", json.dumps(["first", {"id": 7, "text": " second "}]))
    assert [(p.id, p.text, p.stem) for p in load_prompts(path)] == [("00000", "first", "00000"), ("7", "second", "7")]


def test_torchrun_two_processes_write_every_image_once(model, tmp_path):
    prompts = write(tmp_path / "p.txt", "\n".join(PROMPTS + ["a cat 2", "a dog 3"]))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "sdtm.cli.generate", "--model", model, "--prompts", prompts, "--out", str(out), *FAST, "--device",
               "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert only_files(out) == [f"{i:05d}.png" for i in range(5)] + ["manifest.json"]
    data = manifest(out)
    assert [r["index"] for r in data["images"]] == list(range(5))
    assert [r["seed"] for r in data["images"]] == list(range(5))
    assert data["settings"]["world_size"] == 2 and all(r["seconds"] > 0 for r in data["images"])
    # Same seed, same image as a single process (up to rounding differences between thread counts).
    single = tmp_path / "single"
    assert cli(["generate", "--model", model, "--prompts", prompts, "--out", str(single), *FAST]) == 0
    for i in range(5):
        difference = np.abs(pixels(out / f"{i:05d}.png").astype(int) - pixels(single / f"{i:05d}.png"))
        assert difference.max() <= 1


ONE_OF = "give exactly one of --prompt TEXT and --prompts FILE."
GUIDANCE = "--guidance must be a finite number >= 0 (values <= 1 switch guidance off), got "


@pytest.mark.parametrize("case", ["no-model", "not-a-pipeline", "no-prompt-file", "empty-prompt-file",
                                  "blank-txt", "bad-json", "bad-entry", "extension", "both", "neither",
                                  "size", "too-large", "sdtm-setting", "out-is-file", "device",
                                  "guidance-nan", "guidance-inf", "guidance-minus-inf", "guidance-negative",
                                  "sdtm-inf", "cuda-graphs-on-cpu", "no-sdtm-with-sdtm-setting", "no-sdtm-with-switch-step",
                                  "device-meta", "device-absent",
                                  "prompt-surrogate", "json-surrogate", "json-surrogate-id"])
def test_bad_inputs_exit_2_with_one_line(model, tmp_path, capsys, monkeypatch, case):
    """Each bad input exits 2 before loading the model, with one line that gives its own reason."""
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    empty = write(tmp_path / "empty.json", "[]")
    good = write(tmp_path / "p.txt", "a cat\n")
    argv, reason = {
        "no-model": (["--model", str(tmp_path / "missing"), "--prompts", good],
                     f"--model folder {str(tmp_path / 'missing')!r} does not exist."),
        "not-a-pipeline": (["--model", str(tmp_path), "--prompts", good],
                           "is not a diffusers pipeline folder (no model_index.json)."),
        "no-prompt-file": (["--model", model, "--prompts", str(tmp_path / "missing.txt")],
                           "missing.txt' does not exist."),
        "empty-prompt-file": (["--model", model, "--prompts", empty], "empty.json' holds no prompts."),
        "blank-txt": (["--model", model, "--prompts", write(tmp_path / "blank.txt", "\n  \n")],
                      "blank.txt' holds no prompts."),
        "bad-json": (["--model", model, "--prompts", write(tmp_path / "bad.jsonl", '{"caption": "a"}\n{oops\n')],
                     "bad.jsonl' line 2 is not valid JSON"),
        "bad-entry": (["--model", model, "--prompts", write(tmp_path / "entry.json", '[{"image_id": 1}]')],
                      "entry 0: none of the keys 'caption', 'prompt', 'text'."),
        "extension": (["--model", model, "--prompts", write(tmp_path / "p.csv", "a cat\n")],
                      "has an unknown extension '.csv'; use one of .txt, .json, .jsonl."),
        "both": (["--model", model, "--prompts", good, "--prompt", "a cat"], ONE_OF),
        "neither": (["--model", model], ONE_OF),
        "size": (["--model", model, "--prompts", good, "--height", "33"],
                 "positive multiples of 2 for this model (VAE factor 1 x patch 2), got 33x1024."),
        "too-large": (["--model", model, "--prompts", good, "--height", "128"],
                      "needs a 64x512 token grid but the model's positional table covers 32x32 tokens"),
        "sdtm-setting": (["--model", model, "--prompts", good, "--ratio", "0.9", "--deviation", "0.2"],
                         "ratio - deviation and ratio + deviation must lie in [0, 1]"),
        "out-is-file": (["--model", model, "--prompts", good], "out' exists and is not a folder."),
        "device": (["--model", model, "--prompts", good, "--device", "nonsense"],
                   "--device 'nonsense' is not a torch device"),
        "guidance-nan": (["--model", model, "--prompts", good, "--guidance", "nan"], GUIDANCE + "nan."),
        "guidance-inf": (["--model", model, "--prompts", good, "--guidance", "inf"], GUIDANCE + "inf."),
        "guidance-minus-inf": (["--model", model, "--prompts", good, "--guidance=-inf"], GUIDANCE + "-inf."),
        "guidance-negative": (["--model", model, "--prompts", good, "--guidance", "-3"], GUIDANCE + "-3.0."),
        "sdtm-inf": (["--model", model, "--prompts", good, "--a-s", "inf"], "--a-s must be a finite number, got inf."),
        "cuda-graphs-on-cpu": (["--model", model, "--prompts", good, "--device", "cpu", "--cuda-graphs"],
                               "--cuda-graphs needs a CUDA device, got --device cpu."),
        "no-sdtm-with-sdtm-setting": (["--model", model, "--prompts", good, "--no-sdtm", "--ratio", "0.5"],
                                      "--ratio has no effect with --no-sdtm"),
        # 20 is SD3's default switch step, but given explicitly it would still be ignored.
        "no-sdtm-with-switch-step": (["--model", model, "--prompts", good, "--no-sdtm", "--switch-step", "20"],
                                     "--switch-step has no effect with --no-sdtm"),
        "device-meta": (["--model", model, "--prompts", good, "--device", "meta"],
                        "--device 'meta': no such device is available"),
        "device-absent": (["--model", model, "--prompts", good, "--device", "xpu"],
                          "--device 'xpu': no such device is available"),
        # Undecodable bytes in argv.
        "prompt-surrogate": (["--model", model, "--prompt", "a \udcff cat"], "--prompt is not valid UTF-8 text"),
        "json-surrogate": (["--model", model, "--prompts", write(tmp_path / "s.json", '["a \\ud800 cat"]')],
                           "s.json', entry 0: the prompt holds a lone surrogate"),
        "json-surrogate-id": (["--model", model, "--prompts",
                               write(tmp_path / "s.jsonl", '{"id": "\\udfff", "caption": "a cat"}\n')],
                              "s.jsonl', line 1: the id holds a lone surrogate"),
    }[case]
    out = tmp_path / "out"
    if case == "out-is-file":
        out.write_text("")
    size = [] if case in ("size", "too-large") else ["--height", str(SIZE), "--width", str(SIZE)]
    capsys.readouterr()
    assert cli(["generate", *argv, "--out", str(out), "--steps", "2", *size]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtm generate: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert reason in err, err
    assert not out.is_dir() or not any(out.iterdir())


def test_sdtm_changes_images_and_ratio_zero_does_not(model, tmp_path):
    base = ["generate", "--model", model, "--prompt", PROMPTS[0], *FAST]
    runs = {"off": ["--no-sdtm"], "half": ["--ratio", "0.5"], "zero": ["--ratio", "0", "--deviation", "0"]}
    images = {}
    for name, extra in runs.items():
        assert cli([*base, "--out", str(tmp_path / name), *extra]) == 0
        images[name] = pixels(tmp_path / name / "00000.png")
        assert manifest(tmp_path / name)["images"][0]["id"] == "00000"
    assert manifest(tmp_path / "off")["settings"]["sdtm"] is None
    assert manifest(tmp_path / "half")["settings"]["sdtm"]["ratio"] == 0.5
    assert not np.array_equal(images["half"], images["off"])
    assert np.array_equal(images["zero"], images["off"])


@pytest.mark.parametrize("where", ["system-folder", "read-only-folder"])
def test_unwritable_out_exits_2_before_loading(model, tmp_path, capsys, monkeypatch, where):
    if where == "system-folder":
        out = unwritable_system_folder()
        if out is None:
            pytest.skip("no folder here refuses new files to this user")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a folder whatever its mode")
        out = str(tmp_path / "read-only")
        os.mkdir(out, 0o500)
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    capsys.readouterr()
    assert cli(["generate", "--model", model, "--prompt", "a cat", "--out", out, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdtm generate: cannot write to --out {out!r}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("target", ["00000.png", "manifest.json"])
def test_write_failure_during_the_run_exits_1_with_one_line(model, tmp_path, capsys, monkeypatch, target):
    out = tmp_path / "out"
    if target == "00000.png":
        monkeypatch.setattr(Image.Image, "save", run_out_of_space)
    else:
        replace = os.replace
        monkeypatch.setattr(os, "replace", lambda src, dst: run_out_of_space() if str(dst).endswith(target)
                            else replace(src, dst))
    capsys.readouterr()
    assert cli(["generate", "--model", model, "--prompt", "a cat", "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err  # loading progress bars, then one line
    assert err.endswith(f"\nsdtm generate: cannot write {out / target}: {os.strerror(errno.ENOSPC)}\n"), err
    assert err.count("sdtm generate: cannot") == 1 and "Traceback" not in err
    assert only_files(out) == ([] if target == "00000.png" else ["00000.png"])  # no temporary file left


def test_manifest_is_strict_json(model, tmp_path):
    parser = argparse.ArgumentParser()
    generate.configure_parser(parser)
    out = tmp_path / "out"
    job = generate.job_from_args(parser.parse_args(["--model", model, "--prompt", "a cat", "--out", str(out), *FAST]))
    with pytest.raises(ValueError, match="not JSON compliant"):
        generate.write_manifest(dataclasses.replace(job, guidance=float("nan")), {})
    assert only_files(out) == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_loads_every_component_in_it_and_generates(model, tmp_path, dtype):
    wanted = getattr(torch, dtype)
    parser = argparse.ArgumentParser()
    generate.configure_parser(parser)
    args = parser.parse_args(["--model", model, "--prompt", "a cat", "--out", str(tmp_path / "x"), *FAST,
                              "--dtype", dtype, "--no-sdtm"])
    pipe = generate.load_pipeline(generate.job_from_args(args))
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for key, tensor in [*component.named_parameters(), *component.named_buffers()]:
            if tensor.is_floating_point():
                # transformers keeps T5's feed-forward output in float32 under float16, on purpose.
                t5_wo = dtype == "float16" and name == "text_encoder_3" and ".wo." in key
                expected = torch.float32 if t5_wo else wanted
                assert tensor.dtype == expected, (name, key, tensor.dtype)
    for extra in (["--no-sdtm"], []):
        out = tmp_path / ("off" if extra else "sdtm")
        assert cli(["generate", "--model", model, "--prompts", write(tmp_path / "p.txt", "\n".join(PROMPTS[:2])),
                    "--out", str(out), *FAST, "--dtype", dtype, *extra]) == 0
        assert manifest(out)["settings"]["dtype"] == dtype
        images = [pixels(out / f"{i:05d}.png") for i in range(2)]
        assert all(image.std() > 0 for image in images) and not np.array_equal(images[0], images[1])


def test_cuda_index_is_refused_rather_than_ignored_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert generate.resolve_device("cuda", generate.Ranks(1, 2, 1)) == torch.device("cuda", 1)
    assert generate.resolve_device("cuda:1", generate.Ranks(1, 2, 1)) == torch.device("cuda", 1)
    assert generate.resolve_device("cuda:1", generate.Ranks()) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        generate.resolve_device("cuda:1", generate.Ranks(0, 2, 0))


@pytest.mark.parametrize("kind", ["txt", "json", "jsonl"])
def test_prompt_files_may_start_with_a_byte_order_mark(tmp_path, kind):
    content = {"txt": "a cat\nb dog\n", "json": json.dumps(["a cat", "b dog"]),
               "jsonl": '"a cat"\n"b dog"\n'}[kind]
    path = tmp_path / f"p.{kind}"
    path.write_text(content, encoding="utf-8-sig")
    assert [p.text for p in load_prompts(path)] == ["a cat", "b dog"]
