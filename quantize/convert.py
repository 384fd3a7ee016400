"""`liveavatar-lite quantize`: upstream checkpoint -> artifact, one tensor at a time, resumable.

Stages: validate source (keys, shapes, LoRA targets) -> plan every file's layout -> write the files
that are not already finished (a job file in OUT_DIR records each finished file's sha256; on a re-run
with the same arguments a file is skipped only if its bytes still hash to that) -> manifest.json
last. Output bytes depend only on the inputs and options, so a resumed run equals an uninterrupted one.

    manifest = convert(ConvertOptions(Path("Wan2.2-S2V-14B"), Path("out"), QuantType.INT8))
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from liveavatar_lite.artifact.checkpoint import (
    CheckpointDir,
    LoraWeights,
    PthFile,
    check_keys,
    expected_shapes,
    merge_lora,
)
from liveavatar_lite.artifact.format import (
    DTYPE_CODES,
    MANIFEST_FILE,
    FileLayout,
    Manifest,
    QuantSettings,
    TensorEntry,
    TensorSpec,
    UnitEntry,
    file_digests,
    file_entries,
    layout_file,
    write_manifest,
)
from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.config import PRESETS, ModelPreset, preset_for_dit
from liveavatar_lite.errors import CheckpointError, UserError

from .policy import DIT_KEEP, T5_KEEP, Policy
from .quantizers import quantize_tensor
from .source import DitSource, ReadAhead, check_finite, source_identity, weight_shapes
from .writer import DiskFullError, UnitFileWriter, copy_tree, tree_digest, write_bytes_file

log = logging.getLogger(__name__)

COMPONENTS = ("dit", "t5", "vae", "audio", "tokenizer")
JOB_FILE = ".quantize-job.json"
UNITS_DIR = "units"
T5_FILE = "t5/umt5_encoder.safetensors"
VAE_FILE = "vae/wan21_vae.safetensors"
VAE_ONNX = "vae/decoder.onnx"
AUDIO_DIR = "wav2vec2"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides the output bytes, plus how to run (progress, force)."""

    ckpt_dir: Path
    out_dir: Path
    format: QuantType
    lora: Path | None = None
    group_size: int = 128
    keep_bf16: tuple[str, ...] = ()
    t5: QuantType = QuantType.INT8
    components: tuple[str, ...] = COMPONENTS
    overrides: tuple[tuple[str, QuantType], ...] = ()  # per-key formats chosen by --target-size
    target_size_gb: float | None = None
    measurement_sha256: str | None = None
    vae_onnx: bool = True
    force: bool = False
    progress: bool = True


@dataclass
class _Job:
    """The resume record: which files are finished, and the digests they had when finished.

    `done` holds each finished file's sha256 (a folder's `tree_digest`), `fast` its xxh3-128 (the
    manifest's load-time checksum); a record without `fast` (written before format version 2) gets
    it when the finished file is re-hashed on resume.
    """

    path: Path
    fingerprint: str
    done: dict[str, str]
    fast: dict[str, str] = dataclasses.field(default_factory=dict)

    def save(self) -> None:
        body = {"fingerprint": self.fingerprint, "done": dict(sorted(self.done.items())),
                "fast": dict(sorted(self.fast.items()))}
        write_bytes_file(self.path, (json.dumps(body, indent=1) + "\n").encode())

    def record(self, rel: str, sha: str, fast: str | None = None) -> None:
        self.done[rel] = sha
        if fast is not None:
            self.fast[rel] = fast
        self.save()

    def finished(self, rel: str, digest: Callable[[], str]) -> bool:
        return rel in self.done and digest() == self.done[rel]

    def finished_file(self, rel: str, path: Path) -> bool:
        """Whether `path` is finished: it still hashes to the recorded sha256 (its xxh3 is noted on the way)."""
        if rel not in self.done or not path.is_file():
            return False
        sha, fast = file_digests(path)
        if sha != self.done[rel]:
            return False
        self.fast[rel] = fast
        return True


def _preset_for(ck: CheckpointDir) -> ModelPreset:
    """The preset whose DiT matches the checkpoint (gives the T5/VAE configs); the 14B one otherwise."""
    return preset_for_dit(ck.dit_config, default=PRESETS["14b"])


def _prepare_out_dir(out: Path, fingerprint: str, force: bool) -> tuple[_Job, bool]:
    """The job record to use, and whether OUT_DIR started fresh (then a failure removes what we wrote).

    The job file is written before any other output, so a killed run is always recognised as ours.
    """
    job = _Job(out / JOB_FILE, fingerprint, {})
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    # hidden files other than the job record are our own temp files (or editor litter): not "content"
    entries = [p for p in out.iterdir() if not p.name.startswith(".") or p.name == JOB_FILE]
    if not entries:
        job.save()
        return job, True
    if job.path.exists():
        old = _read_job(job.path)
        if old is None and not force:
            raise UserError(f"{out}: its resume record {JOB_FILE} is unreadable (damaged?); "
                            "use --force to redo the conversion")
        if old is not None and old["fingerprint"] == fingerprint:
            log.info("resuming the conversion in %s", out)
            job.done, job.fast = old["done"], old["fast"]
            return job, False
        if not force:
            raise UserError(f"{out}: holds a conversion made with other inputs or options (use --force to redo it)")
    elif not force:
        raise UserError(f"{out}: not empty and not a liveavatar-lite conversion (choose an empty OUT_DIR or --force)")
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # --force: the old artifact stops being loadable first
    job.save()
    return job, False


def _read_job(path: Path) -> dict | None:
    """The job record as {"fingerprint": str, "done": {rel: str}, "fast": {rel: str}}, or None if damaged."""
    try:
        old = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), str):
        return None
    maps = [old.get("done", {}), old.get("fast", {})]
    if not all(isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
               for m in maps):
        return None
    return {"fingerprint": old["fingerprint"], "done": dict(maps[0]), "fast": dict(maps[1])}


# The unit files' bytes have not changed since format version 1 (version 2 only added checksums to
# the manifest), so the fingerprint keeps 1: re-running quantize over a version-1 artifact reuses
# every file and rewrites just the manifest.
UNIT_LAYOUT_VERSION = 1


def _fingerprint(opts: ConvertOptions, identity: dict) -> str:
    body = {
        "format_version": UNIT_LAYOUT_VERSION, "source": identity, "format": opts.format.value,
        "group_size": opts.group_size, "keep_bf16": list(opts.keep_bf16), "t5": opts.t5.value,
        "components": sorted(opts.components), "overrides": [(k, q.value) for k, q in opts.overrides],
        "vae_onnx": opts.vae_onnx,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _specs(keys: list[str], policy: Policy, info: Callable[[str], tuple[torch.dtype, tuple[int, ...]]]) -> list[TensorSpec]:
    out = []
    for k in keys:
        dtype, shape = info(k)
        qtype, group = policy.decide(k, shape)
        out.append(TensorSpec(k, qtype, shape, group, DTYPE_CODES[dtype]))
    return out


class _Progress:
    """tqdm bar over source bytes, with tensors done and GB/s; silent when disabled."""

    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="quantize",
                        disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.tensors, self.total_tensors = 0, total_tensors

    def tensor_done(self, nbytes: int) -> None:
        self.tensors += 1
        self.bar.set_postfix_str(f"tensors {self.tensors}/{self.total_tensors}", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def convert(opts: ConvertOptions) -> Manifest:
    """Run the conversion; returns the manifest written to OUT_DIR/manifest.json."""
    unknown = sorted(set(opts.components) - set(COMPONENTS))
    if unknown or not opts.components:
        raise UserError(f"--components: unknown {unknown} (choose from {','.join(COMPONENTS)})")
    ck = CheckpointDir(opts.ckpt_dir)
    preset = _preset_for(ck)
    src = DitSource(ck)
    if "dit" in opts.components:
        src.validate()
    lora = None
    if opts.lora is not None:
        if "dit" not in opts.components:
            raise UserError("--lora applies to the DiT: add dit to --components")
        lora = LoraWeights.open(opts.lora, alpha=preset.lora_alpha)
        lora.check_targets(weight_shapes(src.shapes))
    for glob_ in opts.keep_bf16:
        if not any(Policy(opts.format, keep=(), keep_bf16=(glob_,)).is_kept(k) for k in src.shapes):
            log.warning("--keep-bf16 %r matches no DiT tensor", glob_)
    identity = source_identity(ck, opts.lora)
    job, fresh = _prepare_out_dir(opts.out_dir, _fingerprint(opts, dataclasses.asdict(identity)), opts.force)
    try:
        manifest = _convert_into(opts, ck, preset, src, lora, identity, job)
    except DiskFullError:
        raise  # finished files stay (the job record lists them): freeing space and re-running resumes
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the ONNX export, the manifest, a folder copy
            raise DiskFullError(f"disk full while writing {e.filename or opts.out_dir} (free some space and "
                                "re-run the same command to resume; finished files are kept)") from None
        raise
    except UserError:
        if fresh:  # bad input found mid-way: leave OUT_DIR as we found it (empty), nothing half-written
            _remove_outputs(opts.out_dir)
        raise
    return manifest


def _remove_outputs(out: Path) -> None:
    for name in (UNITS_DIR, "t5", "vae", AUDIO_DIR, TOKENIZER_DIR, JOB_FILE, MANIFEST_FILE):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for p in out.glob(".*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _convert_into(opts, ck, preset, src, lora, identity, job) -> Manifest:  # type: ignore[no-untyped-def]
    out = opts.out_dir
    files: list[tuple[str, str, str, int | None, FileLayout, Callable[[TensorEntry], dict[str, torch.Tensor]]]] = []
    read_ahead: ReadAhead | None = None

    if "dit" in opts.components:
        policy = Policy(opts.format, opts.group_size, DIT_KEEP, opts.keep_bf16, dict(opts.overrides))

        def info(k: str) -> tuple[torch.dtype, tuple[int, ...]]:
            i = ck.dit_tensor_info(k)
            return i.dtype, tuple(i.shape)

        def load_dit(key: str) -> torch.Tensor:
            t = ck.read_dit_tensor(key)
            check_finite(key, t, str(ck.path))
            delta = lora.delta_for_weight(key) if lora is not None else None  # CheckpointError if not finite
            if delta is None:
                return t
            merged = merge_lora(t, delta)  # LoRA merged in fp32, then quantized
            check_finite(key, merged, f"{lora.path} merged into {ck.path}")  # an overflow of W + delta
            return merged

        def produce_dit(entry: TensorEntry) -> dict[str, torch.Tensor]:
            assert read_ahead is not None
            return quantize_tensor(entry.qtype, read_ahead.get(entry.name), entry.group_size)

        units, resident = src.units()
        for name, index, keys in units:
            files.append((name, f"{UNITS_DIR}/{name}.safetensors", "dit_block", index,
                          layout_file(_specs(keys, policy, info), name), produce_dit))
        files.append(("resident", f"{UNITS_DIR}/resident.safetensors", "dit_resident", None,
                      layout_file(_specs(resident, policy, info), "resident"), produce_dit))

    vae_sd = None
    for comp, rel, qtype, keep, load, build in (
        ("t5", T5_FILE, opts.t5, T5_KEEP, lambda: PthFile(ck.t5_path), _t5_shapes),
        ("vae", VAE_FILE, QuantType.FP32, (), lambda: PthFile(ck.vae_path), _vae_shapes),
    ):
        if comp not in opts.components:
            continue
        sd = load()  # tensors are read one at a time (pread) when produced: RSS stays at one tensor
        check_keys(build(preset), {k: sd.info(k)[1] for k in sd}, str(ck.t5_path if comp == "t5" else ck.vae_path))
        pol = Policy(qtype, opts.group_size, keep, passthrough=QuantType.BF16 if comp == "t5" else QuantType.FP32)
        specs = _specs(list(sd), pol, sd.info)

        def produce(entry: TensorEntry, sd=sd, where=comp) -> dict[str, torch.Tensor]:
            t = sd[entry.name]
            check_finite(entry.name, t, where)
            return quantize_tensor(entry.qtype, t.float() if entry.qtype.is_quantized else t, entry.group_size)

        files.append((comp, rel, comp, None, layout_file(specs, comp), produce))
        if comp == "vae":
            vae_sd = sd

    total_bytes = sum(_source_nbytes(layout) for *_, layout, _ in files)
    total_tensors = sum(len(layout.tensors) for *_, layout, _ in files)
    progress = _Progress(total_bytes, total_tensors, opts.progress)
    finished = {rel for _, rel, *_ in files if job.finished_file(rel, out / rel)}
    todo_keys = [t.name for _, rel, kind, _, layout, _ in files if kind.startswith("dit") and rel not in finished
                 for t in layout.tensors]
    read_ahead = ReadAhead(load_dit, todo_keys) if "dit" in opts.components else None
    try:
        with UnitFileWriter() as writer:
            for name, rel, kind, index, layout, produce in files:
                if rel in finished:
                    progress.bar.update(_source_nbytes(layout))
                    progress.tensors += len(layout.tensors)
                else:  # the writer thread records the sha256 in the job file once the file is renamed
                    writer.write(out / rel, layout, produce,
                                 on_tensor=lambda e: progress.tensor_done(_entry_source_nbytes(e)),
                                 on_done=lambda sha, fast, rel=rel: job.record(rel, sha, fast))
    finally:
        progress.close()
        if read_ahead is not None:
            read_ahead.close()
    unit_entries = [UnitEntry(name, rel, kind, index, len(layout.header), layout.data_nbytes, job.done[rel],
                              layout.tensors, xxh3_128=job.fast[rel]) for name, rel, kind, index, layout, _ in files]

    paths: dict[str, str] = {}
    for comp, rel, src_dir in (("audio", AUDIO_DIR, ck.wav2vec_dir), ("tokenizer", TOKENIZER_DIR, ck.tokenizer_dir)):
        if comp not in opts.components:
            continue
        if not src_dir.is_dir():
            raise CheckpointError(f"{src_dir}: missing (needed for --components {comp})")
        if not job.finished(rel, lambda rel=rel: tree_digest(out / rel) if (out / rel).is_dir() else ""):
            job.done[rel] = copy_tree(src_dir, out / rel)
            job.save()
        paths[f"{comp}_dir"] = rel
    if vae_sd is not None and opts.vae_onnx:
        paths["vae_onnx"] = _export_vae_onnx(out, preset, vae_sd, job)
    # checksums of every non-unit file, which loaders verify before use (re-read: ~12 GB/s, 1.3 GB here)
    files_checked = tuple(e for rel in sorted(paths.values()) for e in file_entries(out, rel))

    manifest = Manifest(
        dit=ck.dit_config, source=identity,
        quant=QuantSettings(format=opts.format.value, group_size=opts.group_size, keep_bf16=tuple(opts.keep_bf16),
                            t5=opts.t5.value if "t5" in opts.components else None,
                            target_size_gb=opts.target_size_gb, measurement_sha256=opts.measurement_sha256,
                            lora_alpha=lora.alpha if lora is not None else None),
        units=tuple(unit_entries), components=tuple(c for c in COMPONENTS if c in opts.components), paths=paths,
        files=files_checked,
    )
    write_manifest(out, manifest)  # last: only now is the directory an artifact
    return manifest


def _export_vae_onnx(out: Path, preset: ModelPreset, sd: Mapping[str, torch.Tensor], job: _Job) -> str:
    """The VAE decoder as ONNX (helper "vae"'s exporter), fp16 graph for the GPU runtime."""
    path = out / VAE_ONNX
    if job.finished_file(VAE_ONNX, path):
        return VAE_ONNX
    from liveavatar_lite.artifact.checkpoint import materialize_strict
    from liveavatar_lite.decode.vae_export import export_decoder
    from liveavatar_lite.model.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(preset.vae)
    materialize_strict(vae, sd, source="Wan2.1_VAE.pth", dtype=torch.float32)
    export_decoder(vae, path, dtype="fp16")
    job.record(VAE_ONNX, *file_digests(path))
    return VAE_ONNX


def _t5_shapes(preset: ModelPreset) -> dict[str, tuple[int, ...]]:
    from liveavatar_lite.model.t5 import UMT5Encoder

    with torch.device("meta"):
        return expected_shapes(UMT5Encoder(preset.t5))


def _vae_shapes(preset: ModelPreset) -> dict[str, tuple[int, ...]]:
    from liveavatar_lite.model.vae import WanVAE

    with torch.device("meta"):
        return expected_shapes(WanVAE(preset.vae))


def _entry_source_nbytes(e: TensorEntry) -> int:
    from liveavatar_lite.artifact.format import CODE_DTYPES

    n = 1
    for s in e.logical_shape:
        n *= s
    return n * CODE_DTYPES[e.source_dtype].itemsize


def _source_nbytes(layout: FileLayout) -> int:
    return sum(_entry_source_nbytes(e) for e in layout.tensors)
