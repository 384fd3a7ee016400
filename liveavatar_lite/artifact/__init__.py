"""Stage 1, bytes on disk: the upstream checkpoint in, the quantized artifact out, and back.

Owns: reading upstream's layout one tensor at a time and merging the LoRA (`checkpoint.py`,
`dit_loading.py`), the quant types and their dequantizers (`qtypes.py`), and the artifact format
(`format.py`, the only code that reads or writes an artifact's layout; docs/FORMAT.md).

May import: `model/`, `config`, `errors`, `fileio`. Nothing here touches a GPU or a stream.
"""
