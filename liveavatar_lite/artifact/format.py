"""The liveavatar-lite artifact, in code: the only module that reads or writes its layout (docs/FORMAT.md).

API (runtime side):
    m = read_manifest(dir)                       # Manifest; ArtifactError if absent/incomplete/unknown version
    m.units                                      # tuple[UnitEntry]: "block_000".."block_039", "resident", "t5", "vae"
    m.unit("block_003").tensors                  # tuple[TensorEntry]: name, qtype, logical_shape, group_size, parts
    buf, views = read_unit(dir, "block_003", manifest=m, out=None, pin=False, verify=False)
        # buf: ONE contiguous uint8 tensor = the file's data section (64-byte aligned parts; pass `out=` a
        #      pinned uint8 tensor of >= unit.data_nbytes to fill it instead of allocating)
        # views: {logical tensor name: TensorView}; views[k].parts(buf) -> {role: zero-copy typed Tensor}
        #        views[k].dequantize(buf, dtype) -> the logical weight (qtypes.dequantize)
    path = unit_path(dir, m.unit("vae"))          # for readers that want safe_open on the file

    verify_files(dir, m)                         # ArtifactError naming the first changed/extra file
                                                 # (decoder.onnx, wav2vec2/, tokenizer/) before use

API (writer side, used by quantize/):
    layout = layout_file(specs, unit_name)       # FileLayout: header bytes + TensorEntry offsets
    entries = file_entries(dir, "wav2vec2")      # FileEntry (path, size, xxh3_128) per file under it
    write_manifest(dir, manifest)                # temp file + rename; call it LAST

Checksums: every unit records the sha256 AND the xxh3-128 of its whole file; every other file the
xxh3-128. Loaders verify the xxh3 while the bytes are read anyway (~12 GB/s on one core here,
sha256 1.2 GB/s: docs/FORMAT.md); `inspect --verify` checks both.

Each unit file is a valid safetensors file whose header length makes the data section start at a
multiple of 64 bytes, and whose parts all start at multiples of 64 (gaps are filled with
`__pad_<n>__` uint8 tensors, which the manifest does not list).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DiTConfig
from ..errors import ArtifactError, first_line
from ..fileio import contained_path, read_json, write_bytes_atomic
from .checkpoint import SAFETENSORS_DTYPES
from .qtypes import QuantType, dequantize, part_specs

FORMAT_NAME = "liveavatar-lite"
FORMAT_VERSION = 2  # 2: fast checksums of every unit and every other file (units unchanged since 1)
READABLE_VERSIONS = (1, 2)  # version 1 is read (inspect), but generate asks for a re-quantize (no checksums)
MANIFEST_FILE = "manifest.json"
ALIGN = 64  # bytes: every part starts at a multiple of this inside the data section and in the file
PAD_PREFIX = "__pad_"

# safetensors header code <-> torch dtype (one table for checkpoints and artifacts)
CODE_DTYPES: dict[str, torch.dtype] = SAFETENSORS_DTYPES
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


# ------------------------------------------------------------------------------------------ entries

@dataclass(frozen=True)
class StoredPart:
    """One stored tensor: `role` of a logical tensor, at `offset` bytes into its file's data section."""

    role: str
    name: str  # the key in the safetensors header
    dtype: str  # safetensors code, e.g. "I8"
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return CODE_DTYPES[self.dtype]


@dataclass(frozen=True)
class TensorEntry:
    """One logical tensor (a checkpoint key) and how it is stored."""

    name: str
    qtype: QuantType
    logical_shape: tuple[int, ...]
    group_size: int | None
    source_dtype: str  # safetensors code of the source tensor
    parts: tuple[StoredPart, ...]

    def part(self, role: str) -> StoredPart:
        for p in self.parts:
            if p.role == role:
                return p
        raise KeyError(f"{self.name} has no {role!r} part")

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass(frozen=True)
class UnitEntry:
    """One file of the artifact: a DiT block (+ its audio injector), the resident set, T5 or the VAE."""

    name: str  # "block_007", "resident", "t5", "vae"
    file: str  # path relative to the artifact directory
    kind: str  # "dit_block" | "dit_resident" | "t5" | "vae"
    block_index: int | None
    header_nbytes: int  # = file offset of the data section (a multiple of ALIGN)
    data_nbytes: int  # size of the data section (a multiple of ALIGN)
    sha256: str  # of the whole file
    tensors: tuple[TensorEntry, ...]
    xxh3_128: str | None = None  # of the whole file (format version >= 2): checked while a loader reads it

    @property
    def file_nbytes(self) -> int:
        return self.header_nbytes + self.data_nbytes

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"unit {self.name} has no tensor {name!r}")


@dataclass(frozen=True)
class FileEntry:
    """A file of the artifact that is not a unit (the ONNX decoder, wav2vec2/ and tokenizer/ files)."""

    path: str  # relative to the artifact directory, POSIX separators
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class SourceFile:
    name: str  # relative to the checkpoint directory (or the LoRA file's name)
    size: int


@dataclass(frozen=True)
class SourceIdentity:
    """Which checkpoint the artifact was made from: shard names and sizes, config/index hashes."""

    files: tuple[SourceFile, ...]
    config_sha256: str
    index_sha256: str | None
    lora: SourceFile | None = None
    lora_sha256: str | None = None


@dataclass(frozen=True)
class QuantSettings:
    """The converter options that shaped the bytes (recorded so `inspect` can show them)."""

    format: str
    group_size: int
    keep_bf16: tuple[str, ...] = ()
    t5: str | None = None
    target_size_gb: float | None = None
    measurement_sha256: str | None = None
    lora_alpha: float | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything a loader needs to know about an artifact directory."""

    dit: DiTConfig
    source: SourceIdentity
    quant: QuantSettings
    units: tuple[UnitEntry, ...]
    components: tuple[str, ...]  # which of dit, t5, vae, audio, tokenizer were converted
    paths: dict[str, str] = field(default_factory=dict)  # "audio_dir", "tokenizer_dir", "vae_onnx" -> rel path
    format_version: int = FORMAT_VERSION
    files: tuple[FileEntry, ...] = ()  # every file under `paths`, with its checksum (version >= 2)

    def unit(self, name: str) -> UnitEntry:
        for u in self.units:
            if u.name == name:
                return u
        raise ArtifactError(f"artifact has no unit {name!r}")

    @property
    def block_units(self) -> tuple[UnitEntry, ...]:
        return tuple(sorted((u for u in self.units if u.kind == "dit_block"), key=lambda u: u.block_index or 0))

    @property
    def total_nbytes(self) -> int:
        return sum(u.file_nbytes for u in self.units)


def block_unit_name(i: int) -> str:
    return f"block_{i:03d}"


# ------------------------------------------------------------------------------------------ layout

@dataclass(frozen=True)
class TensorSpec:
    """What the writer will store for one logical tensor (before offsets are known)."""

    name: str
    qtype: QuantType
    logical_shape: tuple[int, ...]
    group_size: int | None
    source_dtype: str


@dataclass(frozen=True)
class FileLayout:
    """The exact bytes of a unit file's header and where every part goes in its data section."""

    header: bytes  # 8-byte length + JSON, padded with spaces to a multiple of ALIGN
    tensors: tuple[TensorEntry, ...]
    pads: tuple[tuple[int, int], ...]  # (offset, nbytes) of each zero pad, in the data section
    data_nbytes: int

    def writes(self) -> list[tuple[str, TensorEntry | None, StoredPart | None, int]]:
        """Data-section writes in file order: ("part", entry, part, nbytes) or ("pad", None, None, nbytes)."""
        items: list[tuple[int, str, TensorEntry | None, StoredPart | None, int]] = []
        for t in self.tensors:
            items += [(p.offset, "part", t, p, p.nbytes) for p in t.parts]
        items += [(off, "pad", None, None, n) for off, n in self.pads]
        return [(kind, t, p, n) for _, kind, t, p, n in sorted(items, key=lambda x: x[0])]


def part_name(tensor: str, role: str) -> str:
    """Header key of a part: the logical name for "data", `<name>.<role>` for the others."""
    return tensor if role == "data" else f"{tensor}.{role}"


def layout_file(specs: Sequence[TensorSpec], unit_name: str) -> FileLayout:
    """Place every part of `specs` (in order) at 64-byte aligned offsets; build the header bytes.

        layout = layout_file([TensorSpec("w", QuantType.INT8, (8, 64), None, "BF16")], "block_000")
    """
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                                               "unit": unit_name}}
    entries, pads, seen = [], [], set()
    offset = 0
    for spec in specs:
        parts = []
        for ps in part_specs(spec.qtype, spec.logical_shape, spec.group_size):
            name = part_name(spec.name, ps.role)
            if name in seen or name.startswith(PAD_PREFIX):
                raise ValueError(f"duplicate or reserved tensor name {name!r} in unit {unit_name}")
            seen.add(name)
            parts.append(StoredPart(ps.role, name, DTYPE_CODES[ps.dtype], ps.shape, offset, ps.nbytes))
            header[name] = {"dtype": DTYPE_CODES[ps.dtype], "shape": list(ps.shape),
                            "data_offsets": [offset, offset + ps.nbytes]}
            offset += ps.nbytes
            gap = -offset % ALIGN
            if gap:  # safetensors wants the data section covered without holes: fill gaps with pad tensors
                pads.append((offset, gap))
                header[f"{PAD_PREFIX}{len(pads)}__"] = {"dtype": "U8", "shape": [gap],
                                                        "data_offsets": [offset, offset + gap]}
                offset += gap
        entries.append(TensorEntry(spec.name, spec.qtype, tuple(spec.logical_shape), spec.group_size,
                                   spec.source_dtype, tuple(parts)))
    raw = json.dumps(header, separators=(",", ":")).encode()
    n = len(raw) + (-(8 + len(raw)) % ALIGN)  # header length so that 8 + n is a multiple of ALIGN
    header_bytes = n.to_bytes(8, "little") + raw + b" " * (n - len(raw))
    return FileLayout(header_bytes, tuple(entries), tuple(pads), offset)


# ------------------------------------------------------------------------------------------ manifest I/O

def _to_json(m: Manifest) -> dict[str, Any]:
    d = asdict(m)
    d = {"format": FORMAT_NAME, **d}
    for u in d["units"]:
        for t in u["tensors"]:
            t["qtype"] = QuantType(t["qtype"]).value
    return d


def _tuple(x: Any) -> Any:
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def _from_json(d: dict[str, Any]) -> Manifest:
    dit = DiTConfig(**{k: _tuple(v) for k, v in d["dit"].items()})
    src = d["source"]
    source = SourceIdentity(
        files=tuple(SourceFile(**f) for f in src["files"]),
        config_sha256=src["config_sha256"],
        index_sha256=src["index_sha256"],
        lora=SourceFile(**src["lora"]) if src.get("lora") else None,
        lora_sha256=src.get("lora_sha256"),
    )
    quant = QuantSettings(**{k: _tuple(v) for k, v in d["quant"].items()})
    units = []
    for u in d["units"]:
        tensors = tuple(
            TensorEntry(
                name=t["name"], qtype=QuantType(t["qtype"]), logical_shape=tuple(t["logical_shape"]),
                group_size=t["group_size"], source_dtype=t["source_dtype"],
                parts=tuple(StoredPart(**{**p, "shape": tuple(p["shape"])}) for p in t["parts"]),
            )
            for t in u["tensors"]
        )
        units.append(_checked_unit(UnitEntry(**{**u, "tensors": tensors})))
    files = tuple(FileEntry(**f) for f in d.get("files", ()))
    return Manifest(dit=dit, source=source, quant=quant, units=tuple(units),
                    components=tuple(d["components"]), paths=dict(d.get("paths", {})),
                    format_version=int(d["format_version"]), files=files)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _checked_unit(u: UnitEntry) -> UnitEntry:
    """ValueError unless every size and offset a reader will use is an integer inside the file."""
    if not (_is_count(u.header_nbytes) and _is_count(u.data_nbytes) and u.header_nbytes >= 8
            and u.header_nbytes % ALIGN == 0 and u.data_nbytes % ALIGN == 0):
        raise ValueError(f"unit {u.name!r} has impossible sizes")
    if not isinstance(u.sha256, str) or (u.xxh3_128 is not None and not isinstance(u.xxh3_128, str)):
        raise ValueError(f"unit {u.name!r} has a malformed checksum")
    for t in u.tensors:
        if not all(_is_count(n) for n in t.logical_shape) or not (t.group_size is None or _is_count(t.group_size)):
            raise ValueError(f"unit {u.name!r}: tensor {t.name!r} has a malformed shape")
        for p in t.parts:
            shape_ok = all(_is_count(n) for n in p.shape)
            if (p.dtype not in CODE_DTYPES or not shape_ok or not _is_count(p.offset) or not _is_count(p.nbytes)
                    or p.nbytes != math.prod(p.shape) * CODE_DTYPES[p.dtype].itemsize
                    or p.offset + p.nbytes > u.data_nbytes):
                raise ValueError(f"unit {u.name!r}: part {p.name!r} does not fit its file")
    return u


def manifest_bytes(m: Manifest) -> bytes:
    """The exact bytes of manifest.json (deterministic: same manifest, same bytes)."""
    return (json.dumps(_to_json(m), indent=1) + "\n").encode()


def write_manifest(directory: str | os.PathLike[str], m: Manifest) -> Path:
    """Write manifest.json via a temp file + fsync + rename. Call it after every unit file is final."""
    path = Path(directory) / MANIFEST_FILE
    return write_bytes_atomic(path, manifest_bytes(m), tmp=path.with_name(f".{MANIFEST_FILE}.tmp"))


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Parse and validate manifest.json; refuse missing, foreign or unknown-version artifacts.

        m = read_manifest("artifact/"); [u.name for u in m.block_units]
    """
    path = Path(directory) / MANIFEST_FILE
    d = read_json(path, ArtifactError, missing=f"{directory}: no {MANIFEST_FILE} (not an artifact, or an unfinished conversion)")
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a {FORMAT_NAME} manifest")
    if d.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path}: unknown format version {d.get('format_version')!r} (this liveavatar-lite reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; re-run `liveavatar-lite quantize` with this version)"
        )
    try:
        m = _from_json(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path}: malformed manifest ({type(e).__name__}: {first_line(e)})") from None
    # every name read back from the manifest must stay inside the artifact directory
    root = Path(directory)
    for name in [u.file for u in m.units] + list(m.paths.values()) + [f.path for f in m.files]:
        contained_path(root, name, str(path), ArtifactError)
    return m


# ------------------------------------------------------------------------------------------ unit reading

@dataclass(frozen=True)
class TensorView:
    """Where one logical tensor's parts are inside a unit buffer."""

    entry: TensorEntry

    def parts(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """role -> typed tensor viewing `buf` (no copy)."""
        out = {}
        for p in self.entry.parts:
            raw = buf[p.offset:p.offset + p.nbytes]  # uint8 [nbytes]
            out[p.role] = raw.view(p.torch_dtype).reshape(p.shape)
        return out

    def dequantize(self, buf: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        e = self.entry
        return dequantize(e.qtype, self.parts(buf), e.logical_shape, e.group_size, dtype)


def unit_path(directory: str | os.PathLike[str], unit: UnitEntry) -> Path:
    return Path(directory) / unit.file


def read_unit(
    directory: str | os.PathLike[str],
    unit: str | UnitEntry,
    manifest: Manifest | None = None,
    out: torch.Tensor | None = None,
    pin: bool = False,
    verify: bool = False,
) -> tuple[torch.Tensor, dict[str, TensorView]]:
    """Read one unit's data section into ONE contiguous uint8 buffer; return it with per-tensor views.

        buf, views = read_unit("artifact", "block_000"); w = views["blocks.0.ffn.0.weight"].dequantize(buf)
    """
    if isinstance(unit, str):
        unit = (manifest or read_manifest(directory)).unit(unit)
    path = unit_path(directory, unit)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ArtifactError(f"{path}: unit file is missing") from None
    if size != unit.file_nbytes:
        raise ArtifactError(f"{path}: {size} bytes, the manifest says {unit.file_nbytes}")
    if verify and unit.xxh3_128 is None and not unit.sha256:
        raise ArtifactError(f"{path}: the manifest records no checksum for it")
    if out is None:
        buf = torch.empty(unit.data_nbytes, dtype=torch.uint8, pin_memory=pin)
    else:
        if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < unit.data_nbytes or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous 1-D uint8 tensor of >= {unit.data_nbytes} bytes")
        buf = out[:unit.data_nbytes]
    # xxh3 where the manifest has it (version 2), else sha256; hashed as the bytes arrive, no re-read
    digest = (fast_hasher() if unit.xxh3_128 is not None else hashlib.sha256()) if verify else None
    expected = unit.xxh3_128 if unit.xxh3_128 is not None else unit.sha256
    with open(path, "rb", buffering=0) as f:
        header = f.read(unit.header_nbytes)
        if len(header) != unit.header_nbytes or int.from_bytes(header[:8], "little") + 8 != unit.header_nbytes:
            raise ArtifactError(f"{path}: header does not match the manifest")
        if digest:
            digest.update(header)
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < unit.data_nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ArtifactError(f"{path}: truncated")
            done += n
    if digest:
        digest.update(view)
        if digest.hexdigest() != expected:
            raise ArtifactError(f"{path}: checksum mismatch (changed or corrupt since quantize); "
                                f"re-run `liveavatar-lite quantize` into {directory} to repair it")
    return buf, {t.name: TensorView(t) for t in unit.tensors}


def fast_hasher() -> Any:
    """A fresh xxh3-128 hasher (`update(bytes)`, `hexdigest()`): the artifact's load-time checksum."""
    import xxhash

    return xxhash.xxh3_128()


def _hash_file(path: str | os.PathLike[str], *hashers: Any, chunk: int = 16 << 20) -> tuple[str, ...]:
    """Feed a whole file, read once in chunks (bounded memory), to every hasher; their hex digests."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(view):
            for h in hashers:
                h.update(view[:n])
    return tuple(h.hexdigest() for h in hashers)


def file_digests(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(sha256, xxh3_128) of a whole file, in one read."""
    sha, fast = _hash_file(path, hashlib.sha256(), fast_hasher())
    return sha, fast


def file_xxh3(path: str | os.PathLike[str]) -> str:
    """xxh3-128 of a whole file."""
    return _hash_file(path, fast_hasher())[0]


def _files_under(root: Path, rel: str) -> list[str]:
    """Every file below `root / rel` (or `rel` itself when it is a file), relative to `root`, sorted."""
    top = root / rel
    if not top.is_dir():
        return [rel]
    return sorted(p.relative_to(root).as_posix() for p in top.rglob("*") if not p.is_dir() or p.is_symlink())


def file_entries(directory: str | os.PathLike[str], rel: str) -> tuple[FileEntry, ...]:
    """FileEntry (path, size, xxh3) for `rel` (a file) or every file below it (a folder), sorted."""
    root = Path(directory)
    return tuple(FileEntry(name, (root / name).stat().st_size, file_xxh3(root / name))
                 for name in _files_under(root, rel))


def verify_files(directory: str | os.PathLike[str], m: Manifest, keys: Sequence[str] | None = None) -> None:
    """Check the files under `m.paths` (all, or those of `keys`) against their recorded checksums.

    ArtifactError (one line, naming the file) for a version-1 artifact (no checksums), a missing,
    resized, changed or non-regular file, or a file the converter did not write (a loader such as
    transformers would pick up an extra weights file). Every byte is read once, at ~12 GB/s.
        verify_files("artifact", m, keys=("vae_onnx", "audio_dir", "tokenizer_dir"))
    """
    root = Path(directory)
    if m.format_version < 2:
        raise ArtifactError(f"{root}: artifact format version {m.format_version} records no checksums for its "
                            "decoder, audio encoder and tokenizer; re-run `liveavatar-lite quantize` into it "
                            "(finished files are reused) or into a new directory")
    listed = {f.path: f for f in m.files}
    for key in keys if keys is not None else tuple(m.paths):
        rel = m.paths.get(key)
        if rel is None:
            continue
        found = _files_under(root, rel) if (root / rel).exists() else []
        expected = sorted(p for p in listed if p == rel or p.startswith(rel.rstrip("/") + "/"))
        for name in found:
            if name not in listed:
                raise ArtifactError(f"{root / name}: not written by quantize (remove it, or re-run quantize "
                                    f"into {root})")
        for name in expected:
            entry, p = listed[name], contained_path(root, name, f"{root / MANIFEST_FILE}", ArtifactError)
            try:
                st = p.stat()
            except FileNotFoundError:
                raise ArtifactError(f"{p}: missing from the artifact; re-run quantize into {root}") from None
            if not stat.S_ISREG(st.st_mode) or p.is_symlink():
                raise ArtifactError(f"{p}: not a regular file")
            if st.st_size != entry.size or file_xxh3(p) != entry.xxh3_128:
                raise ArtifactError(f"{p}: checksum mismatch (changed or corrupt since quantize); "
                                    f"re-run `liveavatar-lite quantize` into {root} to repair it")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a whole file, read in chunks (bounded memory)."""
    return _hash_file(path, hashlib.sha256())[0]


def verify_artifact(directory: str | os.PathLike[str], m: Manifest, checksums: bool = False) -> list[str]:
    """Problems found (empty when sound): missing files, wrong sizes, and with `checksums` wrong sha256."""
    problems = []
    for u in m.units:
        p = unit_path(directory, u)
        if not p.exists():
            problems.append(f"{u.file}: missing")
        elif p.stat().st_size != u.file_nbytes:
            problems.append(f"{u.file}: {p.stat().st_size} bytes, expected {u.file_nbytes}")
        elif checksums and (file_digests(p) if u.xxh3_128 else (file_sha256(p), None)) != (u.sha256, u.xxh3_128):
            problems.append(f"{u.file}: checksum mismatch")
    for key, rel in m.paths.items():
        if not (Path(directory) / rel).exists():
            problems.append(f"{rel} ({key}): missing")
    if m.format_version < 2:
        problems.append(f"format version {m.format_version}: no checksums for {', '.join(m.paths) or 'its files'} "
                        "(re-run quantize into it to add them)")
        return problems
    for f in m.files:
        p = Path(directory) / f.path
        if not p.is_file():
            problems.append(f"{f.path}: missing")
        elif p.stat().st_size != f.size:
            problems.append(f"{f.path}: {p.stat().st_size} bytes, expected {f.size}")
        elif checksums and file_xxh3(p) != f.xxh3_128:
            problems.append(f"{f.path}: checksum mismatch")
    return problems


def summary(m: Manifest) -> dict[str, Any]:
    """Per-unit byte counts and qtype mix, for `liveavatar-lite inspect`."""
    units = []
    for u in m.units:
        mix: dict[str, int] = {}
        for t in u.tensors:
            mix[t.qtype.value] = mix.get(t.qtype.value, 0) + t.nbytes
        units.append({"name": u.name, "kind": u.kind, "file": u.file, "bytes": u.file_nbytes,
                      "tensors": len(u.tensors), "bytes_by_qtype": mix})
    totals: dict[str, int] = {}
    params: dict[str, int] = {}
    for u in m.units:
        for t in u.tensors:
            totals[t.qtype.value] = totals.get(t.qtype.value, 0) + t.nbytes
            params[t.qtype.value] = params.get(t.qtype.value, 0) + math.prod(t.logical_shape)
    return {
        "format_version": m.format_version,
        "components": list(m.components),
        "quant": asdict(m.quant),
        "source": asdict(m.source),
        "units": units,
        "bytes_by_qtype": totals,
        "params_by_qtype": params,
        "total_bytes": m.total_nbytes,
        "paths": dict(m.paths),
    }
