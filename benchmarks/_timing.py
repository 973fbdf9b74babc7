"""Timing helpers shared by the benchmark scripts.

This machine is noisy (2 shared cores), so a baseline and the candidates it is
compared with are timed *interleaved*: every round runs each function for a short
block, in turn, and the reported figure is the median over all rounds.  Slow drifts
of the machine then hit baseline and candidate alike.

Each block starts with ``settle`` seconds of untimed runs of the same function.  Right
after a switch the other framework's worker threads are still spinning (torch's
OpenMP pool spins for milliseconds after a parallel region, XLA's pool likewise) and
compete for the two cores with whoever runs next.  Discarding one run is not enough:
measured on a 4M-element quantize, the function timed right after torch lost 0.2-0.3
ms per call (30-50 %), and torch timed right after JAX lost 10-20 %, for a whole
5-run block.  With 20 ms of settling, the order of the functions no longer matters.
"""

from __future__ import annotations

import os
import platform
import statistics
import time


def interleaved_medians(fns: dict, *, repeats: int = 30, block: int = 5, warmup: int = 2,
                        settle: float = 0.02, sync=None, clock=time.perf_counter) -> dict:
    """Median wall time (s) of each ``fn()`` in ``fns``, timed in rotating blocks.

    Each of ``repeats // (block - 1)`` rounds runs every function for ``settle``
    seconds (at least once) untimed, then ``block - 1`` timed times in a row.
    ``sync(result)`` blocks until asynchronous work is done (e.g.
    ``jax.block_until_ready``).  ``clock=time.process_time`` times this process's CPU
    seconds instead (all its threads): what a call costs, which other jobs' load on a
    shared machine moves much less than the wall time.
    """
    sync = sync or (lambda r: r)
    for _ in range(warmup):
        for fn in fns.values():
            sync(fn())
    times = {name: [] for name in fns}
    rounds = max(1, -(-repeats // (block - 1)))
    for _ in range(rounds):
        for name, fn in fns.items():
            until = time.perf_counter() + settle
            sync(fn())
            while time.perf_counter() < until:
                sync(fn())
            for _ in range(block - 1):
                t0 = clock()
                sync(fn())
                times[name].append(clock() - t0)
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


#: /proc/cpuinfo flags of the CPU's int8 matrix / dot-product instructions
_INT8_FLAGS = {"amx_int8": "AMX-INT8", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI"}


def cpu_info() -> str:
    """The CPU model, core count and int8 instructions (AMX, VNNI): integer-matmul
    speed-ups depend on them, so every benchmark prints this line first."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    int8 = ", ".join(name for flag, name in _INT8_FLAGS.items() if flag in flags) or "none"
    return f"CPU: {model} ({os.cpu_count()} logical cores; int8 instructions: {int8})"
