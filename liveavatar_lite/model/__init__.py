"""Stage 0, the networks: pure nn.Modules (DiT, VAE, umT5) that build on the meta device.

No I/O, no offload, no placement: the model only computes. `kv.py` is the interface its
self-attention expects from a KV cache; the caches themselves live in `runtime/`.

May import: `config`, `errors` only.
"""
