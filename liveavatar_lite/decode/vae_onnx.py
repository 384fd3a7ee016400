"""Streaming Wan VAE decoder on ONNX Runtime: latents chunk in, uint8 RGB frames out, state kept between calls.

    decoder = OnnxVAEDecoder("vae_decoder.onnx")            # CUDA EP when a GPU is present, else CPU
    frames = decoder.decode(latents[:, :1])                  # [16,T,h,w] normalized -> [1+4(T-1),H,W,3] uint8
    frames = decoder.decode(latents[:, 1:4])                 # continues the video: 4 frames per latent
    snapshot = decoder.state(); ...; decoder.load_state(snapshot)   # resume later
    decoder.reset()                                          # next decode() starts a new video

The causal caches live in two banks on the session's device; each call reads one bank and writes
the other (bound with IOBinding), then they swap, so the caches never leave the device. The banks are
torch tensors of exactly their size, bound to the graph by pointer: on a GPU they are counted with
the rest of the process's torch memory (ORT's own binding allocator has no cap and grows its arena
in powers of two: ~4.3 GB reserved for 2.56 GB of caches at 704*384). ORT runs on torch's current
CUDA stream, so it sees the banks' contents without a sync.

`latents_per_call` (from the memory plan) splits every decode into calls of at most that many
latents: a call's working set grows with its latents (1.25 GB for one at 704*384, 3.7 GB for three),
and `gpu_mem_limit` caps what ORT may hold (weights + one call's working set + cuDNN workspace).
The .onnx must come from `liveavatar_lite.vae_export` (its metadata_props are checked).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, UserError

log = logging.getLogger(__name__)

SUPPORTED_FORMAT_VERSION = 1
_META = "liveavatar_lite."
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class OnnxVAEDecoder:
    """ORT session + the decoder's causal state for one video stream (not thread-safe)."""

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        gpu_mem_limit: int | None = None,
        threads: int | None = None,
        device_id: int = 0,
        conv_algo_search: str = "HEURISTIC",
        latents_per_call: int | None = None,
    ) -> None:
        """device: "auto" | "cpu" | "cuda"; gpu_mem_limit: bytes the CUDA EP arena may hold (None = no cap).

        conv_algo_search: the CUDA EP's cuDNN search, "HEURISTIC" (predictable memory, default),
        "EXHAUSTIVE" (may be faster; benchmarks every conv shape once, with extra workspace) or "DEFAULT".
        latents_per_call: split each decode() into graph calls of at most this many latents (None: one call).
        """
        if latents_per_call is not None and latents_per_call < 1:
            raise UserError(f"latents_per_call must be >= 1, got {latents_per_call}")
        self.latents_per_call = latents_per_call
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: VAE decoder .onnx not found (make one with `liveavatar-lite vae export`)")
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {device!r}")
        cuda_ok = "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_present()
        if device == "cuda" and not cuda_ok:
            raise UserError("device cuda requested but no CUDA device / CUDA execution provider is available")
        use_cuda = cuda_ok and device != "cpu"

        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # no CPU arena growth: host memory stays bounded
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers: list = []
        if use_cuda:
            import torch

            cuda_opts = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested",
                         "cudnn_conv_algo_search": conv_algo_search,
                         # cuDNN scratch capped (decoder_memory.CUDNN_WORKSPACE_BYTES), not "as fast as possible"
                         "cudnn_conv_use_max_workspace": "0",
                         # ORT works on torch's stream: ordered after torch's writes to the cache banks
                         "user_compute_stream": str(torch.cuda.current_stream(device_id).cuda_stream)}
            if gpu_mem_limit is not None:
                cuda_opts["gpu_mem_limit"] = int(gpu_mem_limit)
            providers.append(("CUDAExecutionProvider", cuda_opts))
        providers.append("CPUExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise ArtifactError(f"{path}: not a loadable ONNX model ({type(e).__name__})") from None

        meta = self._session.get_modelmeta().custom_metadata_map
        if meta.get(_META + "vae_decoder") != "1":
            raise ArtifactError(f"{path}: not a liveavatar-lite VAE decoder (missing {_META}vae_decoder metadata)")
        version = int(meta.get(_META + "format_version", "0"))
        if version != SUPPORTED_FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: VAE decoder format version {version}, this runtime reads {SUPPORTED_FORMAT_VERSION}"
            )
        self.path = path
        self.dtype = meta[_META + "dtype"]
        self.output = meta[_META + "output"]
        self.z_dim = int(meta[_META + "z_dim"])
        self.spatial_stride = int(meta[_META + "spatial_stride"])
        self.junk_frames = int(meta[_META + "first_call_junk_frames"])
        self.cache_layout = [tuple(x) for x in json.loads(meta[_META + "cache_layout"])]
        self.device = "cuda" if self._session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._device_id = device_id
        self._banks: tuple[list, list] | None = None  # (read bank, write bank) of torch tensors
        self._latent_hw: tuple[int, int] | None = None
        self._first = True
        log.info("VAE decoder %s: %s graph on %s, %d caches",
                 path.name, self.dtype, self.device, len(self.cache_layout))

    # -- state --

    def reset(self) -> None:
        """Forget the stream: the next decode() starts a new video (first frame rule, zero caches)."""
        self._banks = None
        self._latent_hw = None
        self._first = True

    def cache_shapes(self, latent_hw: tuple[int, int]) -> list[tuple[int, ...]]:
        h, w = latent_hw
        return [(1, c, 2, h * s, w * s) for c, s in self.cache_layout]

    def cache_bytes(self, latent_hw: tuple[int, int]) -> int:
        """Bytes of BOTH cache banks on the device (the runtime plan accounts for them)."""
        item = np.dtype(_NP_DTYPES[self.dtype]).itemsize
        return 2 * item * sum(int(np.prod(s)) for s in self.cache_shapes(latent_hw))

    def bank_bytes(self) -> int:
        """Bytes of the cache banks allocated now (0 before the first decode)."""
        if self._banks is None:
            return 0
        return sum(t.numel() * t.element_size() for bank in self._banks for t in bank)

    def _alloc_banks(self, latent_hw: tuple[int, int]) -> None:
        import torch

        dtype = {"fp32": torch.float32, "fp16": torch.float16}[self.dtype]
        dev = torch.device("cuda", self._device_id) if self.device == "cuda" else torch.device("cpu")
        # zeros = the start of the video (the read bank); the write bank is overwritten by each call
        banks = [[torch.zeros(shape, dtype=dtype, device=dev) for shape in self.cache_shapes(latent_hw)]
                 for _ in range(2)]
        self._banks = (banks[0], banks[1])
        self._latent_hw = latent_hw

    def state(self) -> dict[str, np.ndarray]:
        """Snapshot of the stream (host copies), savable with np.savez; empty stream -> just `first`."""
        out = {"first": np.array(int(self._first), dtype=np.int64)}
        if self._banks is not None and self._latent_hw is not None:
            out["latent_hw"] = np.array(self._latent_hw, dtype=np.int64)
            for i, t in enumerate(self._banks[0]):
                out[f"cache_{i}"] = t.cpu().numpy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore a snapshot taken by state() (from this or another decoder of the same graph)."""
        self.reset()
        self._first = bool(int(state["first"]))
        if "latent_hw" not in state:
            return
        hw = tuple(int(x) for x in np.asarray(state["latent_hw"]))
        self._alloc_banks((hw[0], hw[1]))
        assert self._banks is not None
        np_dtype = _NP_DTYPES[self.dtype]
        import torch

        for i, (t, shape) in enumerate(zip(self._banks[0], self.cache_shapes(self._latent_hw))):
            arr = np.asarray(state.get(f"cache_{i}"))
            if arr.shape != shape or arr.dtype != np_dtype:
                want = f"{np.dtype(np_dtype)}{list(shape)}"
                raise UserError(f"VAE decoder state: cache_{i} is {arr.dtype}{list(arr.shape)}, expected {want}")
            t.copy_(torch.from_numpy(np.ascontiguousarray(arr)))

    # -- decoding --

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Normalized latents [16,T,h,w] (or [1,16,T,h,w]) -> frames, continuing the stream.

        Returns uint8 [4T,H,W,3] (the first call of a video: 1+4(T-1) frames). A graph exported with
        output="float" returns float32 [1,3,frames,H,W] instead.
        """
        z = np.asarray(latents)
        if z.ndim == 5:
            if z.shape[0] != 1:
                raise UserError(f"latents batch must be 1, got shape {list(z.shape)}")
            z = z[0]
        if z.ndim != 4 or z.shape[0] != self.z_dim:
            raise UserError(f"latents must be [{self.z_dim}, T, h, w], got shape {list(z.shape)}")
        if min(z.shape[1:]) < 1:
            raise UserError(f"latents must be non-empty, got shape {list(z.shape)}")
        if not np.issubdtype(z.dtype, np.floating):
            raise UserError(f"latents must be floating point, got {z.dtype}")
        if not np.isfinite(z).all():
            raise UserError("latents contain NaN or Inf")
        hw = (int(z.shape[2]), int(z.shape[3]))
        if self._banks is None:
            self._alloc_banks(hw)
        elif hw != self._latent_hw:
            raise UserError(f"latent size changed mid-stream from {self._latent_hw} to {hw}; call reset() first")
        step = self.latents_per_call or z.shape[1]
        parts = [self._call(z[:, t0:t0 + step]) for t0 in range(0, z.shape[1], step)]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=0 if self.output == "uint8" else 2)

    def _call(self, z: np.ndarray) -> np.ndarray:
        """One graph call on latents [16, T, h, w] (T <= latents_per_call); swaps the banks."""
        assert self._banks is not None
        read, write = self._banks
        np_dtype = _NP_DTYPES[self.dtype]
        binding = self._session.io_binding()
        binding.bind_cpu_input("latents", np.ascontiguousarray(z[None], dtype=np.float32))
        binding.bind_cpu_input("first", np.array(int(self._first), dtype=np.int64))
        binding.bind_output("frames", "cpu")  # bound first: get_outputs() follows binding order
        for i, (src, dst) in enumerate(zip(read, write)):
            # the banks are torch tensors: bound by pointer, so ORT reads and writes them in place
            binding.bind_input(f"cache_in_{i}", self.device, self._device_id, np_dtype, list(src.shape), src.data_ptr())
            binding.bind_output(f"cache_out_{i}", self.device, self._device_id, np_dtype, list(dst.shape),
                                dst.data_ptr())
        self._session.run_with_iobinding(binding)
        frames = binding.get_outputs()[0].numpy()

        if self._first:
            frames = frames[self.junk_frames:] if self.output == "uint8" else frames[:, :, self.junk_frames:]
        self._banks = (write, read)  # what was written is next call's input
        self._first = False
        return frames
