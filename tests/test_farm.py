"""The render farm on a local Ray cluster (`ray.init(num_cpus=2)`, no GPU) with two CPU actors on the tiny model.

One Ray start for the module. Every render is compared with the CLI's `generate` (clean_render:
3 clips of seed 7; 1 and 2 clips of seed 7 are its first 45 and 93 frames, clips being causal):

- `farm run` of 6 jobs: frames identical to `generate`; run again: nothing rendered, nothing touched;
- an actor SIGKILLed mid-job: the job resumes on the other actor from its checkpoint, identical frames;
- `serve --backend ray`: a job through the HTTP API on a Ray actor equals `generate`;
- bad batch files and flags: one line, a non-zero exit, nothing written (no Ray needed).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from media_fixtures import decoded_frames, write_speech
from render_helpers import PROMPT, SIZE, cli_command, generate_args, render_env
from serve_helpers import ServeProcess, job_data, job_files

from liveavatar_lite.cli import main as cli_main

ray = pytest.importorskip("ray", reason="the farm extra (pip install 'liveavatar-lite[farm]') is not installed")


def frame_hashes(path: Path) -> list[str]:
    return [hashlib.sha256(f.tobytes()).hexdigest()[:16] for f in decoded_frames(path)]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster of 2 CPUs for the module; its address, for drivers in other processes."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def seed8(tiny_artifact: Path, media: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Frame hashes of a 1-clip `generate` with seed 8 (the second reference beside clean_render)."""
    out = tmp_path_factory.mktemp("seed8") / "seed8.mp4"
    proc = subprocess.run(cli_command(*generate_args(tiny_artifact, media, out, "--num-clip", "1", seed=8)),
                          env=render_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return frame_hashes(out)


def _job(media: Path, out: str, seed: int, num_clip: int) -> dict:
    return {"image": str(media / "photo.png"), "audio": str(media / "speech.wav"), "prompt": PROMPT,
            "out": out, "size": SIZE, "seed": seed, "num_clip": num_clip}


def _farm(art: Path, jobs: Path, media: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["farm", "run", str(jobs), "--artifact", str(art), "--checkpoint-interval", "0",
            "--cache-dir", str(media / "cache"), *extra]
    return subprocess.run(cli_command(*args), env=render_env(), capture_output=True, text=True, timeout=900,
                          check=False)


def test_six_jobs_equal_generate_and_a_rerun_does_nothing(ray_address: str, tiny_artifact: Path, media: Path,
                                                          clean_render: dict, seed8: list[str],
                                                          tmp_path: Path) -> None:
    """6 jobs on 2 actors (a driver joining the cluster by address): frames identical to `generate`."""
    clean = frame_hashes(clean_render["out"])
    wanted = {"a.mp4": (7, 1, clean[:45]), "b.mp4": (8, 1, seed8), "c.mp4": (7, 2, clean[:93]),
              "d.mp4": (8, 1, seed8), "e.mp4": (7, 1, clean[:45]), "f.mp4": (7, 1, clean[:45])}
    jobs = tmp_path / "jobs.jsonl"
    lines = [json.dumps(_job(media, f"out/{name}", seed, n)) for name, (seed, n, _) in wanted.items()]
    jobs.write_text("# six jobs, outs relative to this file\n" + "\n".join(lines) + "\n\n")

    proc = _farm(tiny_artifact, jobs, media, "--ray-address", ray_address, "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 jobs: 6 rendered (0 resumed), 0 skipped, 0 failed" in proc.stdout
    assert "actor-0 ready" in proc.stderr and "actor-1 ready" in proc.stderr
    for name, (_, _, hashes) in wanted.items():
        assert frame_hashes(tmp_path / "out" / name) == hashes, name
    out_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out_files == sorted([*wanted, *(f".{n}.farm.json" for n in wanted)])  # no work dirs, no temp files
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}

    t0 = time.monotonic()
    again = _farm(tiny_artifact, jobs, media, "--ray-address", ray_address)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 jobs: 0 rendered (0 resumed), 6 skipped, 0 failed" in again.stdout
    assert "6 already finished, 0 to render" in again.stderr and "actor-" not in again.stderr  # no actor started
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps
    assert time.monotonic() - t0 < 60


def test_an_actor_killed_mid_job_resumes_on_the_other(ray_address: str, tiny_artifact: Path, media: Path,
                                                      clean_render: dict, tmp_path: Path) -> None:
    """SIGKILL the actor rendering a 2-clip job after its first checkpoint: the other actor resumes it
    from that checkpoint (shared storage), and the mp4 equals the uninterrupted `generate`."""
    from liveavatar_lite.farm.actor import ActorSpec
    from liveavatar_lite.farm.batch import run_batch
    from liveavatar_lite.farm.cluster import ClusterConfig
    from liveavatar_lite.farm.executor import RayExecutor
    from liveavatar_lite.farm.jobs import JobDefaults, plan_batch, read_jobs
    from liveavatar_lite.pipeline.render import ArtifactBackend
    from liveavatar_lite.pipeline.request import PipelineOptions
    from liveavatar_lite.pipeline.workdir import RenderWorkDir

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(_job(media, "long.mp4", 7, 2)) + "\n")
    options = PipelineOptions(tiny_artifact, cache_dir=media / "cache", progress=False)
    batch = read_jobs(jobs, JobDefaults())
    plan = plan_batch(batch, ArtifactBackend.open(options).identity(), jobs)
    executor = RayExecutor(ActorSpec(options, (64, 64), threads=1), ClusterConfig(workers=2))
    journal = RenderWorkDir.path_for(tmp_path / "long.mp4") / "journal.json"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            busy = [w for w in executor.status().get("workers", []) if w["task"] == "line-1"]
            try:
                checkpointed = json.loads(journal.read_text())["state_clips"] >= 1
            except (OSError, ValueError, KeyError):
                checkpointed = False
            if busy and checkpointed:
                os.kill(busy[0]["pid"], signal.SIGKILL)
                killed.append(busy[0]["pid"])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = run_batch(plan, executor, checkpoint_interval_s=0)
    killer.join(timeout=5)

    (outcome,) = summary.outcomes
    assert killed, "the job ended before its actor could be killed"
    assert outcome.state == "done", outcome.error
    assert outcome.deaths == 1 and outcome.resumed_clips >= 1  # resumed from the checkpoint, not from scratch
    first, second = outcome.actors
    assert f"pid {killed[0]} " in first and f"pid {killed[0]} " not in second  # finished on the other actor
    assert frame_hashes(tmp_path / "long.mp4") == frame_hashes(clean_render["out"])[:93]
    assert not journal.parent.exists()  # the work dir (with its checkpoint) is gone once the mp4 is complete


def test_serve_with_the_ray_backend_equals_generate(ray_address: str, tiny_artifact: Path, media: Path,
                                                    clean_render: dict, tmp_path: Path) -> None:
    """`serve --backend ray --ray-address ADDR`: the same queue and API, the job rendered by a Ray actor."""
    server = ServeProcess(tiny_artifact, tmp_path / "state", "--backend", "ray", "--ray-address", ray_address,
                          "--workers", "1", cache_dir=media / "cache")
    with server:
        ready = server.client.get("/readyz").json()
        assert ready["worker"]["backend"] == "ray" and len(ready["worker"]["workers"]) == 1
        r = server.client.post("/v1/jobs", files=job_files(media), data=job_data(seed=7, num_clip=1))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        server.wait_for(job_id, "done", timeout=600)
        video = server.client.get(f"/v1/jobs/{job_id}/video")
        assert video.status_code == 200
        (tmp_path / "job.mp4").write_bytes(video.content)
    assert frame_hashes(tmp_path / "job.mp4") == frame_hashes(clean_render["out"])[:45]


def _bad_batches(media: Path, root: Path) -> list[tuple[str, str, str]]:
    """(file name, contents, expected message part): each is refused before Ray starts."""
    good = json.dumps(_job(media, "ok.mp4", 7, 1))
    (root / "theirs.mp4").write_bytes(b"someone else's video")
    write_speech(root / "silent.wav", 1.0, amp=0.0)

    def job(**changes) -> str:
        doc = _job(media, "x.mp4", 7, 1)
        doc.update(changes)
        return json.dumps({k: v for k, v in doc.items() if v is not None})

    return [
        ("malformed.jsonl", f"{good}\n\n{{\"image\": 1,\n", "malformed.jsonl:3: not JSON"),
        ("list.jsonl", "[1, 2]\n", "list.jsonl:1: expected a JSON object"),
        ("unknown.jsonl", job(steps=8), "unknown.jsonl:1: unknown field 'steps'"),
        ("missing.jsonl", job(out=None), "missing.jsonl:1: missing 'out'"),
        ("seed.jsonl", job(seed="7"), "seed.jsonl:1: 'seed' must be an integer"),
        ("bigseed.jsonl", job(seed=2**64), "bigseed.jsonl:1: 'seed' must be from 0 to 2^63-1"),
        ("clips.jsonl", job(num_clip=0), "clips.jsonl:1: 'num_clip' must be a positive integer"),
        ("noimage.jsonl", job(image="nope.png"), "noimage.jsonl:1: image"),
        ("silent.jsonl", job(audio=str(root / "silent.wav")), "silent.jsonl:1: "),
        ("notmp4.jsonl", job(out="x.avi"), "notmp4.jsonl:1: --out"),
        ("badsize.jsonl", job(size="huge"), "badsize.jsonl:1: "),
        ("emptyprompt.jsonl", job(prompt="  "), "emptyprompt.jsonl:1: 'prompt' is empty"),
        ("twice.jsonl", f"{good}\n{good}\n", "twice.jsonl:2: out"),
        ("theirs.jsonl", job(out="theirs.mp4"), "was not written by `farm run`"),
        ("underfile.jsonl", job(out="theirs.mp4/x.mp4"), "underfile.jsonl:1: --out"),
        ("empty.jsonl", "\n# nothing\n", "empty.jsonl: no jobs"),
    ]


def test_bad_batches_and_flags_get_one_line(tiny_artifact: Path, media: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    for name, text, message in _bad_batches(media, tmp_path):
        (tmp_path / name).write_text(text)
        before = sorted(p.name for p in tmp_path.iterdir())
        rc = cli_main(["farm", "run", str(tmp_path / name), "--artifact", str(tiny_artifact)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and message in err, (name, err)
        assert err.startswith("liveavatar-lite farm: error: ")
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name  # nothing written
    cases = [(["farm", "run", str(tmp_path / "nothere.jsonl"), "--artifact", str(tiny_artifact)], "no such batch file"),
             (["farm", "run", str(tmp_path / "twice.jsonl"), "--artifact", str(tmp_path)], "artifact"),
             (["farm"], "farm needs an action"),
             (["serve", str(tiny_artifact), "--workers", "2", "--state-dir", str(tmp_path / "s")], "need --backend ray")]
    for argv, message in cases:
        rc = cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and message in err, (argv, err)
    assert not (tmp_path / "s").exists()


def test_plan_batch_skips_ours_rerenders_stale_and_refuses_theirs(media: Path, tmp_path: Path) -> None:
    """The ownership rules of a re-run, without Ray: a claimed (or finished) mp4 of the same key is
    done, one of another key is rendered again, one without a marker or a foreign work dir is refused."""
    from liveavatar_lite.errors import UserError
    from liveavatar_lite.farm.jobs import (
        JobDefaults,
        farm_key,
        marker_path,
        plan_batch,
        read_jobs,
        write_marker,
    )
    from liveavatar_lite.pipeline.generate import job_key
    from liveavatar_lite.pipeline.workdir import RenderWorkDir

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(_job(media, "a.mp4", 7, 1)) + "\n" + json.dumps(_job(media, "b.mp4", 8, 1)) + "\n")
    a, b = read_jobs(jobs, JobDefaults())
    assert plan_batch([a, b], "id", jobs).todo == [a, b]
    a.out.write_bytes(b"mp4")
    write_marker(a, farm_key(a, "id"))  # only the claim: the driver died right after the mp4 appeared
    assert plan_batch([a, b], "id", jobs).done == [a]
    assert plan_batch([a, b], "other artifact", jobs).todo == [a, b]  # ours, but of other inputs: again
    marker_path(a.out).unlink()
    with pytest.raises(UserError, match="was not written by `farm run`"):
        plan_batch([a, b], "id", jobs)
    a.out.unlink()
    work = RenderWorkDir.open(b.out, job_key(b.request(), "id"), resume=False)
    assert plan_batch([a, b], "id", jobs).resuming == {2: 0}
    with pytest.raises(UserError, match="holds an unfinished render of other inputs"):
        plan_batch([a, b], "another id", jobs)
    work.remove()


FARM_FLAG_CASES = [
    (["farm", "run", "J", "--artifact", "A", "--workers", "0"], "--workers"),
    (["farm", "run", "J", "--artifact", "A", "--cpus-per-worker", "nan"], "--cpus-per-worker"),
    (["farm", "run", "J", "--artifact", "A", "--checkpoint-interval", "-1"], "--checkpoint-interval"),
    (["farm", "run", "J", "--artifact", "A", "--seed", "-1"], "--seed"),
    (["farm", "run", "J", "--artifact", "A", "--vram", "inf"], "--vram"),
    (["serve", "A", "--backend", "ray", "--workers", "0"], "--workers"),
    (["serve", "A", "--backend", "kubernetes"], "--backend"),
]


@pytest.mark.parametrize("argv,flag", FARM_FLAG_CASES, ids=[f"{a[0]}{a[-2]}={a[-1]}" for a, _ in FARM_FLAG_CASES])
def test_farm_flags_out_of_range(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], flag: str) -> None:
    from hostile_fixtures import assert_one_line, run_cli

    code, err = run_cli(capsys, *(str(tmp_path / a) if a in ("J", "A") else a for a in argv))
    assert_one_line(code, err, flag, exit_code=2)
    assert sorted(tmp_path.iterdir()) == []  # refused while parsing: nothing created


def test_a_failed_job_removes_only_its_own_work(tmp_path: Path) -> None:
    """The farm's cleanup removes the work dir and temp mp4 of a failed job, never the user's directory,
    and never a work dir another render holds (locked): that render is what made this task fail."""
    from liveavatar_lite.farm.actor import remove_work
    from liveavatar_lite.farm.batch import task_for
    from liveavatar_lite.farm.jobs import FarmJob
    from liveavatar_lite.pipeline.workdir import RenderWorkDir

    out = tmp_path / "videos" / "a.mp4"
    out.parent.mkdir()
    (out.parent / "b.mp4").write_bytes(b"another video")
    job = FarmJob(1, tmp_path / "p.png", tmp_path / "s.wav", "p", out, SIZE, 7, None, 1, 64, 64)
    task = task_for(job, 0)
    work = RenderWorkDir.open(out, "key", resume=False)  # another render, still running (holds the lock)
    remove_work(task)
    assert work.root.is_dir()
    work.unlock()  # it failed or was killed: its files are ours to clean
    out.with_name("a.mp4.tmp").write_bytes(b"half")
    remove_work(task)
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.mp4"]
