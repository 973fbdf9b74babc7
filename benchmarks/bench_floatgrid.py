"""round_to_format (pychop_jax.core.floatgrid) vs XLA's own float8 cast.

    python benchmarks/bench_floatgrid.py [--n 4194304] [--repeats 60]

Baseline: ``x.astype(jnp.float8_e4m3fn).astype(jnp.float32)`` jitted (XLA's native
conversion, round-to-nearest-even).  "vs base" = baseline time / our time, so > 1 means
faster than the cast.  Targets: >= 0.8x for float8_e4m3fn nearest-even, >= 0.5x for
custom formats without a native dtype (e3m4, e6m5).

Timing: the machine is shared and noisy, so the functions are timed interleaved, in
rotating blocks; each block starts with a few untimed runs (and at least ``--settle``
seconds of them) so the previous function's worker threads have gone quiet, and the
figure is the median over all timed runs.  The NumPy rows (eager
``array_api_compat.numpy``) are timed the same way in a separate group.
"""

from __future__ import annotations

import argparse
import os
import sys

import array_api_compat.numpy as xnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from _timing import HEADER, cpu_info, interleaved_medians, row  # noqa: E402

from pychop_jax.core.floatgrid import FORMATS, FloatFormat, round_to_format  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4 * 2 ** 20)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--settle", type=float, default=0.02)
    args = ap.parse_args()
    n = args.n
    print(cpu_info())
    print(f"jax {jax.__version__} "
          f"({jax.default_backend()}), numpy {np.__version__}; n = {n} float32")

    rng = np.random.default_rng(0)
    # "wide": normal values times 2**k, k in [-8, 8): exercises subnormals and overflow
    x_np = (rng.standard_normal(n) * np.exp2(rng.integers(-8, 8, n))).astype(np.float32)
    x = jax.device_put(x_np)
    x_std = jax.device_put(rng.standard_normal(n).astype(np.float32))
    noise = jax.device_put(rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32))
    e4m3 = FORMATS["float8_e4m3fn"]

    def ours(fmt, **kw):
        return jax.jit(lambda v: round_to_format(jnp, v, fmt, **kw))

    cast = jax.jit(lambda v: v.astype(jnp.float8_e4m3fn).astype(jnp.float32))
    cast_bf16 = jax.jit(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32))
    stoch = jax.jit(lambda v, r: round_to_format(jnp, v, e4m3, rounding="stochastic", noise=r))
    f_sat, f_ieee = ours(e4m3), ours(e4m3, overflow="ieee")
    f_e3m4, f_e6m5 = ours(FloatFormat(3, 4)), ours(FloatFormat(6, 5))
    f_rz, f_bf16 = ours(e4m3, rounding="toward_zero"), ours(FORMATS["bfloat16"])
    base_name = "XLA cast float8_e4m3fn (baseline), wide input"
    fns = {
        base_name: lambda: cast(x),
        "float8_e4m3fn nearest_even, saturate": lambda: f_sat(x),
        "float8_e4m3fn nearest_even, ieee": lambda: f_ieee(x),
        "e3m4 nearest_even (custom)": lambda: f_e3m4(x),
        "e6m5 nearest_even (custom)": lambda: f_e6m5(x),
        "float8_e4m3fn toward_zero": lambda: f_rz(x),
        "float8_e4m3fn stochastic (noise given)": lambda: stoch(x, noise),
        "bfloat16 nearest_even": lambda: f_bf16(x),
        "context: XLA cast bfloat16": lambda: cast_bf16(x),
        "XLA cast float8_e4m3fn, standard normal input": lambda: cast(x_std),
        "float8_e4m3fn nearest_even, standard normal input": lambda: f_sat(x_std),
    }
    targets = {"float8_e4m3fn nearest_even, saturate": ">= 0.8x",
               "float8_e4m3fn nearest_even, ieee": ">= 0.8x",
               "e3m4 nearest_even (custom)": ">= 0.5x", "e6m5 nearest_even (custom)": ">= 0.5x"}
    t = interleaved_medians(fns, repeats=args.repeats, settle=args.settle,
                            sync=jax.block_until_ready)
    print("\nJAX, jitted (vs base: the cast on the same input)\n" + HEADER)
    for name, sec in t.items():
        std = "standard normal" in name
        base = t["XLA cast float8_e4m3fn, standard normal input" if std else base_name]
        print(row(name, sec, n, base, targets.get(name, "")))

    tn = interleaved_medians({
        "NumPy: ml_dtypes cast float8_e4m3fn (baseline)":
            lambda: x_np.astype(ml_dtypes.float8_e4m3fn).astype(np.float32),
        "NumPy: float8_e4m3fn nearest_even (array_api_compat)":
            lambda: round_to_format(xnp, x_np, e4m3),
    }, repeats=max(10, args.repeats // 4), settle=args.settle)
    base = tn["NumPy: ml_dtypes cast float8_e4m3fn (baseline)"]
    print("\nNumPy, eager\n" + HEADER)
    for name, sec in tn.items():
        print(row(name, sec, n, base))


if __name__ == "__main__":
    main()
