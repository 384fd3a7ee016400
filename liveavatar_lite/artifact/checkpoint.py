"""Read the real upstream checkpoint layout, one tensor at a time, and merge the Live Avatar LoRA.

Layout (LIVEAVATAR.md §2.4): config.json, diffusion_pytorch_model-0000K-of-0000N.safetensors +
diffusion_pytorch_model.safetensors.index.json (or one un-sharded file), models_t5_umt5-xxl-enc-bf16.pth,
Wan2.1_VAE.pth, wav2vec2-large-xlsr-53-english/, google/umt5-xxl/. The LoRA (liveavatar.safetensors)
uses PEFT names, with or without `base_model.model.` and with or without `.default`.

Tensors are read with `os.pread` into a fresh buffer: RSS stays at one tensor whatever the shard size
(an mmap handle kept open maps the whole file into RSS, QUANT_LIBS.md §3.7) and the buffer is aligned.

    ck = CheckpointDir("Wan2.2-S2V-14B"); w = ck.read_dit_tensor("blocks.0.self_attn.q.weight")
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ..config import DiTConfig
from ..errors import CheckpointError, first_line
from ..fileio import contained_path, read_json, require_file

DIT_CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
TOKENIZER_DIR = "google/umt5-xxl"
LORA_FILE = "liveavatar.safetensors"

# safetensors header dtype strings -> torch dtypes (the subset a checkpoint or artifact can hold)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Refuses (CheckpointError, one line) what the safetensors library refuses: a header that is not a
    JSON object of entries, unknown dtypes, negative or non-integer shapes, offsets that do not
    match the shape, and tensors that overlap, leave gaps or run past the end of the file. A FIFO or
    device is refused before it is opened.
        infos, metadata = read_safetensors_header(Path("x.safetensors"))
    """
    require_file(path, "safetensors file", CheckpointError, missing=f"{path}: file is missing")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a string map)")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(_header_int(s) for s in entry["shape"])
            begin, end = (_header_int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        if any(s < 0 for s in shape):
            raise CheckpointError(f"{path}: tensor {key!r} has a negative dimension {list(shape)}")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {key!r} has inconsistent offsets")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} ends past the end of the file")
        infos[key] = TensorInfo(path, dtype, shape, base + begin, nbytes)
        spans.append((begin, end, key))
    covered = 0  # as the safetensors library: the tensors tile the data section, no overlap, no gap
    for begin, end, key in sorted(spans):
        if begin != covered:
            what = "overlaps the tensor before it" if begin < covered else "leaves a gap before it"
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} {what}")
        covered = end
    return infos, metadata


def _header_int(x: object) -> int:
    """An integer from a safetensors header (bools and floats are refused, as the library does)."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"not an integer: {x!r}")
    return x


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor with pread into its own (aligned, writable) CPU buffer."""
    buf = bytearray(info.nbytes)
    view = memoryview(buf)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:  # pread may return short reads for multi-GB tensors
            chunk = os.preadv(fd, [view[done:]], info.start + done)
            if chunk <= 0:
                raise CheckpointError(f"{info.file}: truncated while reading a tensor")
            done += chunk
    finally:
        os.close(fd)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


class CheckpointDir:
    """An upstream Wan2.2-S2V-14B download (or a DiT-only subset of it), validated on open."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            what = "it does not exist" if not self.path.exists() else "it is a file"
            raise CheckpointError(f"{self.path}: not a checkpoint directory ({what}; expected a Wan2.2-S2V-14B "
                                  "download, see `liveavatar-lite download`)")
        cfg_path = self.path / DIT_CONFIG
        raw = read_json(cfg_path, CheckpointError, missing=f"{cfg_path}: missing (is this a Wan2.2-S2V-14B download?)")
        self.dit_config: DiTConfig = DiTConfig.from_upstream_json(raw, source=str(cfg_path))
        self._weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, Path]:
        index = self.path / DIT_INDEX
        if index.exists():
            doc = read_json(index, CheckpointError, missing=f"{index}: missing")
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: corrupt index (no weight_map of key -> shard file)")
            # shard names come from a data file: they must stay inside the checkpoint directory
            shards = {name: contained_path(self.path, name, str(index), CheckpointError)
                      for name in sorted(set(weight_map.values()))}
            for p in shards.values():
                if not p.exists():
                    raise CheckpointError(f"{p}: shard listed in {DIT_INDEX} is missing")
                require_file(p, "shard", CheckpointError)
            return {k: shards[v] for k, v in weight_map.items()}
        single = self.path / DIT_SINGLE
        if single.exists():
            infos, _ = read_safetensors_header(single)
            return {k: single for k in infos}
        raise CheckpointError(f"{self.path}: no {DIT_INDEX} or {DIT_SINGLE}")

    @cached_property
    def _infos(self) -> dict[str, TensorInfo]:
        """Headers of every shard, checked against the index (each key present where it says)."""
        out: dict[str, TensorInfo] = {}
        for shard in sorted(set(self._weight_map.values())):
            infos, _ = read_safetensors_header(shard)
            out.update({k: v for k, v in infos.items() if self._weight_map.get(k) == shard})
        missing = [k for k in self._weight_map if k not in out]
        if missing:
            raise CheckpointError(f"{self._weight_map[missing[0]]}: tensor {missing[0]!r} listed in the index is absent")
        return out

    @property
    def dit_keys(self) -> list[str]:
        return list(self._weight_map)

    @property
    def shard_files(self) -> list[Path]:
        return sorted(set(self._weight_map.values()))

    def dit_tensor_info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no DiT tensor {key!r}") from None

    def read_dit_tensor(self, key: str) -> torch.Tensor:
        """One DiT tensor, as stored (bf16 upstream), in its own CPU buffer."""
        return read_tensor(self.dit_tensor_info(key))

    def read_dit_state_dict(self, lora: LoraWeights | None = None) -> dict[str, torch.Tensor]:
        """Every DiT tensor (LoRA merged in fp32 and cast back to the stored dtype). Small models only."""
        out = {}
        for key in self.dit_keys:
            t = self.read_dit_tensor(key)
            delta = lora.delta_for_weight(key) if lora is not None else None
            out[key] = merge_lora(t, delta).to(t.dtype) if delta is not None else t
        return out

    @property
    def t5_path(self) -> Path:
        return self.path / T5_FILE

    @property
    def vae_path(self) -> Path:
        return self.path / VAE_FILE

    @property
    def wav2vec_dir(self) -> Path:
        return self.path / WAV2VEC_DIR

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class LoraWeights:
    """A PEFT LoRA file, keys normalized to module names ("blocks.0.self_attn.q").

    Accepts `[base_model.model.]<module>.lora_A[.default].weight` (A [r, in], B [out, r]).
        lora = LoraWeights.open("liveavatar.safetensors"); lora.delta("blocks.0.ffn.0")
    """

    def __init__(self, path: Path, pairs: dict[str, tuple[TensorInfo, TensorInfo]], alpha: float) -> None:
        self.path = path
        self._pairs = pairs
        self.alpha = alpha

    @classmethod
    def open(cls, path: str | os.PathLike[str], alpha: float = 64.0) -> LoraWeights:
        path = Path(path)
        infos, _ = read_safetensors_header(path)
        halves: dict[str, dict[str, TensorInfo]] = {}
        for key, info in infos.items():
            m = _LORA_KEY.match(key)
            if m is None:
                raise CheckpointError(f"{path}: {key!r} is not a PEFT LoRA key (expected <module>.lora_A.weight)")
            halves.setdefault(m["module"], {})[m["ab"]] = info
        pairs = {}
        for module, ab in halves.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
            a, b = ab["A"], ab["B"]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{path}: {module} has mismatched LoRA shapes A{list(a.shape)} B{list(b.shape)}")
            if a.shape[0] == 0:  # alpha / rank would divide by zero
                raise CheckpointError(f"{path}: {module} has LoRA rank 0 (A{list(a.shape)}); not a usable LoRA")
            if not a.dtype.is_floating_point or not b.dtype.is_floating_point:
                raise CheckpointError(f"{path}: {module} has LoRA dtype {a.dtype}/{b.dtype}, expected a float type")
            pairs[module] = (a, b)
        if not pairs:
            raise CheckpointError(f"{path}: no LoRA tensors")
        return cls(path, pairs, alpha)

    @property
    def targets(self) -> set[str]:
        return set(self._pairs)

    def rank(self, module: str) -> int:
        return self._pairs[module][0].shape[0]

    def check_targets(self, weight_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Every LoRA module must match a 2-D `<module>.weight` of the right shape, else CheckpointError."""
        for module, (a, b) in sorted(self._pairs.items()):
            shape = weight_shapes.get(f"{module}.weight")
            if shape is None:
                raise CheckpointError(f"{self.path}: LoRA key {module!r} matches no Linear in the model")
            if tuple(shape) != (b.shape[0], a.shape[1]):
                raise CheckpointError(
                    f"{self.path}: LoRA for {module!r} is [{b.shape[0]}, {a.shape[1]}] but the weight is {list(shape)}"
                )

    def delta(self, module: str) -> torch.Tensor | None:
        """alpha/r * B @ A in fp32 ([out, in]), or None when the module has no LoRA."""
        pair = self._pairs.get(module)
        if pair is None:
            return None
        a = read_tensor(pair[0]).float()  # [r, in]
        b = read_tensor(pair[1]).float()  # [out, r]
        delta = (self.alpha / a.shape[0]) * (b @ a)  # [out, in]
        # NaN/Inf in A or B propagates through the product: two reductions catch it (no mask)
        if delta.numel() and not bool(torch.isfinite(delta.amax()) & torch.isfinite(delta.amin())):
            raise CheckpointError(f"{self.path}: LoRA for {module!r} contains NaN or Inf (its merged delta is not finite)")
        return delta

    def delta_for_weight(self, key: str) -> torch.Tensor | None:
        """The delta for a state-dict key `<module>.weight`, else None."""
        return self.delta(key[: -len(".weight")]) if key.endswith(".weight") else None


def merge_lora(weight: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """W + delta computed in fp32 (the caller decides the storage dtype)."""
    w = weight.float()
    return w if delta is None else w + delta


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _PthTensor:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_meta(storage: _StorageRef, offset: int, size, stride, *_rest) -> _PthTensor:  # type: ignore[no-untyped-def]
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor without a storage")
    return _PthTensor(storage, offset, tuple(size), tuple(stride))  # sizes checked by PthFile._check


# storage classes torch.save names in its pickle -> element dtype
_PTH_STORAGES = {
    "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _PthMetaUnpickler(pickle.Unpickler):
    """Unpickles a torch.save state_dict into tensor descriptions only (an allow-list, like weights_only)."""

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_meta
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _PTH_STORAGES:
            return _PTH_STORAGES[name]
        raise pickle.UnpicklingError(f"unsupported object {module}.{name}")

    def persistent_load(self, pid):  # type: ignore[no-untyped-def]
        _, dtype, key, _location, numel = pid  # ("storage", storage class, key, location, numel)
        if not isinstance(dtype, torch.dtype) or isinstance(numel, bool) or not isinstance(numel, int):
            raise pickle.UnpicklingError("malformed storage reference")
        return _StorageRef(str(key), dtype, numel)


class PthFile(Mapping[str, torch.Tensor]):
    """A torch.save state_dict (.pth, zip format) read one tensor at a time with pread.

    `torch.load(mmap=True)` maps the whole file: touched pages count in RSS until the handle closes
    (11 GB for umT5-XXL). Here each `pth[key]` reads just that tensor into its own buffer.
        pth = PthFile("models_t5_umt5-xxl-enc-bf16.pth"); dtype, shape = pth.info("norm.weight")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = require_file(path, "torch checkpoint", CheckpointError, missing=f"{path}: file is missing")
        try:
            with zipfile.ZipFile(self.path) as zf:
                records = {i.filename: i for i in zf.infolist()}
                pkl = next((n for n in records if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if pkl is None:
                    raise CheckpointError(f"{self.path}: not a torch.save checkpoint (no data.pkl)")
                obj = _PthMetaUnpickler(io.BytesIO(zf.read(pkl))).load()
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file is missing") from None
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a readable torch state_dict ({first_line(e)})") from None
        if not isinstance(obj, Mapping) or not all(isinstance(v, _PthTensor) for v in obj.values()):
            raise CheckpointError(f"{self.path}: not a plain state_dict of tensors")
        self._tensors: dict[str, _PthTensor] = dict(obj)
        self._records = records
        self._prefix = pkl[: -len("data.pkl")]
        for key, t in self._tensors.items():
            self._check(key, t)

    def _check(self, key: str, t: _PthTensor) -> None:
        """Refuse a storage or view the file cannot back: bogus dtype, negative or impossible sizes."""
        st = t.storage
        if not isinstance(st.dtype, torch.dtype) or st.dtype not in _PTH_STORAGES.values():
            raise CheckpointError(f"{self.path}: tensor {key!r} has an unsupported storage type")
        ints = (st.numel, t.offset, *t.shape, *t.stride)
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in ints) or len(t.shape) != len(t.stride):
            raise CheckpointError(f"{self.path}: tensor {key!r} has a negative or malformed size")
        rec = self._records.get(f"{self._prefix}data/{st.key}")
        if rec is None:
            raise CheckpointError(f"{self.path}: storage of {key!r} is missing (truncated file?)")
        if rec.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: storage of {key!r} is compressed; torch.save never does that")
        if st.numel * st.dtype.itemsize > rec.file_size:
            raise CheckpointError(f"{self.path}: storage of {key!r} claims {st.numel} elements but holds "
                                  f"{rec.file_size} bytes")
        if math.prod(t.shape) and t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) >= st.numel:
            raise CheckpointError(f"{self.path}: tensor {key!r} reaches past the end of its storage")

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        rec = self._records.get(f"{self._prefix}data/{t.storage.key}")
        if rec is None:
            raise CheckpointError(f"{self.path}: storage of {key!r} is missing (truncated file?)")
        with open(self.path, "rb") as f:  # the zip local header: 30 bytes, then name and extra field
            f.seek(rec.header_offset)
            head = f.read(30)
        if len(head) < 30:
            raise CheckpointError(f"{self.path}: truncated")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = rec.header_offset + 30 + name_len + extra_len
        storage = read_tensor(TensorInfo(self.path, t.storage.dtype, (t.storage.numel,), start, t.storage.numel * t.storage.dtype.itemsize))
        if t.offset == 0 and math.prod(t.shape) == t.storage.numel and storage.reshape(t.shape).stride() == t.stride:
            return storage.reshape(t.shape)
        return storage.as_strided(t.shape, t.stride, t.offset).clone()  # a view into a larger storage

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of one tensor without reading it."""
        t = self._tensors[key]
        return t.storage.dtype, t.shape


def load_pth(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A plain torch state_dict (.pth), loaded safely (weights_only) and lazily (mmap)."""
    path = require_file(path, "torch checkpoint", CheckpointError, missing=f"{path}: file is missing")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for corrupt files
        raise CheckpointError(f"{path}: not a readable torch state_dict ({type(e).__name__})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a plain state_dict of tensors")
    return dict(sd)


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """state_dict key -> shape of a (possibly meta-built) module."""
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def check_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(f"{source}: missing tensor {key!r}")
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {list(found[key])}, the model expects {list(shape)}")
    extra = [k for k in found if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} (not part of the model)")


def materialize_strict(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill a meta-built module from `tensors`: every key consumed, every shape checked.

    Floating tensors are cast to `dtype` when given. Non-finite values raise CheckpointError.
        model = materialize_strict(meta_model, load_pth(p), source=str(p), dtype=torch.float32)
    """
    check_keys(expected_shapes(module), {k: tuple(v.shape) for k, v in tensors.items()}, source)
    ready = {}
    for key, t in tensors.items():
        if t.is_floating_point():
            if dtype is not None:
                t = t.to(dtype)
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{source}: tensor {key!r} contains NaN or Inf")
        ready[key] = t
    module.load_state_dict(ready, strict=True, assign=True)
    return module

