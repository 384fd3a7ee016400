"""Stage 4, latents to a video file: the VAE decoder under ONNX Runtime and the mp4 writer.

Owns: the decoder's ONNX export (`vae_export.py`), the streaming ORT decoder with its cache banks
(`vae_onnx.py`), h264 clip segments plus the final atomic mux with aac (`video.py`), and the
live HLS playlist (`hls.py`).

May import: `artifact/`, `model/`, `config`, `errors`, `fileio`; never `conditioning/` or `runtime/`.
"""
