"""`liveavatar-lite inspect ARTIFACT [--json] [--verify]`: what an artifact holds and whether it is intact."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = """Summarize a liveavatar-lite artifact: formats and bytes per unit, totals by quant type,
the source checkpoint it came from, and its verification state (files present with the recorded
sizes; with --verify also every sha256)."""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT", help="artifact directory (holds manifest.json)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads everything)")


def run(args: argparse.Namespace) -> int:
    from ..artifact.format import read_manifest, summary, verify_artifact

    m = read_manifest(args.artifact)
    info = summary(m)
    problems = verify_artifact(args.artifact, m, checksums=args.verify)
    info["verification"] = {
        "checked": "sizes+sha256" if args.verify else "sizes",
        "ok": not problems,
        "problems": problems,
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(_text(info))
    return 0 if not problems else 1


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def _text(info: dict) -> str:
    q, src = info["quant"], info["source"]
    lines = [
        f"liveavatar-lite artifact, format version {info['format_version']}",
        f"components: {', '.join(info['components'])}",
        f"quant: format={q['format']} group_size={q['group_size']} t5={q['t5']} keep_bf16={list(q['keep_bf16'])}"
        + (f" target_size={q['target_size_gb']} GB" if q["target_size_gb"] else ""),
        f"source: {len(src['files'])} shard(s), {_gb(sum(f['size'] for f in src['files']))}, "
        f"config sha256 {src['config_sha256'][:12]}"
        + (f", LoRA {src['lora']['name']} sha256 {src['lora_sha256'][:12]}" if src["lora"] else ", no LoRA"),
        "",
        f"{'unit':<12} {'kind':<13} {'tensors':>7} {'bytes':>14}  by qtype",
    ]
    for u in info["units"]:
        mix = " ".join(f"{k}:{v / 1e6:.1f}MB" for k, v in sorted(u["bytes_by_qtype"].items()))
        lines.append(f"{u['name']:<12} {u['kind']:<13} {u['tensors']:>7} {u['bytes']:>14,}  {mix}")
    lines.append("")
    for k, v in sorted(info["bytes_by_qtype"].items()):
        lines.append(f"  {k:<5} {info['params_by_qtype'][k] / 1e6:12.1f} M params  {_gb(v)}")
    lines.append(f"total: {_gb(info['total_bytes'])} in {len(info['units'])} files")
    for k, v in info["paths"].items():
        lines.append(f"{k}: {v}")
    ver = info["verification"]
    state = "OK" if ver["ok"] else "FAILED: " + "; ".join(ver["problems"])
    lines.append(f"verification ({ver['checked']}): {state}")
    return "\n".join(lines)
