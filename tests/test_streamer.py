"""The unit streamer: exact bytes through the two slots, slot-reuse rules, disk sources, write-back."""
from __future__ import annotations

import pytest
import torch

from liveavatar_lite.runtime.streamer import (
    DiskSource,
    PinnedSource,
    UnitStreamer,
    pack_tensors,
    unpack_views,
)


def _units(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(8 + i, 16, generator=g).to(torch.bfloat16),
            "q": torch.randint(-127, 127, (16, 3 + i), generator=g, dtype=torch.int8),
            "s": torch.rand(16, generator=g),
        }
        for i in range(n)
    ]


def _run(streamer: UnitStreamer, layouts: list[dict], n: int) -> list[dict[str, torch.Tensor]]:
    """The canonical loop: prefetch i+1, compute i (here: copy the views out), release i."""
    seen = []
    streamer.prefetch(0)
    for i in range(n):
        buf = streamer.acquire(i)
        if i + 1 < n:
            streamer.prefetch(i + 1)
        seen.append({k: v.clone() for k, v in unpack_views(buf, layouts[i]).items()})
        streamer.release(i)
    return seen


def test_pack_roundtrip():
    u = _units(1)[0]
    buf, layout = pack_tensors(u)
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.numel() % 64 == 0
    assert all(off % 64 == 0 for off, _, _ in layout.values())
    for k, v in unpack_views(buf, layout).items():
        assert torch.equal(v, u[k]) and v.dtype == u[k].dtype


@pytest.mark.parametrize("n", [1, 2, 5])
def test_streamed_bytes_are_exact(n):
    units = _units(n)
    packed = [pack_tensors(u) for u in units]
    st = UnitStreamer([PinnedSource(b) for b, _ in packed], "cpu")
    assert st.slot_bytes == max(b.numel() for b, _ in packed)
    seen = _run(st, [lay for _, lay in packed], n)
    for got, want in zip(seen, units):
        for k in want:
            assert torch.equal(got[k], want[k])
    assert st.stats.copies == n
    assert st.stats.h2d_bytes == sum(b.numel() for b, _ in packed)


def test_disk_source_matches_pinned(tmp_path):
    units = _units(4, seed=1)
    packed = [pack_tensors(u) for u in units]
    sources = []
    for i, (buf, _) in enumerate(packed):
        path = tmp_path / f"u{i}.bin"
        path.write_bytes(buf.numpy().tobytes())

        def read_into(out, path=path, n=buf.numel()):
            out[:n].copy_(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))

        sources.append(DiskSource(buf.numel(), read_into))
    st = UnitStreamer(sources, "cpu")
    seen = _run(st, [lay for _, lay in packed], 4)
    st.close()
    for got, want in zip(seen, units):
        for k in want:
            assert torch.equal(got[k], want[k])


def test_slot_reuse_rules_are_enforced():
    packed = [pack_tensors(u) for u in _units(3)]
    st = UnitStreamer([PinnedSource(b) for b, _ in packed], "cpu")
    st.prefetch(0)
    st.acquire(0)
    st.prefetch(1)
    with pytest.raises(RuntimeError, match="still held"):
        st.prefetch(2)  # slot 0 is in use by unit 0: a two-ahead prefetch would overwrite it
    st.release(0)
    with pytest.raises(RuntimeError, match="does not hold"):
        st.release(0)
    st.prefetch(2)
    assert torch.equal(st.acquire(2), packed[2][0])
    copies = st.stats.copies
    assert torch.equal(st.acquire(1), packed[1][0])  # still in its slot: no second copy
    assert st.stats.copies == copies
    st.release(1)
    st.release(2)
    assert torch.equal(st.acquire(0), packed[0][0])  # cold start: fetched on demand
    st.release(0)


def test_writeback_copies_only_the_given_rows():
    host = torch.zeros(2, 10, 4)
    buf, layout = pack_tensors({"kv": host})
    st = UnitStreamer([PinnedSource(buf)], "cpu")
    st.prefetch(0)
    kv = unpack_views(st.acquire(0), layout)["kv"]
    kv[:, 3:5] = 7.0  # "this block's new K/V"
    kv[:, 8:] = 9.0  # scratch the caller does not write back
    host_view = unpack_views(buf, layout)["kv"]
    st.release(0, writeback=[(kv[:, 3:5], host_view[:, 3:5])])
    assert torch.all(host_view[:, 3:5] == 7.0)
    assert torch.all(host_view[:, 8:] == 0.0) and torch.all(host_view[:, :3] == 0.0)
    assert st.stats.d2h_bytes == 2 * 2 * 4 * 4


@pytest.mark.gpu
def test_cuda_streamed_bytes_are_exact():
    units = _units(6, seed=3)
    packed = [pack_tensors(u, pin=True) for u in units]
    st = UnitStreamer([PinnedSource(b) for b, _ in packed], "cuda", timing=True)
    seen = _run(st, [lay for _, lay in packed], 6)
    torch.cuda.synchronize()
    st.stats.collect()
    for got, want in zip(seen, units):
        for k in want:
            assert torch.equal(got[k].cpu(), want[k])
    assert st.stats.copy_seconds > 0
