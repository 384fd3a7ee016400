"""Stage 2, what the DiT is conditioned on: the photo, the speech and the prompt, and their caches.

Owns: photo framing and its exact constant-video VAE encode (`photo.py`), speech decoding and
resampling (`speech.py`, also streamed), wav2vec2 features per video frame (`audio_features.py`;
of speech still arriving, with a fixed lookahead: `streaming_features.py`), prompt
tokenization (`text_tokenizer.py`) and the on-disk caches of prompt states and photo latents
(`caches.py`).

May import: `artifact/`, `model/`, `config`, `errors`, `fileio`; never `runtime/` or `decode/`.
"""
