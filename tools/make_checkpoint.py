#!/usr/bin/env python3
"""Write a random-weight checkpoint in the exact upstream on-disk layout (LIVEAVATAR.md §2.4).

    python tools/make_checkpoint.py --preset tiny --out /tmp/ck
    python tools/make_checkpoint.py --preset 14b --dit-only --fill zeros --out /scratch/ck14b

Key names and shapes come from our own modules built on the meta device, so the fixture is exactly
what the loaders expect; a test checks the 14b DiT keys against upstream's manifest. Every tensor is
generated and written one at a time (safetensors and .pth alike), so peak RSS stays around the
largest tensor (~280 MB for the 14b preset) however large the checkpoint. Each tensor's values
depend only on (seed, key), not on write order. The directory appears atomically (temp + rename).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from liveavatar_lite.artifact import checkpoint as ck
from liveavatar_lite.artifact.checkpoint import expected_shapes
from liveavatar_lite.config import PRESETS, DiTConfig, ModelPreset

# The Linear layers the Live Avatar LoRA targets (s2v_causal_sft.yaml: q,k,v,o,ffn.0,ffn.2, matched by
# module-name suffix), i.e. 448 modules at 14B.
LORA_TARGET = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]|audio_injector\.injector\.\d+\.[qkvo])\.weight$")
SHARD_BYTES = {"14b": 10 * 10**9, "tiny": None}  # HF's default 10 GB; tiny: split in 3 shards
_ST_DTYPE = {v: k for k, v in ck.SAFETENSORS_DTYPES.items()}
_STORAGE_CLS = {torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage", torch.float16: "HalfStorage"}

Spec = tuple[str, tuple[int, ...]]  # (key, shape)


CHUNK_ELEMS = 1 << 24  # values are generated in row chunks of <= 16 M elements to bound RSS


def iter_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, fill: str, seed: int) -> Iterator[torch.Tensor]:
    """Deterministic values for one key, as consecutive row chunks (each chunk seeded by (seed, key, chunk)).

    Random fill gives unit-scale activations: fan-in scaled weights, norm gains around 1, small biases.
    """
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows_per_chunk = max(1, CHUNK_ELEMS // row) if shape else 1
    n_rows = shape[0] if shape else 1
    for c, r0 in enumerate(range(0, max(n_rows, 1), rows_per_chunk)):
        part = (min(rows_per_chunk, n_rows - r0), *shape[1:]) if shape else ()
        if fill == "zeros":
            yield torch.zeros(part, dtype=dtype)
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()) + 7919 * c)
        t = torch.randn(part, generator=g)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "gamma" or (leaf == "weight" and "norm" in key and len(shape) == 1):
            t = 1.0 + 0.1 * t  # norm gains around 1
        elif leaf == "weight" and len(shape) >= 2:
            t = t / math.sqrt(row)  # fan-in scaling keeps activations O(1)
        elif key.endswith("casual_audio_encoder.weights"):
            t = 0.01 + 0.001 * t  # upstream initializes these layer weights at 0.01
        else:
            t = 0.02 * t  # biases, modulation tables, padding tokens
        yield t.to(dtype)


def tensor_for(key: str, shape: tuple[int, ...], dtype: torch.dtype, fill: str, seed: int) -> torch.Tensor:
    """The whole tensor `iter_tensor` streams (small tensors and tests)."""
    return torch.cat(list(iter_tensor(key, shape, dtype, fill, seed))).reshape(shape)


Maker = Callable[[str, tuple[int, ...]], Iterable[torch.Tensor]]


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor without copying them."""
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def write_safetensors(path: Path, specs: list[Spec], dtype: torch.dtype, make: Maker, metadata: dict[str, str] | None = None) -> int:
    """Stream tensors into one safetensors file: header first (shapes are known), then data in order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, shape in specs:
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the spec pads the header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape in specs:
            for part in make(key, shape):
                f.write(_raw(part))
    return offset


class _StorageRef:
    def __init__(self, index: int, dtype: torch.dtype, numel: int) -> None:
        self.index, self.dtype, self.numel = index, dtype, numel


class _TensorStub:
    """Pickles exactly like a CPU tensor that owns storage `ref` (what torch.save writes)."""

    def __init__(self, ref: _StorageRef, shape: tuple[int, ...]) -> None:
        self.ref, self.shape = ref, shape

    def __reduce_ex__(self, protocol: int):  # type: ignore[no-untyped-def]
        stride = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2, (self.ref, 0, self.shape, stride, False, collections.OrderedDict()))


class _PthPickler(pickle.Pickler):
    def persistent_id(self, obj: object):  # type: ignore[no-untyped-def]
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_CLS[obj.dtype]), str(obj.index), "cpu", obj.numel)
        return None


def write_pth(path: Path, specs: list[Spec], dtype: torch.dtype, make: Maker) -> int:
    """Stream a torch.save-compatible state_dict (zip format), one storage record at a time.

    torch.save needs every tensor in memory; this writes the same archive (data.pkl + data/N records,
    64-byte aligned) so an 11 GB T5 file costs one tensor of RSS. Loadable with weights_only=True, mmap=True.
    """
    import io

    stubs = {key: _TensorStub(_StorageRef(i, dtype, math.prod(shape)), shape) for i, (key, shape) in enumerate(specs)}
    pkl = io.BytesIO()
    _PthPickler(pkl, protocol=2).dump(stubs)
    arch = path.stem
    total = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{arch}/data.pkl", pkl.getvalue())
        zf.writestr(f"{arch}/.format_version", "1")
        zf.writestr(f"{arch}/.storage_alignment", "64")
        zf.writestr(f"{arch}/byteorder", "little")
        for i, (key, shape) in enumerate(specs):
            total += _write_aligned(zf, f"{arch}/data/{i}", make(key, shape), math.prod(shape) * dtype.itemsize)
        zf.writestr(f"{arch}/version", "3\n")
        zf.writestr(f"{arch}/.data/serialization_id", f"{zlib.crc32(path.name.encode()):040d}")
    return total


def _write_aligned(zf: zipfile.ZipFile, name: str, parts: Iterable[torch.Tensor], nbytes: int, align: int = 64) -> int:
    """Write one stored record whose data starts on an `align`-byte boundary (padding in the extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    zip64 = nbytes > 0xFFFFFFFF - 1024 or zf.fp.tell() > 0xFFFFFFFF - 1024  # type: ignore[union-attr]
    start = zf.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0)  # type: ignore[union-attr]
    pad = (-(start + 4)) % align  # a 4-byte extra-field header precedes the padding
    info.extra = (0xCAFE).to_bytes(2, "little") + pad.to_bytes(2, "little") + b"\0" * pad
    with zf.open(info, "w", force_zip64=zip64) as w:
        for part in parts:
            w.write(_raw(part))
    return nbytes


def shard_plan(specs: list[Spec], itemsize: int, max_bytes: int | None, num_shards: int | None = None) -> list[list[Spec]]:
    """Greedy in-order sharding like HF's save_pretrained (a new shard when the next tensor overflows).

    num_shards: split into exactly that many shards of about equal key counts instead (test fixtures).
    """
    if num_shards:
        per = math.ceil(len(specs) / num_shards)
        return [specs[i * per : (i + 1) * per] for i in range(num_shards)]
    total = sum(math.prod(s) * itemsize for _, s in specs)
    limit = max_bytes or max(1, total // 3 + 1)
    shards: list[list[Spec]] = [[]]
    size = 0
    for key, shape in specs:
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += n
    return shards


def dit_specs(preset: ModelPreset) -> list[Spec]:
    from liveavatar_lite.model.dit import WanS2VDiT

    with torch.device("meta"):
        model = WanS2VDiT(preset.dit)
    return list(expected_shapes(model).items())


def t5_specs(preset: ModelPreset) -> list[Spec]:
    from liveavatar_lite.model.t5 import UMT5Encoder

    with torch.device("meta"):
        model = UMT5Encoder(preset.t5)
    return list(expected_shapes(model).items())


def vae_specs(preset: ModelPreset) -> list[Spec]:
    from liveavatar_lite.model.vae import WanVAE

    with torch.device("meta"):
        model = WanVAE(preset.vae)
    return list(expected_shapes(model).items())


def lora_specs(dit: list[Spec], rank: int, spelling: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(file key, module, shape) for lora_A [r, in] and lora_B [out, r] of every targeted Linear."""
    out = []
    for key, (n_out, n_in) in ((k, s) for k, s in dit if LORA_TARGET.match(k)):
        module = key[: -len(".weight")]
        for ab, shape in (("A", (rank, n_in)), ("B", (n_out, rank))):
            name = f"base_model.model.{module}.lora_{ab}.weight" if spelling == "peft" else f"{module}.lora_{ab}.default.weight"
            out.append((name, module, shape))
    return out


def write_checkpoint(
    preset_name: str,
    out: Path,
    fill: str = "random",
    seed: int = 0,
    dit_only: bool = False,
    lora_spelling: str = "peft",
    with_lora: bool = True,
    progress: bool = False,
    dit: DiTConfig | None = None,
    num_shards: int | None = None,
) -> Path:
    """Write the whole directory into a temp dir next to `out`, then rename it into place.

    dit: another DiT config than the preset's (DiT-only fixtures); num_shards: exact shard count.
    """
    preset = PRESETS[preset_name] if dit is None else dataclasses.replace(PRESETS[preset_name], dit=dit)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bf16 = torch.bfloat16

    def make(dtype: torch.dtype) -> Maker:
        return lambda key, shape: iter_tensor(key, shape, dtype, fill, seed)

    log = _Progress(progress)
    (tmp / ck.DIT_CONFIG).write_text(json.dumps(preset.dit.to_upstream_json(), indent=2) + "\n")
    (tmp / "configuration.json").write_text(json.dumps({"framework": "Pytorch", "task": "s2v"}) + "\n")

    specs = dit_specs(preset)
    shards = shard_plan(specs, bf16.itemsize, SHARD_BYTES[preset_name], num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(tmp / name, shard, bf16, make(bf16), metadata={"format": "pt"})
        weight_map.update({k: name for k, _ in shard})
        log(f"DiT shard {i}/{len(shards)}")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / ck.DIT_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    if with_lora:
        entries = lora_specs(specs, preset.lora_rank, lora_spelling)
        shapes = {name: shape for name, _, shape in entries}

        def make_lora(key: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
            module_key = key.replace(".default", "").replace("base_model.model.", "")  # same values in both spellings
            for t in iter_tensor(module_key, shape, torch.float32, fill, seed + 1):
                yield (t if ".lora_A" in key else 0.1 * t).to(bf16)  # B small: the LoRA is a correction

        write_safetensors(tmp / ck.LORA_FILE, list(shapes.items()), bf16, make_lora)
        log("LoRA")

    if not dit_only:
        write_pth(tmp / ck.T5_FILE, t5_specs(preset), bf16, make(bf16))
        log("umT5")
        write_pth(tmp / ck.VAE_FILE, vae_specs(preset), torch.float32, make(torch.float32))
        log("VAE")
        from tiny_components import write_tiny_tokenizer, write_tiny_wav2vec

        write_tiny_wav2vec(tmp / ck.WAV2VEC_DIR, preset.wav2vec, seed)
        write_tiny_tokenizer(tmp / ck.TOKENIZER_DIR, vocab_size=preset.t5.vocab)
        log("wav2vec2 + tokenizer")

    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.t0 = enabled, time.monotonic()

    def __call__(self, what: str) -> None:
        if self.enabled:
            print(f"[{time.monotonic() - self.t0:7.1f}s] wrote {what}", file=sys.stderr, flush=True)


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True, help="tiny: a few MB for tests; 14b: the real shapes (32.6 GB DiT)")
    p.add_argument("--out", type=Path, required=True, help="directory to create")
    p.add_argument("--fill", choices=["random", "zeros"], default="random", help="random (default, seeded) or zeros (fast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dit-only", action="store_true", help="write only config, DiT shards and the LoRA (skips the 11 GB T5 at 14b)")
    p.add_argument("--lora-spelling", choices=["peft", "plain"], default="peft", help="peft: base_model.model.X.lora_A.weight; plain: X.lora_A.default.weight")
    p.add_argument("--no-lora", action="store_true", help="do not write liveavatar.safetensors")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.out.exists() and not args.force:
        print(f"make_checkpoint: error: {args.out} exists (use --force to replace it)", file=sys.stderr)
        return 2
    write_checkpoint(args.preset, args.out, args.fill, args.seed, args.dit_only, args.lora_spelling, not args.no_lora, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
