"""pychop's float emulators (Chop, mx_quantize) vs pychop 0.6.2 itself.

    python benchmarks/bench_formats.py [--pychop-python /tmp/pychop062/bin/python]
                                       [--n 4194304] [--rounds 3]

pychop 0.6.2 imports as ``pychop`` like ours, so it runs in a worker process started
from a separate virtualenv (``python -m venv /tmp/pychop062 && /tmp/pychop062/bin/pip
install pychop==0.6.2 numpy torch==2.13.0 jax==0.10.2``).  The worker builds the same
input (float32 standard normal, seed 0), warms every function up, then times one call
per request; this process asks for one call of each workload per round, interleaved
with blocks of our own calls (``_timing``'s settling before each block), and reports
medians: pychop's over the rounds, ours over all timed calls.  "vs base" = pychop's
time / ours (> 1: faster).  Targets on 4M float32: ``Chop(4, 3)`` JAX >= 20x, NumPy
>= 100x; jitted MXFP4 ``mx_quantize`` >= 1000x pychop's (NumPy) ``mx_quantize``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from _timing import HEADER, row  # noqa: E402

import pychop  # noqa: E402

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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pychop-python", default="/tmp/pychop062/bin/python")
    ap.add_argument("--n", type=int, default=4 * 2 ** 20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5, help="our timed calls per round")
    args = ap.parse_args()
    n = args.n
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); jax {jax.__version__}, "
          f"torch {torch.__version__}, numpy {np.__version__}; n = {n} float32")

    # outside this checkout and without PYTHONPATH, so that its `import pychop` is 0.6.2
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    worker = subprocess.Popen([args.pychop_python, "-c", WORKER, str(n)], text=True, env=env,
                              cwd=os.path.expanduser("~"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    ready = json.loads(worker.stdout.readline())
    print(f"pychop {ready['ready']} worker: {args.pychop_python} ({ready['file']})")

    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
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

    print(HEADER)
    for key, (label, _, target) in ours.items():
        base = statistics.median(theirs[key])
        print(row(f"pychop 0.6.2 {key.replace('_', ' ')} (baseline)", base, n))
        print(row(label, statistics.median(mine[key]), n, base, target))
    base = statistics.median(theirs["mx_numpy"])
    for key, (label, _) in extra.items():
        print(row(label, statistics.median(mine[key]), n, base))


if __name__ == "__main__":
    main()
