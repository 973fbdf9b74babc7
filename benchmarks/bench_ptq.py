"""Integer execution vs float32, and checkpoint sizes.

    python benchmarks/bench_ptq.py [--repeats 12]

In one process: (1) a 2048^3 matmul in float32 vs the int8 path (quantize the float
activations per tensor, int8 x int8 -> int32 product with pre-quantized per-channel
weights, zero-point correction and rescale); (2) an MLP forward at batch 256 with
stock ``flax.linen.Dense`` layers, float32 vs ``QuantizedArray`` kernels served with
``pj.int_dot_general``; (3) checkpoint bytes of that MLP in float32, int8 and packed
int4.  "speed-up" = float32 time / int8 time.
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
from flax import serialization

sys.path.insert(0, os.path.dirname(__file__))
from _timing import cpu_info, interleaved_medians  # noqa: E402

import pychop_jax as pj  # noqa: E402

DN = (((1,), (0,)), ((), ()))


class MLP(nn.Module):
    widths: tuple = (4096, 4096, 1024)
    int8: bool = False

    @nn.compact
    def __call__(self, x):
        kw = dict(dot_general=pj.make_int_dot_general(),
                  promote_dtype=pj.promote_dtype) if self.int8 else {}
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, **kw)(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    sync = jax.block_until_ready
    print(cpu_info())
    print(f"jax {jax.__version__} ({jax.default_backend()})")

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    n = 2048
    a = jax.random.normal(k1, (n, n))
    w = jax.random.normal(k2, (n, n)) / n**0.5
    qw = pj.QuantizedArray.quantize(w, pj.serving.int_matmul.DEFAULT_WEIGHT_SPEC)
    f32 = jax.jit(lambda a, w: a @ w)
    i8 = jax.jit(lambda a, qw: pj.int_dot_general(a, qw, DN))
    t = interleaved_medians({"f32": lambda: f32(a, w), "int8": lambda: i8(a, qw)},
                            repeats=args.repeats, block=3, sync=sync)
    print("\n| workload | float32 ms | int8 path ms | speed-up (target >= 1.5x) |")
    print("|---|---|---|---|")
    print(f"| matmul {n}^3 (int8 path incl. activation quantization) | "
          f"{t['f32'] * 1e3:.1f} | {t['int8'] * 1e3:.1f} | {t['f32'] / t['int8']:.2f}x |")

    x = jax.random.normal(k3, (256, 1024))
    params = MLP().init(jax.random.key(1), x)
    qparams, _ = pj.quantize_params(params, [("kernel", pj.serving.int_matmul.DEFAULT_WEIGHT_SPEC)])
    fwd_f32 = jax.jit(MLP().apply)
    fwd_i8 = jax.jit(MLP(int8=True).apply)
    t = interleaved_medians({"f32": lambda: fwd_f32(params, x),
                             "int8": lambda: fwd_i8(qparams, x)},
                            repeats=args.repeats, block=3, sync=sync)
    print(f"| MLP 1024-4096-4096-1024 forward, batch 256 | {t['f32'] * 1e3:.1f} | "
          f"{t['int8'] * 1e3:.1f} | {t['f32'] / t['int8']:.2f}x |")

    fp32_bytes = len(serialization.to_bytes(params))
    q4params, _ = pj.quantize_params(params, [("kernel", pj.QuantSpec(4, True, axis=-1))])
    print("\n| checkpoint of that MLP | bytes | vs float32 |")
    print("|---|---|---|")
    to_bytes = pj.serving.checkpoint.to_bytes
    for name, size in (("float32 (flax.serialization)", fp32_bytes),
                       ("int8 kernels (pj.save_quantized)", len(to_bytes(qparams))),
                       ("packed int4 kernels", len(to_bytes(q4params)))):
        print(f"| {name} | {size:,} | {fp32_bytes / size:.2f}x smaller |")


if __name__ == "__main__":
    main()
