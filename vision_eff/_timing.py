"""Timing in alternation: every setting once per round, so machine drift hits all settings alike.

Shared by ``vision-eff bench vit`` and ``vision-eff bench diffusion --rounds``; the allocator option
(:func:`add_allocator_option`, :func:`set_allocator`) also by ``vision-eff generate`` and ``vision-eff zoo train``.
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str | None:
    """Tell glibc's allocator to keep freed memory in the process (no mmap for large blocks, no trimming).

    By default glibc serves large blocks (a ViT's activations) with mmap, returns them to the system on
    free and trims the heap, so the next allocation faults its pages in again one by one. How often that
    happens depends on what ran just before: timing two models in alternation makes each pay page faults
    that a model served on its own does not, unevenly between them (README: "The allocator"). Applied
    once per process; the process then never gives memory back. Returns a line saying what was set, or
    None off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return None
    if mallopt is None or not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return None
    return "glibc malloc keeps freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


SYSTEM_ALLOCATOR = "as the system set it (nothing changed)"


def add_allocator_option(parser) -> None:
    """``--system-allocator`` on a timing command's argparse parser (read back by :func:`set_allocator`)."""
    parser.add_argument(
        "--system-allocator", action="store_true",
        help="leave glibc's allocator as it is; by default this command makes it keep freed memory, since its "
             "returns to the system make every model pay page faults again (see vision_eff._timing.keep_freed_memory)")


def set_allocator(system_allocator: bool) -> str:
    """Keep freed memory unless ``system_allocator``; returns the ``allocator:`` line a result file records."""
    return (None if system_allocator else keep_freed_memory()) or SYSTEM_ALLOCATOR
