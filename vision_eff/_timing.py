"""Timing in alternation: every setting once per round, so machine drift hits all settings alike.

Shared by ``vision-eff bench vit`` and ``vision-eff bench diffusion --rounds``.
"""
from __future__ import annotations

import statistics
from typing import Callable, Hashable, Sequence


def interleaved_rounds(time_one: Callable[[Hashable], float], keys: Sequence[Hashable], rounds: int,
                       baseline: Hashable, warmup: bool = True) -> dict:
    """Call ``time_one(key)`` (which returns seconds) for every key once per round, in an order that
    reverses every other round; with ``warmup`` one untimed round comes first.

    Returns, per key, ``{"seconds": median, "times": [...]}``, and for every key but ``baseline`` also
    ``"speedup"``: the median over rounds of ``baseline seconds / key seconds`` in the same round
    (paired ratios: a slow round slows both sides of its ratio).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    keys = list(keys)
    if baseline not in keys:
        raise ValueError(f"the baseline {baseline!r} must be one of the keys")
    times: dict = {k: [] for k in keys}
    first = 0 if warmup else 1
    for rnd in range(first, rounds + 1):
        for key in (keys if rnd % 2 else keys[::-1]):
            t = time_one(key)
            if rnd:  # round 0 warms up
                times[key].append(t)
    out = {k: {"seconds": statistics.median(v), "times": v} for k, v in times.items()}
    for k in keys:
        if k != baseline:
            out[k]["speedup"] = statistics.median(b / t for b, t in zip(times[baseline], times[k]))
    return out
