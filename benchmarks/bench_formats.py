"""Float and block-scaled formats: jitted fake-quant vs XLA's casts, and pychop's float
emulators (``Chop``, ``mx_quantize``) vs pychop 0.6.2 itself (the issue-12 targets).

    python benchmarks/bench_formats.py [--n 4194304] [--repeats 20] [--rounds 3]
                                       [--pychop-python /tmp/pychop062/bin/python]
                                       [--no-pychop]

Part 1, formats vs XLA's casts (jitted JAX, 4M float32 standard normal, interleaved
medians, ``_timing``); "vs base" = baseline time / ours (> 1: faster):

* fp8 e4m3, per tensor: baseline the round trip ``(x * inv).astype(float8_e4m3fn)
  .astype(float32) * scale``; ``pj.fake_quant`` with a known state (target >= 0.8x).
  ``pj.quantize`` to float8_e4m3fn codes against the cast alone.
* custom formats without a native dtype: ``pychop.Chop(3, 4)`` / ``Chop(6, 5)`` jitted
  (``floatgrid.round_to_format``) against the e3m4 cast round trip
  ``x.astype(float8_e3m4).astype(float32)`` (target >= 0.5x).
* MXFP8 / MXFP4 (block 32): a naive jnp MX quantizer (``floor(log2(amax))`` by
  ``jnp.log2``, clip, XLA's convert) against ``calibrate + quantize`` and the stateless
  MX value rule ``blockscale.mx_fake_quant`` (what ``pychop.mx_quantize`` runs);
  NF4 (block 64): a naive ``argmin`` over the table.

Part 2, pychop 0.6.2 (skipped with ``--no-pychop``): pychop 0.6.2 imports as ``pychop``
like ours, so it runs in a worker process from a separate virtualenv (``python -m venv
/tmp/pychop062 && /tmp/pychop062/bin/pip install pychop==0.6.2 numpy torch==2.13.0
jax==0.10.2``).  The worker builds the same input, warms up, then times one call per
request; this process asks for one call of each workload per round, interleaved with
blocks of our own calls, and reports medians.  "vs base" = pychop's time / ours.
Targets: ``Chop(4, 3)`` JAX >= 20x, NumPy >= 100x; jitted MXFP4 ``mx_quantize`` >=
1000x pychop's (NumPy) ``mx_quantize``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from _timing import HEADER, cpu_info, interleaved_medians, row  # noqa: E402

import pychop  # noqa: E402
import pychop_jax as pj  # noqa: E402
from pychop_jax.core import blockscale  # noqa: E402
from pychop_jax.core.spec import NF4_VALUES  # noqa: E402

WORKER = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, jax, jax.numpy as jnp, torch, pychop
n = int(sys.argv[1])
x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
xj, xt = jnp.asarray(x), torch.from_numpy(x.copy())
ch = pychop.Chop(4, 3)
fns = {
    "chop_numpy": lambda: ch(x),
    "chop_jax": lambda: jax.block_until_ready(ch(xj)),
    "chop_torch": lambda: ch(xt),
    "mx_numpy": lambda: pychop.mx_quantize(x, "mxfp4_e2m1"),
}
for f in fns.values():
    f()
print(json.dumps({"ready": pychop.__version__, "file": pychop.__file__}), flush=True)
for line in sys.stdin:
    name = line.strip()
    t0 = time.perf_counter(); fns[name](); dt = time.perf_counter() - t0
    print(json.dumps({name: dt}), flush=True)
"""


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


def time_block(fn, runs: int, settle: float = 0.02) -> list:
    until = time.perf_counter() + settle
    fn()
    while time.perf_counter() < until:
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def formats_vs_casts(x, n: int, repeats: int) -> list:
    sync = jax.block_until_ready
    rows = []
    fp8 = pj.QuantSpec(dtype="float8_e4m3fn")
    state = pj.calibrate(x, fp8)
    scale, inv = state.scale, 1 / state.scale
    round_trip = jax.jit(lambda v: (v * inv).astype(jnp.float8_e4m3fn).astype(jnp.float32)
                         * scale)
    cast = jax.jit(lambda v: (v * inv).astype(jnp.float8_e4m3fn))
    fq = jax.jit(lambda v: pj.fake_quant(v, state))
    q = jax.jit(lambda v: pj.quantize(v, state))
    e3m4_cast = jax.jit(lambda v: v.astype(jnp.float8_e3m4).astype(jnp.float32))
    c34, c65 = pychop.Chop(3, 4), pychop.Chop(6, 5)
    f34, f65 = jax.jit(lambda v: c34(v)), jax.jit(lambda v: c65(v))
    t = interleaved_medians({"rt": lambda: round_trip(x), "fq": lambda: fq(x),
                             "cast": lambda: cast(x), "q": lambda: q(x),
                             "c34": lambda: e3m4_cast(x), "e3m4": lambda: f34(x),
                             "e6m5": lambda: f65(x)}, repeats=repeats, sync=sync)
    rows += [row("fp8 e4m3: XLA cast round trip (x*inv -> f8) * s (baseline)", t["rt"], n),
             row("jit(pj.fake_quant) e4m3, known state", t["fq"], n, t["rt"], ">= 0.8x"),
             row("fp8 e4m3: XLA cast x*inv -> f8 (baseline)", t["cast"], n),
             row("jit(pj.quantize) -> float8_e4m3fn codes, known state", t["q"], n,
                 t["cast"]),
             row("XLA cast round trip float8_e3m4 (baseline)", t["c34"], n),
             row("jit(Chop(3, 4)) e3m4 (custom format)", t["e3m4"], n, t["c34"], ">= 0.5x"),
             row("jit(Chop(6, 5)) e6m5 (custom format)", t["e6m5"], n, t["c34"], ">= 0.5x")]

    for name, spec, dtype in (("MXFP8_E4M3", pj.formats.MXFP8_E4M3, jnp.float8_e4m3fn),
                              ("MXFP4", pj.formats.MXFP4, jnp.float4_e2m1fn)):
        base = jax.jit(lambda v, s=spec, d=dtype: naive_mx(v, s.emax_elem, d, s.max_value))
        ours = jax.jit(lambda v, s=spec: pj.quantize(v, pj.calibrate(v, s)))
        vals = jax.jit(lambda v, s=spec: blockscale.mx_fake_quant(jnp, v, s))
        t = interleaved_medians({"base": lambda b=base: b(x), "ours": lambda o=ours: o(x),
                                 "vals": lambda f=vals: f(x)}, repeats=repeats, sync=sync)
        rows += [row(f"{name}: naive jnp MX (log2, clip, cast) (baseline)", t["base"], n),
                 row(f"{name}: jit(calibrate + quantize)", t["ours"], n, t["base"]),
                 row(f"{name}: jit(blockscale.mx_fake_quant), exact values", t["vals"], n,
                     t["base"])]

    base = jax.jit(naive_nf4)
    ours = jax.jit(lambda v: pj.quantize(v, pj.calibrate(v, pj.formats.NF4)))
    t = interleaved_medians({"base": lambda: base(x), "ours": lambda: ours(x)},
                            repeats=repeats, sync=sync)
    rows += [row("NF4: naive argmin over the table (baseline)", t["base"], n),
             row("NF4: jit(calibrate + quantize)", t["ours"], n, t["base"])]
    return rows


def versus_pychop_062(x, n: int, args) -> list:
    # outside this checkout and without PYTHONPATH, so that its `import pychop` is 0.6.2
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    worker = subprocess.Popen([args.pychop_python, "-c", WORKER, str(n)], text=True, env=env,
                              cwd=os.path.expanduser("~"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    ready = json.loads(worker.stdout.readline())
    print(f"pychop {ready['ready']} worker: {args.pychop_python} ({ready['file']})")
    xj, xt = jnp.asarray(x), torch.from_numpy(x.copy())
    ch = pychop.Chop(4, 3)
    mx_jit = jax.jit(lambda v: pychop.mx_quantize(v, "mxfp4_e2m1"))
    ours = {
        "chop_numpy": ("Chop(4, 3) NumPy", lambda: ch(x), ">= 100x"),
        "chop_jax": ("Chop(4, 3) JAX (eager call, jitted kernel)",
                     lambda: jax.block_until_ready(ch(xj)), ">= 20x"),
        "chop_torch": ("Chop(4, 3) Torch", lambda: ch(xt), ""),
        "mx_numpy": ("mx_quantize MXFP4, jitted JAX", lambda: jax.block_until_ready(mx_jit(xj)),
                     ">= 1000x"),
    }
    extra = {"mx_numpy_ours": ("mx_quantize MXFP4, NumPy",
                               lambda: pychop.mx_quantize(x, "mxfp4_e2m1"))}
    for _, fn, *_ in ours.values():
        fn()
    for _, fn in extra.values():
        fn()
    theirs = {k: [] for k in ours}
    mine = {k: [] for k in list(ours) + list(extra)}
    for _ in range(args.rounds):
        for key in ours:
            worker.stdin.write(key + "\n")
            worker.stdin.flush()
            theirs[key].append(json.loads(worker.stdout.readline())[key])
            mine[key] += time_block(ours[key][1], args.runs)
        for key, (_, fn) in extra.items():
            mine[key] += time_block(fn, args.runs)
    worker.stdin.close()
    worker.wait()
    rows = []
    for key, (label, _, target) in ours.items():
        base = statistics.median(theirs[key])
        rows.append(row(f"pychop 0.6.2 {key.replace('_', ' ')} (baseline)", base, n))
        rows.append(row(label, statistics.median(mine[key]), n, base, target))
    base = statistics.median(theirs["mx_numpy"])
    for key, (label, _) in extra.items():
        rows.append(row(label, statistics.median(mine[key]), n, base))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4 * 2 ** 20)
    ap.add_argument("--repeats", type=int, default=20, help="part 1: timed runs per function")
    ap.add_argument("--rounds", type=int, default=3, help="part 2: rounds against pychop")
    ap.add_argument("--runs", type=int, default=5, help="part 2: our timed calls per round")
    ap.add_argument("--pychop-python", default="/tmp/pychop062/bin/python")
    ap.add_argument("--no-pychop", action="store_true",
                    help="skip part 2 (no pychop 0.6.2 virtualenv on this machine)")
    args = ap.parse_args()
    n = args.n - args.n % 1024
    print(cpu_info())
    print(f"jax {jax.__version__}, torch {torch.__version__}, numpy {np.__version__}; "
          f"n = {n} float32 (standard normal, seed 0)")
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    print("\nPart 1: formats vs XLA casts (jitted JAX, input shape (n/1024, 1024))\n" + HEADER)
    print("\n".join(formats_vs_casts(jnp.asarray(x.reshape(-1, 1024)), n, args.repeats)))
    if args.no_pychop:
        print("\nPart 2 (pychop 0.6.2) skipped: --no-pychop")
        return
    print("\nPart 2: pychop vs pychop 0.6.2 (flat input)")
    rows = versus_pychop_062(x, n, args)
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
