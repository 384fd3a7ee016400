"""`liveavatar-lite vae`: export the Wan2.1 VAE decoder to ONNX, or decode saved latents with it.

    liveavatar-lite vae export CKPT_DIR vae_decoder.onnx --dtype fp16
    liveavatar-lite vae decode --onnx vae_decoder.onnx --latents z.npy --out frames.npy --chunk 3
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CheckpointError, UserError

DESCRIPTION = (
    "Export the Wan2.1 VAE decoder (from Wan2.1_VAE.pth in the checkpoint directory) to a streaming ONNX "
    "graph, or decode a .npy of normalized latents [16,T,h,w] into uint8 frames [1+4(T-1),H,W,3]. "
    "`quantize` already exports the decoder into the artifact (vae/decoder.onnx); use this to make one "
    "by hand or to look at saved latents. Run `liveavatar-lite vae ACTION --help` for each action's flags."
)
DISK_FULL_HINT = "free some space and re-run (nothing half-written was left)"


def register(parser: argparse.ArgumentParser) -> None:
    from .flags import float_range, int_range

    sub = parser.add_subparsers(dest="vae_command", metavar="ACTION")
    exp = sub.add_parser(
        "export", help="write the streaming decoder step graph (.onnx)",
        description="Export the Wan2.1 VAE decoder as ONE ONNX step graph (latents chunk + causal caches in, "
                    "frames + caches out), written to a temp file and renamed when complete.")
    exp.add_argument("ckpt_dir", type=Path, metavar="CKPT",
                     help="upstream checkpoint directory holding Wan2.1_VAE.pth (or the .pth itself)")
    exp.add_argument("out", type=Path, metavar="OUT.onnx", help="output .onnx path")
    exp.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                     help="graph precision (fp16 keeps RMS-norm sums and softmax in fp32); default fp32")
    dec = sub.add_parser(
        "decode", help="decode saved latents with an exported decoder",
        description="Decode normalized latents [16, T, h, w] (.npy, float) with a decoder from `vae export` "
                    "into uint8 RGB frames [1+4(T-1), 8h, 8w, 3] (.npy), streaming --chunk latents per call.")
    dec.add_argument("--onnx", type=Path, required=True, help="decoder made by `vae export` (or an artifact's vae/decoder.onnx)")
    dec.add_argument("--latents", type=Path, required=True, help=".npy float32 [16,T,h,w], normalized; T >= 1, 2 <= h,w <= 512")
    dec.add_argument("--out", type=Path, required=True, help="output .npy, uint8 [1+4(T-1),H,W,3] RGB")
    dec.add_argument("--chunk", type=int_range(1, 64), default=3,
                     help="latent frames per decoder call, 1-64 (default 3; more is faster and uses more memory)")
    dec.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where ONNX Runtime runs: auto = CUDA when available, else CPU (default auto)")
    dec.add_argument("--gpu-mem-limit-gb", type=float_range(0.0, 1e4, lo_open=True), default=None, metavar="GB",
                     help="cap on the CUDA execution provider's memory arena in GiB (default: no cap)")
    dec.add_argument("--threads", type=int_range(1, 1024), default=None,
                     help="CPU threads for ONNX Runtime (default: ONNX Runtime's choice)")


def run(args: argparse.Namespace) -> int:
    if args.vae_command == "export":
        return _export(args)
    if args.vae_command == "decode":
        return _decode(args)
    raise UserError("choose an action: export or decode (see `liveavatar-lite vae --help`)")


def _export(args: argparse.Namespace) -> int:
    import logging

    import torch

    from ..artifact.checkpoint import VAE_FILE, load_pth, materialize_strict
    from ..config import VAEConfig
    from ..decode.vae_export import export_decoder
    from ..model.vae import WanVAE

    from ..pipeline.workdir import check_output_path

    src: Path = args.ckpt_dir
    pth = src / VAE_FILE if src.is_dir() else src
    if not pth.exists():
        raise CheckpointError(f"{pth}: VAE weights not found")
    check_output_path(args.out, "OUT", suffix=".onnx")
    tensors = load_pth(pth)
    first_conv = tensors.get("encoder.conv1.weight")
    if first_conv is None or first_conv.ndim != 5:
        raise CheckpointError(f"{pth}: no encoder.conv1.weight, not a Wan2.1 VAE state_dict")
    cfg = VAEConfig(dim=int(first_conv.shape[0]))  # width is the only size the released configs vary
    with torch.device("meta"):
        vae = WanVAE(cfg)
    materialize_strict(vae, tensors, source=str(pth), dtype=torch.float32)
    export_decoder(vae, args.out, dtype=args.dtype)
    logging.getLogger(__name__).info("wrote %s (%.1f MB)", args.out, args.out.stat().st_size / 2**20)
    return 0


def _decode(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ..decode.vae_onnx import OnnxVAEDecoder
    from ..errors import first_line
    from ..fileio import durable_replace

    from ..fileio import require_file
    from ..pipeline.workdir import check_output_path

    require_file(args.latents, "--latents")
    require_file(args.onnx, "--onnx")
    check_output_path(args.out, "--out", suffix=".npy")
    try:
        latents = np.load(args.latents, allow_pickle=False)  # no pickles: a .npy never runs code
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{args.latents}: not a readable .npy ({first_line(e)})") from None
    if not isinstance(latents, np.ndarray):
        raise UserError(f"{args.latents}: not a single array (.npz archives are not latents)")
    limit = None if args.gpu_mem_limit_gb is None else int(args.gpu_mem_limit_gb * 2**30)
    decoder = OnnxVAEDecoder(args.onnx, device=args.device, gpu_mem_limit=limit, threads=args.threads)
    if decoder.output != "uint8":
        raise UserError(f"{args.onnx}: a float-frames graph; `vae decode` needs the uint8 one `vae export` writes")
    if latents.ndim != 4 or latents.shape[0] != decoder.z_dim:
        raise UserError(f"{args.latents}: latents must be [{decoder.z_dim}, T, h, w], got shape {list(latents.shape)}")
    if not np.issubdtype(latents.dtype, np.floating):
        raise UserError(f"{args.latents}: latents must be float32, got {latents.dtype}")
    if latents.shape[1] < 1 or not (2 <= latents.shape[2] <= 512 and 2 <= latents.shape[3] <= 512):
        raise UserError(f"{args.latents}: latents must have T >= 1 frames and 2 <= h, w <= 512, got shape "
                        f"{list(latents.shape)}")
    if not np.isfinite(latents).all():
        raise UserError(f"{args.latents}: latents must be finite (found NaN or Inf)")

    t = latents.shape[1]
    parts = []
    for start in tqdm(range(0, t, args.chunk), desc="vae decode", unit="chunk", disable=t <= args.chunk):
        parts.append(decoder.decode(latents[:, start:start + args.chunk]))
    frames = np.concatenate(parts, axis=0)

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, frames)
        durable_replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return 0
