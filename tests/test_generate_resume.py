"""``sdtm generate`` resuming into a folder that already holds images: nothing may be lost or mislabelled."""

from __future__ import annotations

import json

import pytest

from sdtm.cli import generate
from test_generate import FAST, PROMPTS, cli, manifest, only_files, refuse_to_load, write
from tiny_full_pipeline import save_tiny_full_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_tiny_full_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "model")


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_line(err: str) -> str:
    assert err.startswith("sdtm generate: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("change", ["prepend", "seed", "single-prompt", "moved-id"])
def test_images_of_other_prompts_or_seeds_are_refused_before_loading(model, tmp_path, capsys, monkeypatch,
                                                                      change):
    out = tmp_path / "out"
    if change == "single-prompt":
        before, after = ["--prompt", PROMPTS[0]], ["--prompt", PROMPTS[1]]
    elif change == "moved-id":  # same ids, hence the same files, but every prompt one place later
        entries = [{"id": "cat", "caption": PROMPTS[0]}, {"id": "dog", "caption": PROMPTS[1]}]
        before = ["--prompts", write(tmp_path / "a.json", json.dumps(entries))]
        after = ["--prompts", write(tmp_path / "b.json", json.dumps([{"id": "new", "caption": PROMPTS[2]}, *entries]))]
    else:
        before = ["--prompts", write(tmp_path / "a.txt", "\n".join(PROMPTS[:2]))]
        after = (["--prompts", write(tmp_path / "b.txt", "\n".join([PROMPTS[2], *PROMPTS[:2]]))] if change == "prepend"
                 else [*before, "--seed", "5"])
    assert cli(["generate", "--model", model, *before, "--out", str(out), *FAST]) == 0
    files = snapshot(out)
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    capsys.readouterr()
    assert cli(["generate", "--model", model, *after, "--out", str(out), *FAST]) == 2
    err = one_line(capsys.readouterr().err)
    first = {"prepend": "00000.png", "seed": "00000.png", "single-prompt": "00000.png", "moved-id": "cat.png"}[change]
    count = 1 if change == "single-prompt" else 2
    assert str(out / first) in err and f"; {count} existing image(s) in {out} do not match" in err, err
    assert "use a new --out or delete those images" in err
    if change == "prepend":
        assert f"made from prompt {PROMPTS[0]!r} (seed 0) but now stands for prompt {PROMPTS[2]!r} (seed 0)" in err
    if change == "seed":
        assert "(seed 0) but now stands for" in err and "(seed 5)" in err
    assert snapshot(out) == files  # nothing written, nothing removed


def test_long_prompts_are_shortened_in_the_message(model, tmp_path, capsys):
    out = tmp_path / "out"
    long = "a photo of a cat " * 10
    assert cli(["generate", "--model", model, "--prompt", long, "--out", str(out), *FAST, "--steps", "1"]) == 0
    capsys.readouterr()
    assert cli(["generate", "--model", model, "--prompt", "a dog", "--out", str(out), *FAST]) == 2
    err = one_line(capsys.readouterr().err)
    assert repr(long[:37] + "...") in err and long not in err


def test_image_without_a_record_is_kept_and_records_follow_the_prompt_list(model, tmp_path):
    out = tmp_path / "out"
    first = [{"id": "x/1", "caption": PROMPTS[0]}, {"id": 2, "caption": PROMPTS[1]}]
    assert cli(["generate", "--model", model, "--prompts", write(tmp_path / "a.json", json.dumps(first)),
                "--out", str(out), *FAST]) == 0
    (out / "2.png").rename(out / "3.png")  # no record names 3.png
    old = manifest(out)["images"][0]
    # x_1.png keeps its image (same prompt, same seed) under the new id that maps to the same file name.
    second = [{"id": "x_1", "caption": PROMPTS[0]}, {"id": 3, "caption": PROMPTS[2]}]
    assert cli(["generate", "--model", model, "--prompts", write(tmp_path / "b.json", json.dumps(second)),
                "--out", str(out), *FAST]) == 0
    images = manifest(out)["images"]
    assert images[0] == dict(old, id="x_1")
    assert images[1] == {"index": 1, "id": "3", "prompt": PROMPTS[2], "seed": 1, "file": "3.png", "seconds": None,
                         "macs": None}


def test_records_of_images_outside_the_prompt_list_are_kept_and_checked(model, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = write(tmp_path / "p.txt", "\n".join(PROMPTS))
    assert cli(["generate", "--model", model, "--prompts", prompts, "--out", str(out), *FAST]) == 0
    third = manifest(out)["images"][2]
    (out / "00001.png").unlink()
    assert cli(["generate", "--model", model, "--prompts", write(tmp_path / "q.txt", PROMPTS[0]), "--out", str(out),
                *FAST]) == 0
    data = manifest(out)
    assert [r["file"] for r in data["images"]] == ["00000.png"]
    assert data["other_images"] == [{k: v for k, v in third.items() if k != "index"}]  # 00001.png is gone
    capsys.readouterr()
    other = write(tmp_path / "r.txt", "\n".join([PROMPTS[0], "a dog 1", "a dog 2"]))
    assert cli(["generate", "--model", model, "--prompts", other, "--out", str(out), *FAST]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{out / '00002.png'} was made from prompt {PROMPTS[2]!r}" in err and "; 1 existing image(s)" in err


def test_kept_images_made_with_other_settings_carry_them(model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--model", model, "--prompts", write(tmp_path / "p.txt", "\n".join(PROMPTS[:2])),
            "--out", str(out), *FAST]
    assert cli(argv) == 0
    (out / "00001.png").unlink()
    capsys.readouterr()
    assert cli([*argv, "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 existing image(s)" in err and "(steps 3 -> 2)" in err, err
    data = manifest(out)
    assert data["settings"]["steps"] == 2
    assert data["images"][0]["settings"]["steps"] == 3 and "settings" not in data["images"][1]
    # Back to the first settings: the kept image needs no settings of its own, the other one does.
    (out / "00000.png").unlink()
    assert cli(argv) == 0
    images = manifest(out)["images"]
    assert "settings" not in images[0] and images[1]["settings"]["steps"] == 2


BAD_MANIFESTS = {  # content: what the message says
    "file-list": ({"images": [{"file": ["a"]}]}, "images[0] {\"file\": [\"a\"]} needs a string 'file', got a list"),
    "not-object": ({"images": [3]}, "images[0] 3 is not an object"),
    "no-prompt": ({"images": [{"file": "00000.png"}]}, "needs a string 'prompt', got nothing"),
    "seed-string": ({"images": [{"file": "00000.png", "prompt": "a", "seed": "0"}]},
                    "needs an integer 'seed', got a string"),
    "index-bool": ({"images": [{"file": "00000.png", "prompt": "a", "index": True}]},
                   "needs an integer 'index', got a boolean"),
    "seconds-string": ({"images": [{"file": "00000.png", "prompt": "a", "seconds": "1"}]},
                       "needs a number or null as 'seconds'"),
    "file-path": ({"images": [{"file": "../00000.png", "prompt": "a"}]}, "not a plain file name"),
    "settings-list": ({"images": [{"file": "00000.png", "prompt": "a", "settings": []}]},
                      "needs an object as 'settings'"),
    "twice": ({"images": [{"file": "00000.png", "prompt": "a"}],
               "other_images": [{"file": "00000.png", "prompt": "b"}]},
              "other_images[0] {\"file\": \"00000.png\", \"prompt\": \"b\"} lists '00000.png' a second time"),
    "images-object": ({"images": {}}, "('images' is not a list)"),
    "other-images-number": ({"other_images": 1}, "('other_images' is not a list)"),
    "settings-number": ({"settings": 1}, "('settings' is not an object)"),
    "nan": ('{"images": [{"file": "00000.png", "prompt": "a", "seconds": NaN}]}', "NaN is not standard JSON"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_exits_2_before_loading(model, tmp_path, capsys, monkeypatch, case):
    content, problem = BAD_MANIFESTS[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"")
    path = out / "manifest.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    capsys.readouterr()
    assert cli(["generate", "--model", model, "--prompt", "a", "--out", str(out), *FAST]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"sdtm generate: {path}") and problem in err, err
    assert "move it away" in err or "move the manifest away" in err


def test_png_name_taken_by_a_folder_is_refused(model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "00000.png").mkdir(parents=True)
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    capsys.readouterr()
    assert cli(["generate", "--model", model, "--prompt", "a cat", "--out", str(out), *FAST]) == 2
    expected = f"sdtm generate: {out / '00000.png'} exists and is not a file; move it away.\n"
    assert one_line(capsys.readouterr().err) == expected
    assert only_files(out) == ["00000.png"]
