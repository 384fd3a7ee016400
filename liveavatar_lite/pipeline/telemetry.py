"""Per-clip measurements of a render, written as JSON lines, plus a summary line at the end.

Each clip line: seconds, frames, fps, peak VRAM (bytes, since the clip began), host RSS (bytes,
now and peak) and the copy-wait fraction (time compute waited for weight and KV copies / clip
time), and, from the artifact renderer, the wait split into weights and KV, the H2D bytes of each,
and the memory ledger (`ledger.py`: the plan's figures next to the measured ones), which is also
logged as a table. A `layout` line before the first clip records what the render streams and where
its KV caches live. A talk session (session.py) writes one `block` line per block instead, with
its latency (`block_done`), and a `session_summary` line when it closes.

    tel = Telemetry.open(Path("run.jsonl"), append=False)
    tel.clip_done(index=0, frames=45, seconds=12.3, copy_wait_s=1.2)
    tel.summary(); tel.close()
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

def host_rss_bytes() -> tuple[int | None, int | None]:
    """(current, peak) resident set size of this process, or None where the OS does not say.

    rss, peak = host_rss_bytes()  # bytes
    """
    status = Path("/proc/self/status")
    if status.exists():
        fields = {}
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024  # reported in kB
        return fields.get("VmRSS"), fields.get("VmHWM")
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return None, peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere
    except ImportError:  # Windows
        return None, None


def peak_vram_bytes(reset: bool = True) -> int | None:
    """Peak CUDA memory allocated by torch since the last reset (None without CUDA).

    peak_vram_bytes()  # bytes since the previous call, which reset the counter
    """
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = int(torch.cuda.max_memory_allocated())
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


@dataclass
class Telemetry:
    """Collects clip records; writes each as one JSON line when a file is given (else only keeps it)."""

    stream: IO[str] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, path: Path | None, append: bool) -> Telemetry:
        """Telemetry writing to `path` (appended to when resuming), or in memory only if None."""
        if path is None:
            return cls()
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(stream=open(path, "a" if append else "w", encoding="utf-8"))

    def _write(self, record: dict[str, Any]) -> None:
        """Append one JSON line and make it durable (no-op in memory-only mode)."""
        if self.stream is not None:
            self.stream.write(json.dumps(record, sort_keys=True) + "\n")
            self.stream.flush()
            os.fsync(self.stream.fileno())  # the lines must survive a crash: they explain it

    def event(self, name: str, **fields: Any) -> None:
        """A one-off line (start, resume) that is not a clip."""
        self._write({"event": name, "time": time.time(), **fields})

    def clip_done(self, index: int, frames: int, seconds: float, copy_wait_s: float | None = None,
                  **extra: Any) -> dict[str, Any]:
        """Record clip `index`: its timings, peak VRAM since the previous clip, host RSS; returns the record.

        tel.clip_done(0, frames=45, seconds=12.3, copy_wait_s=1.2)["copy_wait_fraction"]  # 0.0976
        """
        rss, rss_peak = host_rss_bytes()
        record: dict[str, Any] = {
            "event": "clip",
            "clip": index,
            "frames": frames,
            "seconds": round(seconds, 4),
            "fps": round(frames / seconds, 3) if seconds > 0 else None,
            "peak_vram_bytes": peak_vram_bytes(),
            "host_rss_bytes": rss,
            "host_rss_peak_bytes": rss_peak,
            "copy_wait_fraction": (round(min(1.0, copy_wait_s / seconds), 4)
                                   if copy_wait_s is not None and seconds > 0 else None),
            **extra,
        }
        self.records.append(record)
        self._write(record)
        if self.stream is not None and record.get("ledger"):
            log.debug("%s", format_ledger(record["ledger"], f"memory ledger, clip {index} (plan vs measured):"))  # -v
        return record

    def block_done(self, clip: int, block: int, frames: int, seconds: float, *, utterance: int | None = None,
                   latency_s: float | None = None, features: str | None = None, **extra: Any) -> dict[str, Any]:
        """Record one block of a talk session: its render time, its utterance (None: idle) and latency
        (seconds from the arrival of the last speech sample it waited for to its frames; None: idle).

        tel.block_done(0, 1, 12, 0.31, utterance=0, latency_s=0.35, features="streaming")["latency_s"]  # 0.35
        """
        record: dict[str, Any] = {
            "event": "block",
            "time": time.time(),
            "clip": clip,
            "block": block,
            "frames": frames,
            "seconds": round(seconds, 4),
            "utterance": utterance,
            "latency_s": round(latency_s, 4) if latency_s is not None else None,
            "features": features,
            **extra,
        }
        self.records.append(record)
        self._write(record)
        return record

    def summary(self, **extra: Any) -> dict[str, Any]:
        """Write and return the totals over the clips recorded by this process, plus `extra` fields.

        tel.summary(out="out.mp4")["frames"]  # 141
        """
        clips = [r for r in self.records if r["event"] == "clip"]
        seconds = sum(r["seconds"] for r in clips)
        frames = sum(r["frames"] for r in clips)
        waits = [r["copy_wait_fraction"] * r["seconds"] for r in clips if r["copy_wait_fraction"] is not None]
        vram = [r["peak_vram_bytes"] for r in clips if r["peak_vram_bytes"] is not None]
        record: dict[str, Any] = {
            "event": "summary",
            "clips": len(clips),
            "frames": frames,
            "clip_seconds": round(seconds, 4),
            "wall_seconds": round(time.perf_counter() - self.started, 4),
            "fps": round(frames / seconds, 3) if seconds > 0 else None,
            "peak_vram_bytes": max(vram) if vram else None,
            "host_rss_peak_bytes": host_rss_bytes()[1],
            "copy_wait_fraction": round(sum(waits) / seconds, 4) if waits and seconds > 0 else None,
            **extra,
        }
        self._write(record)
        return record

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def format_ledger(ledger: dict[str, dict[str, Any]], title: str = "") -> str:
    """The ledger as a small table: item, predicted, measured (GB for bytes, s for seconds)."""
    lines = [title] if title else []
    lines.append(f"  {'item':<24}{'predicted':>12}{'measured':>12}")
    for name, row in ledger.items():
        lines.append(f"  {name:<24}{_fmt(name, row['predicted']):>12}{_fmt(name, row['measured']):>12}")
    return "\n".join(lines)


def _fmt(name: str, v: Any) -> str:
    if v is None:
        return "-"
    if name.endswith("_s") or name == "seconds":
        return f"{v:.3f} s"
    return f"{v / 1e9:.3f} GB" if abs(v) >= 1e9 else f"{v / 1e6:.2f} MB"
