#!/usr/bin/env python3
"""Why the artifact's load-time checksum is xxh3-128: hash throughput side by side, and what
verification adds to `read_unit` on one synthetic unit file (read from the page cache).

    python tools/bench_checksum.py --mb 512 --repeats 5
    liveavatar-lite bench checksum --mb 256

Medians of --repeats after one warm-up pass; one core per hash (what a loader thread gets).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _median_seconds(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="buffer / unit size in MB (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes after one warm-up (median reported)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import xxhash

    from liveavatar_lite.artifact.format import FORMAT_VERSION, TensorSpec, UnitEntry, layout_file, read_unit
    from liveavatar_lite.artifact.qtypes import QuantType

    data = os.urandom(args.mb * 10**6)
    hashes = {"sha256": lambda: hashlib.sha256(data).hexdigest(), "blake2b": lambda: hashlib.blake2b(data).hexdigest(),
              "xxh3_128": lambda: xxhash.xxh3_128(data).hexdigest()}
    try:
        import blake3

        hashes["blake3"] = lambda: blake3.blake3(data).hexdigest()
    except ImportError:
        pass
    gbps = {name: len(data) / _median_seconds(fn, args.repeats) / 1e9 for name, fn in hashes.items()}

    # one unit file of --mb MB (a single int8 [N, 1000] tensor), read with and without verification
    n = args.mb * 1000
    layout = layout_file([TensorSpec("w", QuantType.BF16, (n // 2, 1000), None, "BF16")], "block_000")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "u.safetensors"
        body = layout.header + data[: layout.data_nbytes].ljust(layout.data_nbytes, b"\0")
        path.write_bytes(body)
        unit = UnitEntry("block_000", "u.safetensors", "dit_block", 0, len(layout.header), layout.data_nbytes,
                         hashlib.sha256(body).hexdigest(), layout.tensors, xxh3_128=xxhash.xxh3_128(body).hexdigest())
        out = torch.empty(layout.data_nbytes, dtype=torch.uint8)
        plain = _median_seconds(lambda: read_unit(tmp, unit, out=out), args.repeats)
        checked = _median_seconds(lambda: read_unit(tmp, unit, out=out, verify=True), args.repeats)
    result = {"mb": args.mb, "repeats": args.repeats, "hash_gb_per_s": gbps, "format_version": FORMAT_VERSION,
              "read_unit_s": plain, "read_unit_verified_s": checked, "verify_overhead": checked / plain,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"hash throughput, one core, {args.mb} MB buffer (median of {args.repeats}):")
    for name, v in sorted(gbps.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<10}{v:8.2f} GB/s   {v / gbps['sha256']:6.2f}x sha256")
    print(f"read_unit of a {args.mb} MB unit from the page cache: {plain * 1e3:.0f} ms plain, "
          f"{checked * 1e3:.0f} ms with the xxh3 check ({checked / plain:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
