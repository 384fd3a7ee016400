"""Reading the project's JSON files (config.json, index, manifest, measurement) with one-line errors.

    doc = read_json(path, ArtifactError, missing=f"{path}: no manifest (not an artifact?)")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError


def read_json(path: str | os.PathLike[str], error: type[UserError], missing: str) -> Any:
    """Parsed JSON; `error(missing)` when the file is absent, `error("...: corrupt (not valid JSON)")` otherwise."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise error(f"{path}: corrupt (not valid JSON)") from None
