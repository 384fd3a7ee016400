"""liveavatar-lite: Live Avatar (Wan2.2-S2V-14B + LoRA) on one 24 GB GPU.

The Python API (docs/api.md):

    from liveavatar_lite import Pipeline
    pipe = Pipeline.from_artifact("la-int8/", vram_gb=24, kv="fp8")
    pipe.render(image="me.jpg", audio="hi.wav", prompt="a person talking", out="me.mp4")

Names are imported on first use, so `import liveavatar_lite` (and the CLI's --help) stays light.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Pipeline": "liveavatar_lite.pipeline.pipeline",
    "generate": "liveavatar_lite.pipeline.pipeline",
    "PipelineOptions": "liveavatar_lite.pipeline.request",
    "RenderRequest": "liveavatar_lite.pipeline.request",
    "RenderResult": "liveavatar_lite.pipeline.request",
    "StreamBlock": "liveavatar_lite.pipeline.request",
    "SessionBlock": "liveavatar_lite.pipeline.session",
    "UserError": "liveavatar_lite.errors",
    "BudgetError": "liveavatar_lite.errors",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily below
    from .errors import BudgetError, UserError  # noqa: F401
    from .pipeline.pipeline import Pipeline, generate  # noqa: F401
    from .pipeline.request import (  # noqa: F401
        PipelineOptions,
        RenderRequest,
        RenderResult,
        StreamBlock,
    )
    from .pipeline.session import SessionBlock  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'liveavatar_lite' has no attribute {name!r}")
