"""Export the Wan VAE decoder step to ONNX (one graph: latents chunk + first flag + caches -> frames + caches).

    export_decoder(vae, Path("vae_decoder.onnx"), dtype="fp16")

Graph contract (recorded in the file's metadata_props, checked by `vae_onnx.OnnxVAEDecoder`):
  inputs  latents   float32 [1, z_dim, T, h, w]  normalized latents (un-normalized inside the graph)
          first     int64   []                   1 on the first call of a video, else 0
          cache_in_i  DTYPE [1, C_i, 2, h*s_i, w*s_i]  one per decoder causal conv (zeros at start)
  outputs frames    uint8   [4T, 8h, 8w, 3]      RGB; when first == 1 the first 3 frames are junk
                    (or float32 [1, 3, 4T, 8h, 8w] in [-1, 1] unclamped with output="float": tests, re-encoding)
          cache_out_i DTYPE  same shapes as cache_in_i
No `If` nodes: the first-frame rule is data (masks + Where), see liveavatar_lite/model/vae.py.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model.vae import FIRST_CALL_JUNK_FRAMES, WanVAE
from ..progress import phase

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
OPSET = 20
META_PREFIX = "liveavatar_lite."
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def frames_to_uint8(x: Tensor) -> Tensor:
    """[1,3,T,H,W] float in [-1,1] -> [T,H,W,3] uint8, as upstream's save_video (clamp, scale, truncate)."""
    x = x.float().clamp(-1.0, 1.0)
    x = torch.floor((x + 1.0) * 0.5 * 255.0)
    return x[0].permute(1, 2, 3, 0).to(torch.uint8)  # [T, H, W, 3]


class DecoderStepGraph(nn.Module):
    """The module that is exported: un-normalize, conv2, decoder step, frame conversion."""

    def __init__(self, vae: WanVAE, output: str = "uint8") -> None:
        super().__init__()
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        self.vae = vae
        self.output = output

    def forward(self, latents: Tensor, first: Tensor, caches: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        dtype = self.vae.conv2.weight.dtype
        x = self.vae.denormalize_latents(latents.float()).to(dtype)  # fp32 affine, then the graph dtype
        x = self.vae.conv2(x)
        frames, new_caches = self.vae.decoder.step(x, first, caches)
        frames = frames_to_uint8(frames) if self.output == "uint8" else frames.float()
        return (frames, *new_caches)


def graph_metadata(vae: WanVAE, dtype: str, output: str) -> dict[str, str]:
    """The metadata_props written into the .onnx (all string -> string)."""
    cfg = vae.cfg
    return {
        f"{META_PREFIX}vae_decoder": "1",
        f"{META_PREFIX}format_version": str(FORMAT_VERSION),
        f"{META_PREFIX}dtype": dtype,
        f"{META_PREFIX}output": output,
        f"{META_PREFIX}z_dim": str(cfg.z_dim),
        f"{META_PREFIX}spatial_stride": str(cfg.stride[1]),
        f"{META_PREFIX}temporal_stride": str(cfg.stride[0]),
        f"{META_PREFIX}first_call_junk_frames": str(FIRST_CALL_JUNK_FRAMES),
        f"{META_PREFIX}cache_layout": json.dumps(vae.decoder_cache_layout()),
    }


def export_decoder(
    vae: WanVAE, out: Path, dtype: str = "fp32", output: str = "uint8", example_hw: tuple[int, int] = (4, 6)
) -> Path:
    """Write the decoder step graph of `vae` (fp32 weights) to `out` atomically (temp file + rename).

        export_decoder(vae, Path("dec.onnx"), dtype="fp16")
    """
    import onnx  # optional dependency of the export path only

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if any(p.dtype != DTYPES[dtype] for p in vae.parameters()):
        vae = copy.deepcopy(vae).to(DTYPES[dtype])  # never change the caller's module
    vae = vae.eval().requires_grad_(False)
    graph = DecoderStepGraph(vae, output).eval()
    cfg = vae.cfg
    h, w = example_hw
    t = 2  # example sizes > 1 so torch.export keeps them symbolic
    latents = torch.randn(1, cfg.z_dim, t, h, w)
    first = torch.tensor(0, dtype=torch.int64)
    caches = vae.init_decoder_caches((h, w), dtype=DTYPES[dtype])
    layout = vae.decoder_cache_layout()

    dim_t = torch.export.Dim("t", min=1, max=64)
    dim_h = torch.export.Dim("h", min=2, max=512)
    dim_w = torch.export.Dim("w", min=2, max=512)
    cache_specs = tuple({3: dim_h * s if s > 1 else dim_h, 4: dim_w * s if s > 1 else dim_w} for _, s in layout)
    dynamic_shapes = ({2: dim_t, 3: dim_h, 4: dim_w}, None, cache_specs)
    input_names = ["latents", "first"] + [f"cache_in_{i}" for i in range(len(layout))]
    output_names = ["frames"] + [f"cache_out_{i}" for i in range(len(layout))]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with phase(f"exporting the VAE decoder step ({dtype}, {output} frames) to {out}"), warnings.catch_warnings():
            # torch.export's notes about derived axis names (2*h, 4*h, ...) and pytree deprecations: noise here
            warnings.filterwarnings("ignore", message=".*axis name.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            program = torch.onnx.export(
                graph,
                (latents, first, caches),
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                optimize=True,
                verbose=False,
            )
        model = program.model_proto
        for key, value in graph_metadata(vae, dtype, output).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        if any(node.op_type == "If" for node in model.graph.node):
            raise RuntimeError("exported VAE graph contains an If node; the first flag must stay data")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
