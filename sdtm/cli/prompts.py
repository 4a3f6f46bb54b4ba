"""Prompt lists for ``sdtm generate``: reading .txt / .json / .jsonl files and turning ids into safe,
unique file names.

Formats (UTF-8, a leading byte order mark is ignored):

- ``.txt``: one prompt per non-empty line; ids ``00000``, ``00001``, ... (position in the list).
- ``.json``: a list of strings or of objects, or a COCO captions file (an object whose ``annotations``
  is such a list).
- ``.jsonl``: one string or object per non-empty line.

An object holds the text under ``caption``, ``prompt`` or ``text`` (the first present) and optionally an
id under ``image_id`` (COCO) or ``id``; without one the id is the position in the list. Ids may be any
string or integer; file names are derived from them with ``safe_file_stems``, so ``../../etc/x`` becomes
``_.._etc_x`` and nothing can point outside the output folder. Texts and ids must be writable as UTF-8
(the manifest records them): a JSON escape of a lone surrogate such as ``"\\ud800"`` is refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

EXTENSIONS = (".txt", ".json", ".jsonl")
MAX_STEM_LENGTH = 100
_TEXT_KEYS = ("caption", "prompt", "text")
_ID_KEYS = ("image_id", "id")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``id``: as given in the file (or the zero-padded position); ``text``: the prompt;
    ``stem``: the file name without extension, safe and unique within its list."""

    id: str
    text: str
    stem: str


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a prompt file (format chosen by its extension, see the module docstring).

    Raises ValueError naming the file and the problem when it cannot be read, is not UTF-8, is malformed,
    has an unknown extension or holds no prompts.
    """
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in EXTENSIONS:
        raise ValueError(f"prompt file {path!r} has an unknown extension {extension or '(none)'!r}; "
                         f"use one of {', '.join(EXTENSIONS)}.")
    content = _read_text(path)
    if extension == ".txt":
        entries: list[tuple[str | None, str]] = [(None, line.strip()) for line in content.splitlines() if line.strip()]
    elif extension == ".json":
        entries = _json_entries(path, content)
    else:
        entries = _jsonl_entries(path, content)
    if not entries:
        raise ValueError(f"prompt file {path!r} holds no prompts.")
    ids = [given if given is not None else f"{index:05d}" for index, (given, _) in enumerate(entries)]
    stems = safe_file_stems(ids)
    return [Prompt(id=i, text=text, stem=stem) for i, (_, text), stem in zip(ids, entries, stems)]


def single_prompt(text: str) -> list[Prompt]:
    """The list for ``--prompt TEXT``: one prompt with id ``00000``."""
    if not text.strip():
        raise ValueError("--prompt is empty.")
    if not _is_utf8(text):
        raise ValueError("--prompt is not valid UTF-8 text (the manifest records it); check its encoding.")
    return [Prompt(id="00000", text=text, stem="00000")]


def safe_file_stem(identifier: str) -> str:
    """``identifier`` as a file name: characters outside [A-Za-z0-9._-] become ``_``, leading dots are
    dropped, at most MAX_STEM_LENGTH characters, never empty (``_``)."""
    stem = _UNSAFE.sub("_", identifier).lstrip(".")[:MAX_STEM_LENGTH]
    return stem or "_"


def safe_file_stems(identifiers: list[str]) -> list[str]:
    """``safe_file_stem`` of each id, made unique in order: a stem already taken (compared without case,
    for case-insensitive file systems) gets ``-1``, ``-2``, ... appended, the first free one."""
    taken: set[str] = set()
    stems = []
    for identifier in identifiers:
        base = safe_file_stem(identifier)
        stem, suffix = base, 0
        while stem.lower() in taken:
            suffix += 1
            stem = f"{base}-{suffix}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"prompt file {path!r} does not exist.") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text ({error.reason} at byte {error.start}).") from None
    except OSError as error:
        raise ValueError(f"cannot read prompt file {path!r}: {error.strerror or error}.") from None


def _json_entries(path: str, content: str) -> list[tuple[str | None, str]]:
    data = _parse_json(path, content, where="")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise ValueError(f"prompt file {path!r} must hold a JSON list of strings or objects "
                         "(or a COCO captions object with 'annotations').")
    return [_entry(path, f"entry {index}", item) for index, item in enumerate(data)]


def _jsonl_entries(path: str, content: str) -> list[tuple[str | None, str]]:
    entries = []
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            where = f"line {number}"
            entries.append(_entry(path, where, _parse_json(path, line, where=f" {where}")))
    return entries


def _parse_json(path: str, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"prompt file {path!r}{where} is not valid JSON: {error.msg} "
                         f"(line {error.lineno}, column {error.colno}).") from None


def _entry(path: str, where: str, item: Any) -> tuple[str | None, str]:
    """(id or None, text) of one list item: a string, or an object with a text key and maybe an id."""
    if isinstance(item, str):
        text, identifier = item, None
    elif isinstance(item, dict):
        key = next((k for k in _TEXT_KEYS if k in item), None)
        if key is None:
            keys = ", ".join(repr(k) for k in _TEXT_KEYS)
            raise ValueError(f"prompt file {path!r}, {where}: none of the keys {keys}.")
        text = item[key]
        if not isinstance(text, str):
            raise ValueError(f"prompt file {path!r}, {where}: {key!r} must be a string, got {type(text).__name__}.")
        identifier = _identifier(path, where, item)
    else:
        raise ValueError(f"prompt file {path!r}, {where}: expected a string or an object, "
                         f"got {type(item).__name__}.")
    if not text.strip():
        raise ValueError(f"prompt file {path!r}, {where}: the prompt is empty.")
    for name, value in (("the prompt", text), ("the id", identifier)):
        if value is not None and not _is_utf8(value):
            raise ValueError(f"prompt file {path!r}, {where}: {name} holds a lone surrogate (a JSON escape such "
                             "as \\ud800 without its pair), which cannot be written as UTF-8.")
    return identifier, text.strip()


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _identifier(path: str, where: str, item: dict) -> str | None:
    key = next((k for k in _ID_KEYS if k in item), None)
    if key is None:
        return None
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"prompt file {path!r}, {where}: {key!r} must be a string or an integer, "
                         f"got {type(value).__name__}.")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"prompt file {path!r}, {where}: {key!r} is empty.")
    return str(value)
