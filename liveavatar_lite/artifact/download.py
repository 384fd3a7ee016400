"""Fetch the upstream checkpoint and the Live Avatar LoRA from the Hugging Face Hub into ONE folder.

`huggingface_hub.snapshot_download(local_dir=DEST, allow_patterns=...)` does the transfer: only the
files this runtime reads are fetched (about 50 GB of the S2V repository's files, not its examples or
assets), partial files are kept under `DEST/.cache/huggingface/` and a re-run continues them, and
files already complete are not fetched again. Afterwards `missing_files(DEST)` checks that DEST is a
checkpoint `quantize` can convert (LoRA included, at `DEST/liveavatar.safetensors`).

    download(Path("Wan2.2-S2V-14B"))   # then: liveavatar-lite quantize Wan2.2-S2V-14B la-int8 -q int8
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, first_line
from .checkpoint import DIT_CONFIG, DIT_INDEX, LORA_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE, WAV2VEC_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSource:
    """One Hub repository and the files of it we use (fnmatch patterns, as snapshot_download takes)."""

    repo_id: str
    allow_patterns: tuple[str, ...]


S2V = HubSource("Wan-AI/Wan2.2-S2V-14B", (
    DIT_CONFIG,
    DIT_INDEX,
    "diffusion_pytorch_model-*.safetensors",  # the DiT shards (4 x ~10 GB)
    T5_FILE,
    VAE_FILE,
    f"{TOKENIZER_DIR}/*",  # the umT5 tokenizer files
    f"{WAV2VEC_DIR}/*.json",  # its config, preprocessor config, vocab
    f"{WAV2VEC_DIR}/model.safetensors",  # the wav2vec2 weights (the .bin twin is not fetched)
))
LORA = HubSource("Quark-Vision/Live-Avatar", (LORA_FILE,))

# No call to the Hub waits forever: connecting may take HUB_CONNECT_S, and a metadata call or a
# file transfer that receives nothing for HUB_READ_S fails (a re-run resumes what was fetched).
HUB_CONNECT_S = 10.0
HUB_READ_S = 60.0


def _bound_hub_timeouts() -> None:
    """Make every huggingface_hub HTTP call time out: its default client has no timeout, and its
    metadata calls (repo_info) pass `timeout=None`, so an endpoint that accepts and never answers
    hangs `download` forever. A transport that fills in the missing timeouts is installed through
    huggingface_hub's client factory (`set_client_factory`, its documented way to configure HTTP)."""
    import importlib

    import huggingface_hub
    import huggingface_hub.constants as hc

    hc.HF_HUB_ETAG_TIMEOUT = min(hc.HF_HUB_ETAG_TIMEOUT or HUB_READ_S, HUB_READ_S)
    hc.HF_HUB_DOWNLOAD_TIMEOUT = min(hc.HF_HUB_DOWNLOAD_TIMEOUT or HUB_READ_S, HUB_READ_S)
    httpx = importlib.import_module(type(huggingface_hub.get_session()).__module__.split(".")[0])  # httpx (or its fork)
    limits = {"connect": HUB_CONNECT_S, "read": HUB_READ_S, "write": HUB_READ_S, "pool": HUB_READ_S}

    class BoundedTransport(httpx.HTTPTransport):  # type: ignore[name-defined, misc]
        def handle_request(self, request):  # type: ignore[no-untyped-def]
            given = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {k: given.get(k) or v for k, v in limits.items()}
            return super().handle_request(request)

    try:  # the hub's own request hook (request ids, debug logging), where this version has it
        from huggingface_hub.utils._http import hf_request_event_hook
        hooks = {"request": [hf_request_event_hook]}
    except ImportError:
        hooks = {}
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=BoundedTransport(), event_hooks=hooks,
                                                            follow_redirects=True, timeout=httpx.Timeout(**limits)))


def missing_files(dest: Path, lora: bool = True) -> list[str]:
    """What DEST still lacks to be a complete checkpoint for `quantize` (empty when complete)."""
    need = [DIT_CONFIG, T5_FILE, VAE_FILE, f"{WAV2VEC_DIR}/config.json", f"{WAV2VEC_DIR}/preprocessor_config.json",
            f"{TOKENIZER_DIR}/tokenizer_config.json"] + ([LORA_FILE] if lora else [])
    missing = [n for n in need if not (dest / n).is_file()]
    wav = dest / WAV2VEC_DIR
    if not any((wav / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        missing.append(f"{WAV2VEC_DIR}/model.safetensors")
    if not (dest / DIT_INDEX).is_file():
        missing.append(DIT_INDEX)
    else:
        from .checkpoint import CheckpointDir

        try:
            CheckpointDir(dest)  # reads the index: every shard it lists must be there
        except UserError as e:
            missing.append(f"a DiT shard ({first_line(e)})")
    return missing


def download(dest: Path, revision: str | None = None, lora_revision: str | None = None, lora: bool = True,
             max_workers: int = 8) -> list[str]:
    """snapshot_download both repositories into `dest`; returns `missing_files(dest)` afterwards.

    UserError (one line) when the Hub cannot be reached and `dest` has no complete copy, or the
    repository or revision does not exist. Offline (HF_HUB_OFFLINE=1) a complete local folder is
    accepted as it is.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    sources = [(S2V, revision)] + ([(LORA, lora_revision)] if lora else [])
    _bound_hub_timeouts()
    for source, rev in sources:
        log.info("fetching %s (%s) into %s", source.repo_id, ", ".join(source.allow_patterns), dest)
        try:
            snapshot_download(source.repo_id, revision=rev, local_dir=dest,
                              allow_patterns=list(source.allow_patterns), max_workers=max_workers)
        except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, TimeoutError) as e:
            raise UserError(f"cannot fetch {source.repo_id}: {first_line(e)} (check the network or the "
                            "revision; re-running resumes what was fetched)") from None
        except OSError as e:
            if type(e) is OSError or e.errno is not None:
                raise  # a local file problem (disk full, permission): the CLI names it
            raise UserError(f"cannot fetch {source.repo_id}: {first_line(e)}") from None
        except Exception as e:
            if not type(e).__name__.endswith(("Timeout", "ConnectError")):  # httpx's transport errors
                raise
            raise UserError(f"cannot fetch {source.repo_id}: the Hub did not answer ({type(e).__name__} after "
                            f"{HUB_READ_S:g} s); check the network or HF_ENDPOINT, then run it again") from None
    return missing_files(dest, lora)
