"""Timing helpers shared by the benchmark scripts.

This machine is noisy (2 shared cores), so a baseline and the candidates it is
compared with are timed *interleaved*: every round runs each function for a short
block, in turn, and the reported figure is the median over all rounds.  Slow drifts
of the machine then hit baseline and candidate alike.  The first run of each block is
discarded: right after a switch, the other framework's worker threads are still
spinning (torch's OpenMP pool) and would be charged to whoever runs next.
"""

from __future__ import annotations

import statistics
import time


def interleaved_medians(fns: dict, *, repeats: int = 30, block: int = 5, warmup: int = 2,
                        sync=None) -> dict:
    """Median wall time (s) of each ``fn()`` in ``fns``, timed in rotating blocks.

    Each of ``repeats // (block - 1)`` rounds runs every function ``block`` times in a
    row and keeps the last ``block - 1`` timings.  ``sync(result)`` blocks until
    asynchronous work is done (e.g. ``jax.block_until_ready``).
    """
    sync = sync or (lambda r: r)
    for _ in range(warmup):
        for fn in fns.values():
            sync(fn())
    times = {name: [] for name in fns}
    rounds = max(1, -(-repeats // (block - 1)))
    for _ in range(rounds):
        for name, fn in fns.items():
            for i in range(block):
                t0 = time.perf_counter()
                sync(fn())
                if i:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(name: str, seconds: float, elements: int | None = None, baseline: float | None = None,
        target: str = "") -> str:
    """One table row: name, median ms, Gelem/s, ratio to the baseline (time_base / time)."""
    rate = f"{elements / seconds / 1e9:8.3f}" if elements else " " * 8
    ratio = f"{baseline / seconds:7.2f}x" if baseline else " " * 8
    return f"| {name:<58} | {seconds * 1e3:8.3f} | {rate} | {ratio} | {target:<10} |"


HEADER = (
    f"| {'workload':<58} | {'ms (med)':>8} | {'Gelem/s':>8} | {'vs base':>8} | {'target':<10} |\n"
    f"|{'-' * 60}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 12}|"
)
