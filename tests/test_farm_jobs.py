"""`farm run`'s batch check without Ray: a line whose inputs an earlier line already had takes the
quick check (`farm.jobs._parse_line`); it must accept and refuse exactly what the full check does,
with the same one-line message. Each case is read twice: alone (the full check) and after good
lines with the same (or hash-equal: 1 and True) inputs (the quick check first)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from media_fixtures import write_photo, write_speech

from liveavatar_lite.errors import UserError
from liveavatar_lite.farm.jobs import FarmJob, JobDefaults, read_jobs

BASE = {"image": "photo.png", "audio": "speech.wav", "prompt": "a person talking", "out": "out/x.mp4",
        "size": "64*64"}
MAX_SEED = 2**63 - 1

# a line as BASE with some fields changed (`...`: left out) -> a part of its message
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "field typo": ({"image": ..., "imgae": "photo.png"}, "unknown field 'imgae'"),
    "extra field": ({"steps": 8}, "unknown field 'steps'"),
    "no out": ({"out": ...}, "missing 'out'"),
    "no image": ({"image": ...}, "missing 'image'"),
    "seed text": ({"seed": "7"}, "'seed' must be an integer"),
    "seed true": ({"seed": True}, "'seed' must be an integer, got True"),
    "seed float": ({"seed": 7.0}, "'seed' must be an integer, got 7.0"),
    "seed null": ({"seed": None}, "'seed' must be an integer, got None"),
    "seed negative": ({"seed": -1}, "'seed' must be from 0 to 2^63-1"),
    "seed 2^63": ({"seed": MAX_SEED + 1}, "'seed' must be from 0 to 2^63-1"),
    "clips true": ({"num_clip": True}, "'num_clip' must be an integer, got True"),
    "clips float": ({"num_clip": 1.0}, "'num_clip' must be an integer, got 1.0"),
    "clips zero": ({"num_clip": 0}, "'num_clip' must be a positive integer"),
    "image list": ({"image": ["photo.png"]}, "'image' must be a string"),
    "size object": ({"size": {"w": 64}}, "'size' must be a string"),
    "size number": ({"size": 64}, "'size' must be a string"),
    "size null": ({"size": None}, "'size' must be a string, got None"),
    "size bad": ({"size": "huge"}, "size"),
    "prompt empty": ({"prompt": " "}, "'prompt' is empty"),
    "prompt NUL": ({"prompt": "a\0b"}, "NUL"),
    "prompt number": ({"prompt": 1}, "'prompt' must be a string"),
    "out empty": ({"out": ""}, "'out' is not a path"),
    "out NUL": ({"out": "out/a\0.mp4"}, "'out' is not a path"),
    "out avi": ({"out": "out/x.avi"}, "--out out/x.avi must end in .mp4"),
    "out dir": ({"out": "out/"}, "must end in .mp4"),
    "out dotdot": ({"out": "out/.."}, "must end in .mp4"),
    "out under a file": ({"out": "photo.png/x.mp4"}, "--out"),
    "out number": ({"out": 5}, "'out' must be a string"),
    "no photo": ({"image": "nope.png"}, "image"),
    "photo is a dir": ({"image": "out"}, "is not a file"),
}
# lines that are not a job object
BAD_TEXT = {
    "cut short": ('{"image": "photo.png"', "not JSON"),
    "trailing": (json.dumps(BASE) + " 1", "not JSON (Extra data"),
    "a list": ("[1, 2]", "expected a JSON object"),
    "a string": ('"photo.png"', "expected a JSON object"),
    "null": ("null", "expected a JSON object"),
    "deep": ('{"image": ' + "[" * 9 + "]" * 9 + "}", "nested too deeply"),
}
# good lines, not all like BASE
GOOD = {
    "base": {},
    "clips null": {"num_clip": None},
    "clips one": {"num_clip": 1},
    "clips many": {"num_clip": 10**6},
    "seed zero": {"seed": 0},
    "seed max": {"seed": MAX_SEED},
    "default size and seed": {"size": ...},
    "dot out": {"out": "./x.mp4"},
    "dotdot out": {"out": "out/../y.mp4"},
    "upper suffix": {"out": "out/Z.MP4"},
    "dot image": {"image": "./photo.png", "out": "sub/dir/x.mp4"},
}


def _line(changes: dict[str, Any]) -> str:
    """BASE with `changes` as one JSON line; a field changed to `...` is left out."""
    return json.dumps({k: v for k, v in {**BASE, **changes}.items() if v is not ...})


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    write_photo(root / "photo.png")
    write_speech(root / "speech.wav", 1.0)
    (root / "out").mkdir()
    return root


def _read(root: Path, *lines: str) -> list[FarmJob]:
    (root / "jobs.jsonl").write_text("".join(line + "\n" for line in lines))
    return list(read_jobs(root / "jobs.jsonl", JobDefaults()))


def _refusal(root: Path, *lines: str) -> str:
    """The message of a batch whose last line is bad, without its 'file:line: ' prefix."""
    with pytest.raises(UserError) as e:
        _read(root, *lines)
    prefix = f"{root / 'jobs.jsonl'}:{len(lines)}: "
    assert str(e.value).startswith(prefix) and "\n" not in str(e.value), str(e.value)
    return str(e.value)[len(prefix):]


@pytest.mark.parametrize("name", sorted(BAD) + sorted(BAD_TEXT))
def test_quick_and_full_check_refuse_alike(root: Path, name: str) -> None:
    if name in BAD:
        changes, part = BAD[name]
        line = _line(changes)
    else:
        line, part = BAD_TEXT[name]
    alone = _refusal(root, line)
    assert part in alone, alone
    assert _refusal(root, *_seen(), line) == alone


def _seen() -> list[str]:
    """Every GOOD line with its own out: after them, each input combination of GOOD is one seen before."""
    return [_line(dict(changes, out=f"seen/{i}.mp4")) for i, changes in enumerate(GOOD.values())]


@pytest.mark.parametrize("name", sorted(GOOD))
def test_quick_and_full_check_accept_alike(root: Path, name: str) -> None:
    doc = json.loads(_line(GOOD[name]))
    [alone] = _read(root, json.dumps(doc))
    *_, again = _read(root, *_seen(), json.dumps(doc))
    assert dataclasses.replace(again, line=1) == alone
    assert again.out == (root / doc["out"]).resolve() and again.image == root / "photo.png"
    assert (alone.clips, alone.seed, alone.size) == (1, doc.get("seed", 42), doc.get("size", "704*384"))


def test_jobs_read_as_a_sequence(root: Path) -> None:
    """`read_jobs` keeps rows; what it returns reads like a list of FarmJobs, in line order."""
    (root / "jobs.jsonl").write_text("# three\n" + "".join(_line({"out": f"out/{i}.mp4", "seed": i}) + "\n"
                                                          for i in range(3)))
    jobs = read_jobs(root / "jobs.jsonl", JobDefaults())
    listed = list(jobs)
    assert len(jobs) == 3 and [j.line for j in listed] == [2, 3, 4] and [j.seed for j in listed] == [0, 1, 2]
    assert jobs[-1] == listed[-1] and jobs[0:2] == listed[0:2] and jobs[::-1] == listed[::-1]
    assert all(isinstance(j, FarmJob) and j.out == root.resolve() / "out" / f"{j.seed}.mp4" for j in jobs)
