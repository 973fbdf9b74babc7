"""Small-row (decoding) matmuls with integer weights against the float32 dot.

    python benchmarks/bench_decode_matmul.py [--repeats 12] [--rows 1,8,16,128]
                                             [--shapes 2048x8192,8192x2048]

Prints the CPU (model, cores, vector / int8 instructions), then, per weight shape
``K x N`` and rows ``M`` of ``x``, jitted and timed interleaved
(``benchmarks/_timing.py``, medians), together with a probe of the machine's
weight-stream bandwidth (a float32 matrix-vector product over a 256 MiB matrix, GB/s
= its bytes / median time; timed in the same rounds, so a shared machine's load hits
it and the variants alike):

* ``fp32 dot``, ``bf16 dot`` (context): ``x @ W`` with W stored in that dtype;
* int8 weight-only per column, int4 per group of 128 (packed two codes per byte,
  symmetric): ``plain`` = dequantize the weight, then one float32 dot (XLA's
  formulation); ``ours (K,N)`` / ``ours (N,K)`` = ``xla_cpu.weight_only_matmul`` with
  the codes stored (K, N) (Flax's kernel layout) or (N, K);
* w8a8: int8 x int8 -> int32, ``plain`` = ``lax.dot_general``, ``ours`` =
  ``xla_cpu.int8_matmul`` (the activation's quantization is not included).

``--sweep`` instead times each formulation ``xla_cpu`` chooses between (the custom call's
decoding kernels and its GEMM, the K-chunked loop, one dot; for w8a8 the custom call and
XLA's dot) at every M of ``--rows``, for the codes laid out as each of ``--layouts``:
the measurement behind ``WEIGHT_ONLY_MAX_ROWS``, ``CHUNKED_MAX_ROWS`` and
``INT8_MAX_ROWS`` (re-run it on another CPU before trusting them there).  ``--only``
keeps the variants whose names contain one of its substrings; ``--cpu-time`` reports
this process's CPU time per call instead of wall time (then ``roof`` and ``GB/s`` mean
nothing).

Columns: median ms; ``vs fp32`` = fp32 dot time / this time at the same M; ``roof``
= (bytes this variant must read: weights, scales, x, output) / bandwidth, divided by
its time: the fraction of the memory-bandwidth roof it reaches; ``GB/s``: the probe.  Weights rotate
through copies that together exceed the last-level cache, as successive layers would.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import cpu_info, interleaved_medians  # noqa: E402

from pychop_jax.core import xla_cpu  # noqa: E402

HIGHEST = lax.Precision.HIGHEST
#: bytes of weights each variant rotates through (> the 32 MiB L3 of the EPYC measured)
ROTATE_BYTES = 96 << 20
GROUP = 128


def cpu_flags() -> str:
    """The vector / int8 instruction sets /proc/cpuinfo reports (yes / no)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "flags: unknown (no /proc/cpuinfo)"
    names = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return "flags: " + ", ".join(f"{n}={'yes' if n in flags else 'no'}" for n in names)


class Rotating:
    """``fn(x, *weights[i])`` with ``i`` advancing each call."""

    def __init__(self, fn, x, weights):
        self.fn, self.x, self.weights, self.i = jax.jit(fn), x, weights, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.weights)
        return self.fn(self.x, *self.weights[self.i])


def copies(nbytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // nbytes))


def stream_probe():
    """(callable, bytes): a float32 matrix-vector product over a 256 MiB matrix."""
    K, N = 8192, 8192
    w = jax.random.normal(jax.random.key(0), (K, N), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, K), jnp.float32)
    f = jax.jit(lambda x, w: jnp.dot(x, w, precision=HIGHEST))
    return (lambda: f(x, w)), K * N * 4


def variants(K: int, N: int, M: int, rng):
    """name -> (callable, bytes read)."""
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    a8 = jnp.asarray(rng.integers(-127, 128, (M, K)), jnp.int8)
    io = M * K * 4 + M * N * 4
    out = {}
    w32 = [(jnp.asarray(rng.standard_normal((K, N)), jnp.float32),)
           for _ in range(copies(K * N * 4))]
    out["fp32 dot"] = (Rotating(lambda x, w: jnp.dot(x, w, precision=HIGHEST), x, w32),
                       K * N * 4 + io)
    wbf = [(w.astype(jnp.bfloat16),) for (w,) in w32[:copies(K * N * 2)]]
    out["bf16 dot"] = (Rotating(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w,
                                                     preferred_element_type=jnp.float32),
                                x, wbf), K * N * 2 + M * K * 2 + M * N * 4)

    q8 = [jnp.asarray(rng.integers(-127, 128, (K, N)), jnp.int8) for _ in range(copies(K * N))]
    s8 = jnp.asarray(rng.random((1, N)) + 0.5, jnp.float32)
    b8 = K * N + N * 4 + io

    def plain8(x, q, s):
        return jnp.dot(x, q.astype(jnp.float32) * s, precision=HIGHEST)

    out["int8 w-only plain"] = (Rotating(plain8, x, [(q, s8) for q in q8]), b8)
    out["int8 w-only ours (K,N)"] = (Rotating(
        lambda x, q, s: xla_cpu.weight_only_matmul(x, q, s, k_axis=0), x,
        [(q, s8) for q in q8]), b8)
    q8t = [jnp.asarray(q.T) for q in q8]
    out["int8 w-only ours (N,K)"] = (Rotating(
        lambda x, q, s: xla_cpu.weight_only_matmul(x, q, s, k_axis=1), x,
        [(q, s8.T) for q in q8t]), b8)

    # int4, symmetric, groups of 128 along K: any byte is two fields q + 8 (packing.pack)
    nq4 = copies(K * N // 2)
    p4 = [jnp.asarray(rng.integers(0, 256, (K, N // 2)), jnp.uint8) for _ in range(nq4)]
    p4t = [jnp.asarray(rng.integers(0, 256, (N, K // 2)), jnp.uint8) for _ in range(nq4)]
    s4 = jnp.asarray(rng.random((K // GROUP, N)) + 0.5, jnp.float32)
    b4 = K * N // 2 + (K // GROUP) * N * 4 + io

    def plain4(x, p, s):
        u = ((p[..., None] >> jnp.array([0, 4], jnp.uint8)) & 15).reshape(K, N)
        w = (u.astype(jnp.float32) - 8) * jnp.repeat(s, GROUP, axis=0)
        return jnp.dot(x, w, precision=HIGHEST)

    kw4 = dict(group_size=GROUP, bits=4, packed=True, qmin=-8)
    out["int4 g128 w-only plain"] = (Rotating(plain4, x, [(p, s4) for p in p4]), b4)
    out["int4 g128 w-only ours (K,N)"] = (Rotating(
        lambda x, p, s: xla_cpu.weight_only_matmul(x, p, s, k_axis=0, **kw4), x,
        [(p, s4) for p in p4]), b4)
    out["int4 g128 w-only ours (N,K)"] = (Rotating(
        lambda x, p, s: xla_cpu.weight_only_matmul(x, p, s, k_axis=1, **kw4), x,
        [(p, s4.T) for p in p4t]), b4)

    bi = K * N + M * K + M * N * 4
    dn = lambda bk: (((1,), (bk,)), ((), ()))  # noqa: E731
    out["w8a8 plain"] = (Rotating(lambda a, b: lax.dot_general(
        a, b, dn(0), preferred_element_type=jnp.int32), a8, [(q,) for q in q8]), bi)
    out["w8a8 ours (K,N)"] = (Rotating(lambda a, b: xla_cpu.int8_matmul(a, b), a8,
                                       [(q,) for q in q8]), bi)
    out["w8a8 ours (N,K)"] = (Rotating(lambda a, b: xla_cpu.int8_matmul(a, b, b_k_axis=1),
                                       a8, [(q,) for q in q8t]), bi)
    return out


def check(K, N, rng):
    """The formulations agree (float64 reference of the int8 case, exact int8)."""
    x = rng.standard_normal((3, K)).astype(np.float32)
    q = rng.integers(-127, 128, (K, N)).astype(np.int8)
    s = (rng.random((1, N)) + 0.5).astype(np.float32)
    ref = x.astype(np.float64) @ (q * s.astype(np.float64))
    got = np.asarray(jax.jit(xla_cpu.weight_only_matmul)(x, q, s))
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(x) @ np.abs(q * s)), "w-only"
    a = rng.integers(-127, 128, (3, K)).astype(np.int8)
    assert np.array_equal(np.asarray(jax.jit(xla_cpu.int8_matmul)(a, q)),
                          a.astype(np.int64) @ q.astype(np.int64)), "w8a8"


def sweep_variants(K: int, N: int, M: int, rng, layouts=("K,N",)):
    """name -> (callable, bytes read): each formulation of ``xla_cpu`` on its own, for
    codes laid out as each of ``layouts`` ("K,N", "N,K")."""
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    a8 = jnp.asarray(rng.integers(-127, 128, (M, K)), jnp.int8)
    io = M * K * 4 + M * N * 4
    w32 = [(jnp.asarray(rng.standard_normal((K, N)), jnp.float32),)
           for _ in range(copies(K * N * 4))]
    out = {"fp32 dot": (Rotating(lambda x, w: jnp.dot(x, w, precision=HIGHEST), x, w32),
                        K * N * 4 + io)}
    q8 = [jnp.asarray(rng.integers(-127, 128, (K, N)), jnp.int8) for _ in range(copies(K * N))]
    s8 = jnp.asarray(rng.random((1, N)) + 0.5, jnp.float32)
    s4 = jnp.asarray(rng.random((K // GROUP, N)) + 0.5, jnp.float32)

    def path(name, k_axis, **kw):
        def f(x, codes, scale):
            w = xla_cpu._WeightOnly.of(x, codes, scale, None, k_axis=k_axis, n=None, **kw)
            if name in ("custom call", "custom GEMM"):
                return xla_cpu._wo_kernel(w, isa=1, gemm=name == "custom GEMM")
            kc = xla_cpu._chunk_rows(w)
            return xla_cpu._wo_chunked(w, kc) if name == "K-chunked loop" else xla_cpu._wo_plain(w)
        return f

    for layout in layouts:
        k_axis = 0 if layout == "K,N" else 1
        shape4 = (K, N // 2) if k_axis == 0 else (N, K // 2)
        q = q8 if k_axis == 0 else [jnp.asarray(c.T) for c in q8]
        p4 = [jnp.asarray(rng.integers(0, 256, shape4), jnp.uint8)
              for _ in range(copies(K * N // 2))]
        for grid, weights, scale, b, kw in (
                ("int8", q, s8, K * N + N * 4 + io, dict(group_size=None, bits=8, packed=False,
                                                         qmin=None)),
                ("int4 g128", p4, s4, K * N // 2 + (K // GROUP) * N * 4 + io,
                 dict(group_size=GROUP, bits=4, packed=True, qmin=-8))):
            scale = scale if k_axis == 0 else scale.T
            for name in ("one dot", "K-chunked loop", "custom call", "custom GEMM"):
                out[f"{grid} ({layout}) {name}"] = (Rotating(
                    path(name, k_axis, **kw), x, [(w, scale) for w in weights]), b)
    bi = K * N + M * K + M * N * 4
    out["w8a8 (K,N) XLA dot"] = (Rotating(lambda a, b: xla_cpu._int8_plain(a, b, 0), a8,
                                          [(q,) for q in q8]), bi)
    out["w8a8 (K,N) custom call"] = (Rotating(lambda a, b: xla_cpu._int8_kernel(a, b, 0, 1),
                                              a8, [(q,) for q in q8]), bi)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--rows", default="1,8,16,128")
    parser.add_argument("--shapes", default="2048x8192,8192x2048")
    parser.add_argument("--sweep", action="store_true",
                        help="time each formulation on its own (the thresholds)")
    parser.add_argument("--layouts", default="K,N",
                        help="--sweep: code layouts, 'K,N' and / or 'N,K' (';'-separated)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="medians of this process's CPU time per call (all threads) "
                             "instead of wall time: less moved by other jobs' load")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: time only the variants whose "
                             "names contain one (the fp32 dot always)")
    args = parser.parse_args()
    print(cpu_info())
    print(cpu_flags())
    kernels = xla_cpu.decode_kernels_available()
    print(f"jax {jax.__version__} ({jax.default_backend()}); decoding custom call: "
          f"{'built' if kernels else 'NOT built (pure XLA)'}; thresholds: custom call "
          f"M <= {xla_cpu.WEIGHT_ONLY_MAX_ROWS} (w-only) / {xla_cpu.INT8_MAX_ROWS} (w8a8; "
          f"{xla_cpu.INT8_MAX_ROWS_SMALL} under {xla_cpu.INT8_LARGE_WEIGHTS} codes), "
          f"K-chunked loop M <= {xla_cpu.CHUNKED_MAX_ROWS}")
    probe, probe_bytes = stream_probe()
    rng = np.random.default_rng(0)
    rows = [int(m) for m in args.rows.split(",")]
    print(f"| {'K x N':<11} | {'M':>4} | {'variant':<30} | {'ms (med)':>9} | {'vs fp32':>7} "
          f"| {'roof':>5} | {'GB/s':>5} |")
    print(f"|{'-' * 13}|{'-' * 6}|{'-' * 32}|{'-' * 11}|{'-' * 9}|{'-' * 7}|{'-' * 7}|")
    for shape in args.shapes.split(","):
        K, N = (int(d) for d in shape.split("x"))
        check(K, N, rng)
        for M in rows:
            if args.sweep and not kernels:
                raise SystemExit("--sweep needs the custom call (python setup.py build_ext "
                                 "--inplace)")
            fns = (sweep_variants(K, N, M, rng, args.layouts.split(";")) if args.sweep
                   else variants(K, N, M, rng))
            if args.only:
                keep = args.only.split(",")
                fns = {k: v for k, v in fns.items()
                       if k == "fp32 dot" or any(o in k for o in keep)}
            t = interleaved_medians({"probe": probe, **{k: f for k, (f, _) in fns.items()}},
                                    repeats=args.repeats, sync=jax.block_until_ready,
                                    clock=time.process_time if args.cpu_time else time.perf_counter)
            gbs = probe_bytes / t["probe"] / 1e9
            base = t["fp32 dot"]
            for name, (_, nbytes) in fns.items():
                roof = nbytes / (gbs * 1e9) / t[name]
                print(f"| {shape:<11} | {M:>4} | {name:<30} | {t[name] * 1e3:9.3f} "
                      f"| {base / t[name]:6.2f}x | {roof:5.0%} | {gbs:5.1f} |", flush=True)
            del fns


if __name__ == "__main__":
    main()
