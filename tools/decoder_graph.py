#!/usr/bin/env python3
"""Store the structure of a preset's fp16 ONNX decoder graph (shapes and data flow, no weights).

`liveavatar-lite plan 14b` sizes the VAE decoder before any artifact exists; it reads these files
(`liveavatar_lite/decode/graphs/<preset>.json`). The graph is exported exactly as `quantize` exports
an artifact's decoder (`vae_export.export_decoder`, fp16), from a VAE with untrained weights: the
structure and every shape are the same, only the weight values differ (and are not stored).

    python tools/decoder_graph.py --preset 14b      # about a minute on CPU
    python tools/decoder_graph.py --preset tiny
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from liveavatar_lite.config import PRESETS
from liveavatar_lite.decode.decoder_memory import GRAPHS_DIR, DecoderGraph
from liveavatar_lite.decode.vae_export import export_decoder
from liveavatar_lite.model.vae import WanVAE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="14b", choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, default=None, help=f"default: {GRAPHS_DIR}/<preset>.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    vae = WanVAE(PRESETS[args.preset].vae).eval()
    with torch.no_grad():  # no two parameters equal (as in trained weights): the exporter would merge them
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_decoder(vae, Path(tmp) / "decoder.onnx", dtype="fp16")
        graph = DecoderGraph.from_onnx(onnx_path)
    out = args.out or GRAPHS_DIR / f"{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(graph.to_json(), separators=(",", ":")) + "\n")
    print(f"wrote {out}: {len(graph.nodes)} nodes, weights {graph.weights_bytes / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
