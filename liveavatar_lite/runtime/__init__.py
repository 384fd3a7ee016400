"""Stage 3, the DiT on a memory budget: the plan, and the streamed execution it prescribes.

Owns: the memory plan and its inputs (`plan.py`, `plan_inputs.py`, `device_profiles.py`), the
unit streamer (pinned slabs, two slots, a copy stream; `streamer.py`), the KV caches in memory and
placed / 8-bit (`kv_cache.py`, `kv_offload.py`), quantized linears (`qlinear.py`), the DiT
runtime that binds an artifact's units to the model per the plan (`dit_runtime.py`) and the
per-rank plans of a timestep pipeline over several GPUs (`stage_plan.py`).

May import: `artifact/`, `model/`, `config`, `errors`, `fileio`; never `conditioning/` or `decode/`.
"""
