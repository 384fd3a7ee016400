"""Device memory of the ONNX VAE decoder, derived from the graph's own shapes (not a guess).

The exported decoder step (`vae_export.py`) records a symbolic shape for every tensor in the graph
(`value_info`: dims such as `4*t + 2`, `2*h`, `w*h` over the inputs' t, h, w). Evaluated at one call
of T latents of h x w, they give each tensor's bytes. Walking the nodes in graph order, a tensor
lives from the node that makes it to the last node that reads it (ONNX Runtime's allocation
planner frees it there too); the largest sum of live tensors is the call's **working set**. Ops that
ONNX Runtime runs as views of their input (Reshape, Squeeze, Unsqueeze, Flatten, Identity) allocate
nothing. The cache inputs/outputs are not counted: the runtime binds them to buffers it owns (the
two banks, counted apart). Initializers are the decoder's **weights**.

The working set is an upper bound of what the planner places: it never reuses an input's buffer
for its output in place, which ONNX Runtime sometimes does.

    g = DecoderGraph.from_onnx("art/vae/decoder.onnx")
    g.working_set_bytes((48, 88), latents=1); g.weights_bytes

Planning before an artifact exists (`plan 14b`) uses the same figures from a stored copy of the
graph's structure (`graphs/<preset>.json`, written by `tools/decoder_graph.py`; no weights).
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArtifactError, UserError

FORMAT_VERSION = 1
GRAPHS_DIR = Path(__file__).resolve().parent / "graphs"
# ONNX TensorProto element type -> bytes per element (the types an exported decoder uses, and a few more)
ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
# ops ONNX Runtime's CUDA and CPU kernels run as an alias of input 0 (no allocation)
ALIAS_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
ARENA_ALIGN = 256  # ONNX Runtime's arena rounds every allocation up to 256 bytes
# cuDNN convolution scratch per conv call when the CUDA EP runs with cudnn_conv_use_max_workspace=0
# (the setting `vae_onnx.OnnxVAEDecoder` uses): ONNX Runtime caps cuDNN's workspace at 32 MiB then.
CUDNN_WORKSPACE_BYTES = 32 << 20
DECODE_CHUNKS = (3, 2, 1)  # latents per decode call the plan may choose (a block is 3 latents)


@dataclass(frozen=True)
class DecoderGraph:
    """The shapes and data flow of a decoder graph: enough to size any call, no weights.

    tensors: name -> (bytes per element, dims as ints or expressions in t, h, w)
    nodes: (op type, input names, output names) in graph order
    external: inputs/outputs the caller binds to its own memory (the cache banks)
    """

    tensors: dict[str, tuple[int, tuple[int | str, ...]]]
    nodes: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    external: frozenset[str]
    weights_bytes: int
    cache_layout: tuple[tuple[int, int], ...]  # (channels, spatial scale) per cache, as the metadata says
    spatial_stride: int = 8  # pixels per latent

    # ---- building

    @classmethod
    def from_onnx(cls, path: str | Path) -> DecoderGraph:
        """Read an exported decoder's graph (weights are not loaded: only their sizes are used)."""
        import onnx
        from google.protobuf.message import DecodeError

        path = Path(path)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (OSError, DecodeError, ValueError) as e:
            raise ArtifactError(f"{path}: not a readable ONNX decoder ({type(e).__name__})") from None
        g = model.graph
        meta = {p.key: p.value for p in model.metadata_props}
        layout = json.loads(meta.get("liveavatar_lite.cache_layout", "[]"))
        tensors: dict[str, tuple[int, tuple[int | str, ...]]] = {}
        for vi in [*g.input, *g.output, *g.value_info]:
            tt = vi.type.tensor_type
            dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim)
            tensors[vi.name] = (ITEMSIZE.get(tt.elem_type, 8), dims)
        weights = sum(ITEMSIZE.get(t.data_type, 8) * math.prod(t.dims) for t in g.initializer)
        init = {t.name for t in g.initializer}
        nodes = tuple((n.op_type, tuple(i for i in n.input if i), tuple(n.output)) for n in g.node)
        missing = [o for _, _, outs in nodes for o in outs if o not in tensors]
        if missing:
            raise ArtifactError(f"{path}: the graph has no shape for {missing[0]!r}; re-export it with "
                                "`liveavatar-lite vae export` (shapes are recorded since format 1)")
        external = frozenset(n for n in [*(i.name for i in g.input), *(o.name for o in g.output)]
                             if n.startswith(("cache_in_", "cache_out_")))
        for name in init:  # initializers also appear as graph inputs in older exporters: weights, not inputs
            tensors.pop(name, None)
        return cls(tensors, nodes, tuple(i.name for i in g.input if i.name not in init),
                   tuple(o.name for o in g.output), external, int(weights),
                   tuple((int(c), int(s)) for c, s in layout), int(meta.get("liveavatar_lite.spatial_stride", 8)))

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "weights_bytes": self.weights_bytes,
                "cache_layout": [list(x) for x in self.cache_layout], "spatial_stride": self.spatial_stride,
                "inputs": list(self.inputs), "outputs": list(self.outputs), "external": sorted(self.external),
                "tensors": {k: [s, list(d)] for k, (s, d) in self.tensors.items()},
                "nodes": [[op, list(i), list(o)] for op, i, o in self.nodes]}

    @classmethod
    def from_json(cls, d: dict) -> DecoderGraph:
        if d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"decoder graph shapes of format {d.get('format_version')}, expected {FORMAT_VERSION}")
        return cls({k: (int(s), tuple(dims)) for k, (s, dims) in d["tensors"].items()},
                   tuple((op, tuple(i), tuple(o)) for op, i, o in d["nodes"]), tuple(d["inputs"]),
                   tuple(d["outputs"]), frozenset(d["external"]), int(d["weights_bytes"]),
                   tuple((int(c), int(s)) for c, s in d["cache_layout"]), int(d.get("spatial_stride", 8)))

    @classmethod
    def for_preset(cls, name: str) -> DecoderGraph:
        """The stored structure of a preset's fp16 decoder graph (for planning without an artifact)."""
        path = GRAPHS_DIR / f"{name}.json"
        if not path.is_file():
            raise UserError(f"no stored decoder graph for preset {name!r} (make one with tools/decoder_graph.py)")
        return cls.from_json(json.loads(path.read_text()))

    # ---- sizing

    def tensor_bytes(self, name: str, dims: dict[str, int]) -> int:
        itemsize, shape = self.tensors[name]
        return itemsize * math.prod(_eval_dim(d, dims) for d in shape)

    def working_set_bytes(self, latent_hw: tuple[int, int], latents: int) -> int:
        """Peak bytes of the tensors alive at once during one call of `latents` latents at latent
        (h, w): intermediates, the latents input and the frames output (made on the device, then
        copied to the host), each rounded up to the arena's 256-byte granularity. Not the weights,
        not the cache banks."""
        dims = {"t": int(latents), "h": int(latent_hw[0]), "w": int(latent_hw[1])}
        last_use: dict[str, int] = {}
        for k, (_, ins, _) in enumerate(self.nodes):
            for name in ins:
                last_use[self._root(name)] = k
        keep = {self._root(o) for o in self.outputs}
        size: dict[str, int] = {}
        live = peak = 0
        for name in self.inputs:  # inputs the runtime copies in (latents, first); caches are bound
            if name not in self.external and name in self.tensors:
                size[name] = _aligned(self.tensor_bytes(name, dims))
                live += size[name]
        peak = live
        for k, (op, ins, outs) in enumerate(self.nodes):
            for o in outs:
                if o in self.external or o not in self.tensors or (op in ALIAS_OPS and o == outs[0]):
                    continue
                size[o] = _aligned(self.tensor_bytes(o, dims))
                live += size[o]
            peak = max(peak, live)  # a node's inputs and outputs are alive together
            for name in {self._root(i) for i in ins}:
                if last_use.get(name) == k and name not in keep and name in size:
                    live -= size.pop(name)
        return int(peak)

    def _root(self, name: str) -> str:
        """The tensor whose buffer `name` uses (itself unless made by an aliasing op)."""
        return self._aliases().get(name, name)

    def _aliases(self) -> dict[str, str]:
        cached = self.__dict__.get("_alias_map")
        if cached is None:
            cached = {}
            for op, ins, outs in self.nodes:
                if op in ALIAS_OPS and ins and outs:
                    cached[outs[0]] = cached.get(ins[0], ins[0])
            object.__setattr__(self, "_alias_map", cached)  # frozen dataclass: computed once
        return cached

    def memory(self, size: tuple[int, int], chunks: tuple[int, ...] = ()) -> DecoderMemory:
        """The figures at pixel `size` = (width, height) (the planner's `DecoderSizer`)."""
        return decoder_memory(self, size, self.spatial_stride, chunks or DECODE_CHUNKS)

    def cache_bytes(self, latent_hw: tuple[int, int]) -> int:
        """Bytes of BOTH cache banks: cache i is [1, C_i, 2, h*s_i, w*s_i] in the graph's dtype."""
        h, w = latent_hw
        itemsize = self.tensors["cache_in_0"][0] if "cache_in_0" in self.tensors else 2
        return 2 * itemsize * sum(c * 2 * (h * s) * (w * s) for c, s in self.cache_layout)


@dataclass(frozen=True)
class DecoderMemory:
    """What the decoder holds on the device at one size: the figures the memory plan counts."""

    weights_bytes: int
    workspace_bytes: int
    caches_bytes: int  # both banks
    working_set_bytes: tuple[tuple[int, int], ...]  # (latents per call, bytes), largest call first


def decoder_memory(graph: DecoderGraph, size: tuple[int, int], spatial_stride: int = 8,
                   chunks: tuple[int, ...] = DECODE_CHUNKS) -> DecoderMemory:
    """The decoder's figures at pixel `size` = (width, height) for each call size in `chunks`.

        decoder_memory(DecoderGraph.for_preset("14b"), (704, 384)).working_set_bytes[-1]  # 1 latent
    """
    hw = (size[1] // spatial_stride, size[0] // spatial_stride)
    return DecoderMemory(
        weights_bytes=graph.weights_bytes, workspace_bytes=CUDNN_WORKSPACE_BYTES,
        caches_bytes=graph.cache_bytes(hw),
        working_set_bytes=tuple((c, graph.working_set_bytes(hw, c)) for c in sorted(chunks, reverse=True)),
    )


def _aligned(n: int) -> int:
    return -(-n // ARENA_ALIGN) * ARENA_ALIGN


def _eval_dim(d: int | str, dims: dict[str, int]) -> int:
    """A dim: an int, or an expression such as '4*t + 2' over t, h, w (parsed, never eval'd)."""
    if isinstance(d, int):
        return d
    try:
        return _eval_node(ast.parse(d, mode="eval").body, dims)
    except (SyntaxError, KeyError, ValueError):
        raise ArtifactError(f"decoder graph: cannot size dimension {d!r} (expected an expression in t, h, w)") from None


def _eval_node(node: ast.AST, dims: dict[str, int]) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return dims[node.id]
    if isinstance(node, ast.BinOp):
        a, b = _eval_node(node.left, dims), _eval_node(node.right, dims)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.FloorDiv: lambda: a // b}
        if type(node.op) in ops:
            return ops[type(node.op)]()
    raise ValueError(ast.dump(node))
