"""How fast `farm run` checks a batch file: N lines over one photo and one speech file.

    .venv/bin/python tools/bench_farm_batch.py /tmp/batch-bench 200000
    # 200000 lines in 22.85 s wall (8,753 lines/s), 3.93 s CPU (50,852 lines per CPU-second)

The imports and the one decode of each input are paid by a one-line batch first (not timed).
"""
import sys, time, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pathlib import Path
from media_fixtures import write_photo, write_speech
from liveavatar_lite.farm.jobs import read_jobs, JobDefaults
root = Path(sys.argv[1]); root.mkdir(exist_ok=True)
n = int(sys.argv[2])
write_photo(root / "p.png"); write_speech(root / "s.wav", 2.0)
with open(root / "jobs.jsonl", "w") as f:
    for i in range(n):
        f.write(json.dumps({"image": "p.png", "audio": "s.wav", "prompt": "a person talking", "out": f"out/v{i}.mp4", "size": "64*64", "seed": i}) + "\n")
(root / "one.jsonl").write_text(json.dumps({"image": "p.png", "audio": "s.wav", "prompt": "a person talking", "out": "out/w.mp4", "size": "64*64"}) + "\n"); read_jobs(root / "one.jsonl", JobDefaults())  # imports + one decode of each input: paid once
t = time.perf_counter(); c = time.process_time(); jobs = read_jobs(root / "jobs.jsonl", JobDefaults()); dt = time.perf_counter() - t; dc = time.process_time() - c
print(f"{len(jobs)} lines in {dt:.2f} s wall ({len(jobs)/dt:,.0f} lines/s), {dc:.2f} s CPU ({len(jobs)/dc:,.0f} lines per CPU-second)")
