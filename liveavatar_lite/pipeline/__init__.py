"""Stage 5, one render end to end: conditioning -> planned DiT runtime -> decoder -> mp4.

Owns: Live Avatar's causal block-by-block generator and its flow-matching schedule
(`generator.py`, `scheduler.py`), the request/result types and the renderer interfaces
(`request.py`), the artifact backend that loads the stages once and wires them together
(`render.py`), the stay-loaded `Pipeline` (`pipeline.py`) and its talk sessions (`session.py`,
speech streamed in, docs/talk.md), the clip loop with checkpoints, resume
and live output (`generate.py`), the crash-safe work directory (`workdir.py`) and
telemetry (`telemetry.py`); the same render as a pipeline of ranks, each running whole denoising
steps (`multirank/`, docs/multi-gpu.md).

May import: every stage below (`conditioning/`, `runtime/`, `decode/`, `artifact/`, `model/`).
"""
