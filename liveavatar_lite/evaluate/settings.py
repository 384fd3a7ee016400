"""What one side of a comparison renders with: an artifact plus runtime settings, `PATH[:key=value,...]`.

    parse_setting("la-int8")                      # the artifact with the default runtime settings
    parse_setting("la-int8:kv=fp8,compile=on")    # the same artifact, fp8 KV caches, fused elementwise
    parse_setting("C:/x/la-int8:kv=int8")         # a colon inside the path is fine: only the last one
                                                  # that is followed by key=value pairs splits

Every key maps onto one `PipelineOptions` field (`KEYS` below): a new runtime lever is one more
entry there, nothing else.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runtime.device_profiles import ATTENTION_CHOICES, COMPILE_CHOICES
from ..runtime.plan_inputs import KV_DTYPES


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"one of {', '.join(values)}")
        return text
    return parse


def _gigabytes(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("a finite number of GB > 0")
    return value


KV_CHOICES = KV_DTYPES  # what the runtime stores (ArtifactBackend.open re-checks)

# key -> (PipelineOptions field, parser, default, help). A new runtime option is one line here.
KEYS: dict[str, tuple[str, Callable[[str], Any], Any, str]] = {
    "kv": ("kv_dtype", _choice(*KV_CHOICES), "bf16", "KV cache storage: bf16, fp8 or int8"),
    "compile": ("compile_units", _choice(*COMPILE_CHOICES), "auto",
                "DiT units as fused graphs: auto (on for CUDA), on or off, as generate --compile"),
    "attention": ("attention", _choice(*ATTENTION_CHOICES), "auto", "attention backend, as generate --attention"),
    "vram": ("vram_gb", _gigabytes, None, "GPU memory budget in GB"),
    "ram": ("ram_gb", _gigabytes, None, "host memory budget in GB"),
    "profile": ("device_profile", str, None, "the device profile the memory plan uses (as --device-profile)"),
}

_PAIRS = re.compile(r"^[a-z_]+=[^,=]*(,[a-z_]+=[^,=]*)*$")


@dataclass(frozen=True)
class EvalSetting:
    """An artifact and the runtime settings given for it (keys not given take eval's defaults)."""

    artifact: Path
    values: tuple[tuple[str, Any], ...] = ()  # (key, parsed value) in the order given
    text: str = field(default="", compare=False)  # as the user wrote it

    def get(self, key: str) -> Any:
        return dict(self.values).get(key, KEYS[key][2])

    def has(self, key: str) -> bool:
        return key in dict(self.values)

    def with_value(self, key: str, value: Any) -> EvalSetting:
        values = tuple((k, v) for k, v in self.values if k != key) + ((key, value),)
        return replace(self, values=values, text="")

    @property
    def spec(self) -> str:
        """The setting as `PATH[:key=value,...]` (what the user wrote, or its canonical spelling)."""
        if self.text:
            return self.text
        extra = ",".join(f"{k}={_show(v)}" for k, v in self.values)
        return f"{self.artifact}:{extra}" if extra else str(self.artifact)

    @property
    def label(self) -> str:
        """`ARTIFACT_DIR_NAME[:key=value,...]`: short enough for a table row."""
        extra = ",".join(f"{k}={_show(v)}" for k, v in self.values)
        return f"{self.artifact.name}:{extra}" if extra else self.artifact.name

    def options(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for `PipelineOptions`: `defaults` (by field), then this setting's keys."""
        out = dict(defaults)
        for key, value in self.values:
            out[KEYS[key][0]] = value
        return out


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse_setting(text: str, flag: str = "--candidate") -> EvalSetting:
    """`PATH[:key=value,...]` -> EvalSetting; UserError (one line) for an unknown key or a bad value.

    parse_setting("art:kv=fp8").get("kv")  # 'fp8'
    """
    text = text.strip()
    if not text:
        raise UserError(f"{flag}: empty; give an artifact directory, optionally with :key=value settings")
    path, values = text, ()
    head, sep, tail = text.rpartition(":")
    if sep and head and _PAIRS.match(tail):
        path, values = head, _parse_pairs(tail, flag, text)
    return EvalSetting(Path(path), values, text)


def _parse_pairs(tail: str, flag: str, text: str) -> tuple[tuple[str, Any], ...]:
    out: dict[str, Any] = {}
    for pair in tail.split(","):
        key, _, raw = pair.partition("=")
        if key not in KEYS:
            raise UserError(f"{flag} {text}: unknown setting {key!r}; known: "
                            + "; ".join(f"{k} ({h})" for k, (_, _, _, h) in KEYS.items()))
        if key in out:
            raise UserError(f"{flag} {text}: {key} is given twice")
        try:
            out[key] = KEYS[key][1](raw)
        except ValueError as e:
            raise UserError(f"{flag} {text}: {key}={raw!r} must be {e}") from None
    return tuple(out.items())


def parse_list(text: str, flag: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """'int8,fp8' -> ('int8', 'fp8'), each one of `choices`; UserError otherwise."""
    items = tuple(x.strip() for x in text.split(","))
    bad = [x for x in items if x not in choices]
    if not items or bad:
        raise UserError(f"{flag} {text}: {', '.join(repr(b) for b in bad) or 'empty'} is not one of "
                        f"{', '.join(choices)} (a comma list)")
    return items


WEIGHT_FORMATS = ("bf16", "int8", "fp8", "int4", "nf4")  # what `quantize --format` writes


def format_candidates(formats: tuple[str, ...], artifacts: Path) -> tuple[EvalSetting, ...]:
    """`--candidates int8,fp8 --artifacts DIR` -> DIR/int8, DIR/fp8, each checked to hold an artifact
    of that format (`quantize CKPT DIR/int8 --format int8` writes one); UserError otherwise."""
    from ..artifact.format import read_manifest
    from ..errors import ArtifactError

    out = []
    for fmt in formats:
        path = artifacts / fmt
        if not path.is_dir():
            raise UserError(f"--candidates {fmt}: no artifact directory {path} (make it with "
                            f"`liveavatar-lite quantize CKPT {path} --format {fmt}`, or pass --artifacts DIR)")
        try:
            manifest = read_manifest(path)
        except ArtifactError as e:
            raise UserError(f"--candidates {fmt}: {e}") from None
        if manifest.quant.format != fmt:
            raise UserError(f"--candidates {fmt}: {path} holds a {manifest.quant.format} artifact, not {fmt}")
        out.append(EvalSetting(path, (), str(path)))
    return tuple(out)


def with_kv_sweep(candidates: tuple[EvalSetting, ...], reference: EvalSetting,
                  kvs: tuple[str, ...]) -> tuple[EvalSetting, ...]:
    """`--kv bf16,fp8`: each candidate (or, with none, the reference's artifact) once per KV dtype."""
    base = candidates or (EvalSetting(reference.artifact, tuple((k, v) for k, v in reference.values if k != "kv")),)
    clash = [c.spec for c in base if c.has("kv")]
    if clash:
        raise UserError(f"{clash[0]} sets kv and --kv sweeps it: give the KV dtype in one place")
    return tuple(c.with_value("kv", kv) for c in base for kv in kvs)
