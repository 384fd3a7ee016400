"""`--target-size`: per-layer formats chosen greedily by error saved per byte.

Every measured Linear starts in its smallest format. While bytes remain in the budget, the upgrade
with the largest (error removed) / (bytes added) among all layers is applied, considering every
larger format of a layer that has less error (so a non-monotonic format is skipped over, not a
dead end). The result is the cheapest-first Pareto walk that ends at the budget.

    formats = pick_formats(read_measurement(p), budget_bytes=15 * 10**9)  # {key: QuantType}
"""
from __future__ import annotations

import heapq

from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.errors import UserError, gb_pair

from .measurement import FormatError, Measurement


def _options(formats: dict[QuantType, FormatError]) -> list[tuple[QuantType, FormatError]]:
    return sorted(formats.items(), key=lambda kv: (kv[1].bytes, kv[1].rel_mse))


def _best_upgrade(opts: list[tuple[QuantType, FormatError]], cur: int) -> tuple[float, int] | None:
    """(error saved per byte, option index) of this layer's best upgrade from option `cur`."""
    _, now = opts[cur]
    best: tuple[float, int] | None = None
    for j in range(cur + 1, len(opts)):
        _, cand = opts[j]
        extra = cand.bytes - now.bytes
        if cand.rel_mse < now.rel_mse and extra > 0:
            gain = (now.rel_mse - cand.rel_mse) / extra
            if best is None or gain > best[0]:
                best = (gain, j)
    return best


def pick_formats(measurement: Measurement, budget_bytes: int) -> dict[str, QuantType]:
    """Formats for the measured Linears whose stored bytes sum to at most `budget_bytes`.

    Raises UserError naming the smallest budget that fits when even the smallest formats do not.
    """
    opts = {key: _options(layer.formats) for key, layer in measurement.layers.items()}
    choice = {key: 0 for key in opts}
    used = sum(o[0][1].bytes for o in opts.values())
    if used > budget_bytes:
        need, have = gb_pair(used, budget_bytes)  # never "needs 0.002 GB ... leaves 0.002 GB"
        raise UserError(f"the measured Linears need at least {need} in their smallest formats; "
                        f"the target leaves {have} for them")
    heap: list[tuple[float, str, int]] = []
    for key, o in opts.items():
        up = _best_upgrade(o, 0)
        if up is not None:
            heapq.heappush(heap, (-up[0], key, up[1]))
    while heap:
        _, key, j = heapq.heappop(heap)
        o = opts[key]
        extra = o[j][1].bytes - o[choice[key]][1].bytes
        if used + extra <= budget_bytes:
            used += extra
            choice[key] = j
        else:
            # this upgrade does not fit; a smaller one of the same layer might
            j_fit = [k for k in range(choice[key] + 1, j) if used + o[k][1].bytes - o[choice[key]][1].bytes <= budget_bytes]
            if not j_fit:
                continue
            o = o[: max(j_fit) + 1]
        up = _best_upgrade(o, choice[key])
        if up is not None:
            heapq.heappush(heap, (-up[0], key, up[1]))
    return {key: opts[key][c][0] for key, c in choice.items()}
