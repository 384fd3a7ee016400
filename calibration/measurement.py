"""measurement.json: per-Linear output error of each candidate format, written by `calibrate`.

    {
      "format": "liveavatar-lite-measurement", "version": 1,
      "dit_config": {...}, "source": {"config_sha256": "...", "index_sha256": "...", "lora": "..."},
      "group_size": 128, "samples": ["sample0", ...], "blocks": 1,
      "layers": {
        "blocks.0.self_attn.q.weight": {
          "shape": [5120, 5120], "rows": 4096,
          "formats": {"bf16": {"rel_mse": 0.0, "snr_db": inf, "bytes": 52428800},
                      "int8": {"rel_mse": 1.1e-05, "snr_db": 49.6, "bytes": 26234880}, ...}}}
    }

rel_mse = sum((y_q - y)^2) / sum(y^2) over every call of that Linear during the calibration run
(y = reference output, y_q = output with the weight quantized then dequantized; inputs are the
reference activations); snr_db = -10 log10(rel_mse); bytes = stored size (qtypes.stored_nbytes).
Unknown versions are refused.

    m = read_measurement(Path("measurement.json")); m.layers["blocks.0.ffn.0.weight"].formats["int8"].rel_mse
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.config import DiTConfig
from liveavatar_lite.errors import UserError
from liveavatar_lite.fileio import read_json

MEASUREMENT_FORMAT = "liveavatar-lite-measurement"
MEASUREMENT_VERSION = 1


@dataclass(frozen=True)
class FormatError:
    """Output error of one Linear under one format, and what that format stores."""

    rel_mse: float
    bytes: int

    @property
    def snr_db(self) -> float:
        return math.inf if self.rel_mse <= 0 else -10.0 * math.log10(self.rel_mse)


@dataclass(frozen=True)
class LayerMeasurement:
    shape: tuple[int, ...]
    rows: int  # activation rows the error was measured on
    formats: dict[QuantType, FormatError]


@dataclass(frozen=True)
class Measurement:
    dit_config: DiTConfig
    source: dict[str, str]
    group_size: int
    samples: tuple[str, ...]
    blocks: int
    layers: dict[str, LayerMeasurement] = field(default_factory=dict)


def write_measurement(path: Path, m: Measurement) -> None:
    """Write atomically (temp file + rename)."""
    doc: dict[str, Any] = {
        "format": MEASUREMENT_FORMAT,
        "version": MEASUREMENT_VERSION,
        "dit_config": m.dit_config.to_upstream_json(),
        "source": m.source,
        "group_size": m.group_size,
        "samples": list(m.samples),
        "blocks": m.blocks,
        "layers": {
            key: {
                "shape": list(layer.shape),
                "rows": layer.rows,
                "formats": {
                    q.value: {"rel_mse": e.rel_mse, "snr_db": round(e.snr_db, 3) if math.isfinite(e.snr_db) else None, "bytes": e.bytes}
                    for q, e in layer.formats.items()
                },
            }
            for key, layer in m.layers.items()
        },
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def read_measurement(path: Path) -> Measurement:
    """Parse measurement.json; UserError for a missing, foreign or newer file."""
    doc = read_json(path, UserError, missing=f"{path}: measurement file is missing (make one with `liveavatar-lite calibrate`)")
    if not isinstance(doc, dict) or doc.get("format") != MEASUREMENT_FORMAT:
        raise UserError(f"{path}: not a liveavatar-lite measurement file")
    if doc.get("version") != MEASUREMENT_VERSION:
        raise UserError(f"{path}: measurement version {doc.get('version')!r} is not supported (this build reads {MEASUREMENT_VERSION})")
    try:
        layers = {
            key: LayerMeasurement(
                shape=tuple(entry["shape"]),
                rows=int(entry["rows"]),
                formats={QuantType(q): FormatError(float(e["rel_mse"]), int(e["bytes"])) for q, e in entry["formats"].items()},
            )
            for key, entry in doc["layers"].items()
        }
        return Measurement(
            dit_config=DiTConfig.from_upstream_json(doc["dit_config"], source=str(path)),
            source=dict(doc["source"]),
            group_size=int(doc["group_size"]),
            samples=tuple(doc["samples"]),
            blocks=int(doc["blocks"]),
            layers=layers,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: corrupt measurement file ({e})") from None
