"""Float / block-scaled formats: jitted quantize and fake_quant vs XLA's own casts.

    python benchmarks/bench_formats.py [--n 4194304] [--repeats 20]

Baselines (jitted, same input, 4M float32 by default):

* per-tensor fp8 e4m3: ``(x * (1 / scale)).astype(float8_e4m3fn)``, XLA's convert
  (round to nearest even; NaN on overflow, no saturation, no NaN / subnormal
  handling).  Candidate: ``pj.quantize`` / ``pj.fake_quant`` with a known state.
* MXFP8 / MXFP4 (block 32 along the last axis): a naive jnp MX quantizer -- ``amax``
  per block, scale ``2^(floor(log2(amax)) - emax)`` by ``jnp.floor(jnp.log2(.))``,
  clip, XLA's convert -- the way MX is commonly emulated.  Candidate: ``pj.calibrate``
  + ``pj.quantize`` (bit-exact E8M0 exponents, saturation, the same bits on NumPy and
  Torch).
* NF4 (block 64): a naive ``argmin |t - table|`` over the 16 values.

"vs base" = baseline time / our time (higher is faster).  Medians of interleaved
blocks (``_timing.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from _timing import HEADER, interleaved_medians, row  # noqa: E402

import pychop_jax as pj  # noqa: E402
from pychop_jax.core.spec import NF4_VALUES  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def naive_mx(x, emax, dtype, fmax, block=32):
    xb = x.reshape(x.shape[:-1] + (-1, block))
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    e = jnp.floor(jnp.log2(jnp.where(amax == 0, 1.0, amax)))
    scale = jnp.exp2(e - emax)
    q = jnp.clip(xb / scale, -fmax, fmax).astype(dtype)
    return q.reshape(x.shape), scale


def naive_nf4(x, block=64):
    xb = x.reshape(x.shape[:-1] + (-1, block))
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    t = xb / jnp.where(amax == 0, 1.0, amax)
    code = jnp.argmin(jnp.abs(t[..., None] - jnp.asarray(NF4_VALUES)), axis=-1)
    return code.astype(jnp.uint8).reshape(x.shape), amax


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 22)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; jax {jax.__version__}; {args.n} float32 elements")
    x = jax.random.normal(jax.random.key(0), (args.n // 1024, 1024), jnp.float32)
    sync = jax.block_until_ready
    rows = []

    fp8 = pj.QuantSpec(dtype="float8_e4m3fn")
    state = pj.calibrate(x, fp8)
    inv = 1 / state.scale
    base = jax.jit(lambda x: (x * inv).astype(jnp.float8_e4m3fn))
    q = jax.jit(lambda x: pj.quantize(x, state))
    fq = jax.jit(lambda x: pj.fake_quant(x, state))
    t = interleaved_medians({"base": lambda: base(x), "q": lambda: q(x), "fq": lambda: fq(x)},
                            repeats=args.repeats, sync=sync)
    rows += [row("fp8 e4m3 per tensor: XLA cast x*inv -> f8 (baseline)", t["base"], args.n),
             row("jit(pj.quantize), known state -> float8_e4m3fn", t["q"], args.n, t["base"]),
             row("jit(pj.fake_quant), known state", t["fq"], args.n, t["base"])]

    for name, spec, dtype in (("MXFP8_E4M3", pj.formats.MXFP8_E4M3, jnp.float8_e4m3fn),
                              ("MXFP4", pj.formats.MXFP4, jnp.float4_e2m1fn)):
        base = jax.jit(lambda x, s=spec, d=dtype: naive_mx(x, s.emax_elem, d, s.max_value))
        ours = jax.jit(lambda x, s=spec: pj.quantize(x, pj.calibrate(x, s)))
        t = interleaved_medians({"base": lambda b=base: b(x), "ours": lambda o=ours: o(x)},
                                repeats=args.repeats, sync=sync)
        rows += [row(f"{name}: naive jnp MX (log2/exp2, clip, cast) (baseline)", t["base"],
                     args.n),
                 row(f"{name}: jit(calibrate + quantize)", t["ours"], args.n, t["base"])]

    base = jax.jit(naive_nf4)
    ours = jax.jit(lambda x: pj.quantize(x, pj.calibrate(x, pj.formats.NF4)))
    t = interleaved_medians({"base": lambda: base(x), "ours": lambda: ours(x)},
                            repeats=args.repeats, sync=sync)
    rows += [row("NF4: naive argmin over the table (baseline)", t["base"], args.n),
             row("NF4: jit(calibrate + quantize)", t["ours"], args.n, t["base"])]
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
