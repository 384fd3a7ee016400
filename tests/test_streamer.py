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


def test_units_copied_in_pieces_are_exact_and_timed_as_waits_on_cpu():
    """A weight unit is copied in pieces of chunk_bytes (so a KV copy on another stream can slip in
    between); the bytes are the same. On CPU the compute thread does each copy, so it is wait."""
    packed = [pack_tensors(u) for u in _units(4, seed=5)]
    st = UnitStreamer([PinnedSource(b) for b, _ in packed], "cpu", chunk_bytes=100)
    seen = _run(st, [lay for _, lay in packed], 4)
    for got, (buf, lay) in zip(seen, packed):
        for k, v in unpack_views(buf, lay).items():
            assert torch.equal(got[k], v)
    assert st.stats.pieces == sum(-(-b.numel() // 100) for b, _ in packed) > st.stats.copies == 4
    assert st.stats.wait_seconds == st.stats.copy_seconds > 0


def test_exact_size_host_buffers():
    """host_buffer allocates exactly the bytes asked for (torch's pinned allocator rounds up to a
    power of two: 351.8 MB would take 536.9 MB) and counts them while they live."""
    import gc

    from liveavatar_lite.runtime.pinned import host_buffer, host_buffer_bytes

    gc.collect()  # buffers an earlier test left as garbage must not be freed mid-test (random order)
    before = host_buffer_bytes()
    buf = host_buffer(351_800_001 // 1000, pin=False, zero=True)
    assert buf.numel() == 351_800 and buf.untyped_storage().nbytes() == 351_800 and not buf.any()
    assert host_buffer_bytes() - before == 351_800
    del buf
    gc.collect()
    assert host_buffer_bytes() == before


@pytest.mark.gpu
def test_cuda_pinned_host_buffer_is_exact_and_async():
    from liveavatar_lite.runtime.pinned import host_buffer, pinned_bytes

    before = pinned_bytes()
    buf = host_buffer(351_800_000, pin=True)
    assert buf.is_pinned() and pinned_bytes() - before == 351_800_000  # not 536_870_912
    dev = torch.empty_like(buf, device="cuda")
    torch.cuda._sleep(50_000_000)  # keep the stream busy: a pageable copy would block here
    dev.copy_(buf, non_blocking=True)
    assert not torch.cuda.current_stream().query()  # the host got control back at once
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_slot_reuse_survives_a_widened_race():
    """Compute holds each slot much longer than a copy takes (torch.cuda._sleep before reading it):
    without the free-event wait the prefetch two units ahead would overwrite the slot mid-read."""
    units = _units(6, seed=4)
    packed = [pack_tensors(u, pin=True) for u in units]
    st = UnitStreamer([PinnedSource(b) for b, _ in packed], "cuda", chunk_bytes=256)
    seen = []
    st.prefetch(0)
    for i in range(6):
        buf = st.acquire(i)
        if i + 1 < 6:
            st.prefetch(i + 1)
        torch.cuda._sleep(20_000_000)  # ~10 ms on the compute stream before the slot is read
        seen.append({k: v.clone() for k, v in unpack_views(buf, packed[i][1]).items()})
        st.release(i)
    torch.cuda.synchronize()
    for got, want in zip(seen, units):
        for k in want:
            assert torch.equal(got[k].cpu(), want[k])


@pytest.mark.gpu
def test_cuda_kv_copy_does_not_wait_behind_a_weight_prefetch_held_by_its_slot():
    """The weight streamer's next prefetch must wait until compute releases the slot (kept busy here
    with torch.cuda._sleep); a KV copy queued meanwhile lands long before that wait ends (on one
    shared copy stream it would queue behind the waiting weight copy). The copy engine itself runs
    copies in queue order (H100, 2026-11-26), so this, not piece interleaving, is what two streams buy."""
    from liveavatar_lite.runtime.pinned import host_buffer
    from liveavatar_lite.runtime.plan_inputs import WEIGHT_CHUNK_BYTES

    srcs = [PinnedSource(host_buffer(64 << 20, pin=True)) for _ in range(3)]
    w = UnitStreamer(srcs, "cuda", chunk_bytes=WEIGHT_CHUNK_BYTES)
    kv = UnitStreamer([PinnedSource(host_buffer(16 << 20, pin=True))], "cuda")
    w.prefetch(0)
    w.acquire(0)
    w.prefetch(1)
    w.acquire(1)
    torch.cuda._sleep(200_000_000)  # compute still "reads" slot 0 for ~100 ms before releasing it
    w.release(0)
    w.prefetch(2)  # into slot 0: its copy waits on the copy stream for the release above
    start = torch.cuda.Event(enable_timing=True)
    start.record(kv.copy_stream)
    kv.prefetch(0)
    kv_done, w_done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    kv_done.record(kv.copy_stream)
    w_done.record(w.copy_stream)
    torch.cuda.synchronize()
    t_kv, t_w = start.elapsed_time(kv_done), start.elapsed_time(w_done)
    print(f"\nKV 16 MiB landed at {t_kv:.1f} ms; the weight prefetch held by its slot at {t_w:.1f} ms")
    assert t_kv < 0.25 * t_w
