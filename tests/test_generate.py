"""``sdtm generate`` end to end on a complete tiny SD3 pipeline saved to disk (text encoders included)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdtm import generate
from sdtm.prompts import load_prompts, safe_file_stems
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
    assert manifest(out)["images"] == second["images"]
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
               "-m", "sdtm.generate", "--model", model, "--prompts", prompts, "--out", str(out), *FAST, "--device",
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


@pytest.mark.parametrize("case", ["no-model", "not-a-pipeline", "no-prompt-file", "empty-prompt-file",
                                  "blank-txt", "bad-json", "bad-entry", "extension", "both", "neither",
                                  "size", "too-large", "sdtm-setting", "out-is-file", "device"])
def test_bad_inputs_exit_2_with_one_line(model, tmp_path, capsys, case):
    empty = write(tmp_path / "empty.json", "[]")
    good = write(tmp_path / "p.txt", "a cat\n")
    argv = {
        "no-model": ["--model", str(tmp_path / "missing"), "--prompts", good],
        "not-a-pipeline": ["--model", str(tmp_path), "--prompts", good],
        "no-prompt-file": ["--model", model, "--prompts", str(tmp_path / "missing.txt")],
        "empty-prompt-file": ["--model", model, "--prompts", empty],
        "blank-txt": ["--model", model, "--prompts", write(tmp_path / "blank.txt", "\n  \n")],
        "bad-json": ["--model", model, "--prompts", write(tmp_path / "bad.jsonl", '{"caption": "a"}\n{oops\n')],
        "bad-entry": ["--model", model, "--prompts", write(tmp_path / "entry.json", '[{"image_id": 1}]')],
        "extension": ["--model", model, "--prompts", write(tmp_path / "p.csv", "a cat\n")],
        "both": ["--model", model, "--prompts", good, "--prompt", "a cat"],
        "neither": ["--model", model],
        "size": ["--model", model, "--prompts", good, "--height", "33"],
        "too-large": ["--model", model, "--prompts", good, "--height", "128"],
        "sdtm-setting": ["--model", model, "--prompts", good, "--ratio", "0.9", "--deviation", "0.2"],
        "out-is-file": ["--model", model, "--prompts", good],
        "device": ["--model", model, "--prompts", good, "--device", "nonsense"],
    }[case]
    out = tmp_path / "out"
    if case == "out-is-file":
        out.write_text("")
    size = [] if case in ("size", "too-large") else ["--height", str(SIZE), "--width", str(SIZE)]
    capsys.readouterr()
    assert cli(["generate", *argv, "--out", str(out), "--steps", "2", *size]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtm generate: ") and err.endswith("\n") and err.count("\n") == 1, err
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
