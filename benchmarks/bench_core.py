"""Core ops vs PyTorch's quantization kernels, and a QAT grad step vs fp32.

    python benchmarks/bench_core.py [--n 4194304] [--repeats 80]

Every ratio is measured in this one process, baseline and candidates interleaved
(benchmarks/_timing.py): "vs base" = baseline time / our time, so > 1 means faster
than the baseline (for the grad step it is shown as time / baseline time, lower is
better).  Rows marked "context" are references, not part of the library.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import HEADER, cpu_info, interleaved_medians, row  # noqa: E402

import pychop_jax as pj  # noqa: E402

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


def sync(result):
    """Wait for JAX results; torch CPU ops are synchronous already."""
    return jax.block_until_ready(result) if not isinstance(result, torch.Tensor) else result


def standalone_ops(n: int, reps: int) -> None:
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(n).astype(np.float32)
    x_jax = jax.device_put(x_np)
    x_t = torch.from_numpy(x_np.copy())
    spec = pj.QuantSpec(bits=8)  # asymmetric -> uint8, like torch.quint8
    state = pj.calibrate(x_jax, spec)
    scale, zp = float(state.scale[0]), int(state.zero_point[0])
    inv, zpf = np.float32(1 / scale), np.float32(zp)

    jq = jax.jit(pj.quantize)
    jcq = jax.jit(lambda x: pj.quantize(x, pj.calibrate(x, spec)))
    naive_q = jax.jit(lambda x: jnp.clip(jnp.round(x * inv) + zpf, 0, 255).astype(jnp.uint8))
    cast = jax.jit(lambda x: x.astype(jnp.uint8))

    @jax.jit
    def naive_cq(x):
        lo, hi = jnp.minimum(jnp.min(x), 0), jnp.maximum(jnp.max(x), 0)
        s = (hi - lo) / 255
        return jnp.clip(jnp.round(x / s) + jnp.round(-lo / s), 0, 255).astype(jnp.uint8)

    t = interleaved_medians({
        "torch_q": lambda: torch.quantize_per_tensor(x_t, scale, zp, torch.quint8),
        "q_eager": lambda: pj.quantize(x_jax, state),
        "q_jit": lambda: jq(x_jax, state),
        "naive_q": lambda: naive_q(x_jax),
        "cast": lambda: cast(x_jax),
        "cq_eager": lambda: pj.quantize(x_jax, pj.calibrate(x_jax, spec)),
        "cq_jit": lambda: jcq(x_jax),
        "naive_cq": lambda: naive_cq(x_jax),
    }, repeats=reps, sync=sync)
    base = t["torch_q"]
    print(row("torch.quantize_per_tensor (baseline)", base, n))
    print(row("pj.quantize, known state, eager (NaN/inf check)", t["q_eager"], n, base,
              ">= 0.8x"))
    print(row("jax.jit(pj.quantize), known state", t["q_jit"], n, base, ">= 0.8x"))
    print(row("  context: naive jitted clip(round(x*inv)+zp) -> uint8", t["naive_q"], n, base))
    print(row("  context: jitted x.astype(uint8) alone", t["cast"], n, base))
    print(row("pj.calibrate + pj.quantize, eager (checks)", t["cq_eager"], n, base, ">= 0.35x"))
    print(row("jax.jit(calibrate + quantize)", t["cq_jit"], n, base, ">= 0.35x"))
    print(row("  context: naive jitted calibrate + quantize", t["naive_cq"], n, base))

    jfq = jax.jit(pj.fake_quant)
    t = interleaved_medians({
        "torch_fq": lambda: torch.fake_quantize_per_tensor_affine(x_t, scale, zp, 0, 255),
        "fq_eager": lambda: pj.fake_quant(x_jax, state),
        "fq_jit": lambda: jfq(x_jax, state),
    }, repeats=reps, sync=sync)
    base = t["torch_fq"]
    print(row("torch.fake_quantize_per_tensor_affine (baseline)", base, n))
    print(row("pj.fake_quant, eager (NaN/inf check)", t["fq_eager"], n, base, ">= 8x"))
    print(row("jax.jit(pj.fake_quant)", t["fq_jit"], n, base, ">= 8x"))


def qat_dense_step(reps: int) -> None:
    """Grad step of a 1024x1024 dense layer, batch 256: weights per output channel
    and the input per tensor fake-quantized, both calibrated inside the step."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = (jax.random.normal(k1, (1024, 1024)) / 32, jnp.zeros((1024,)))
    xb = jax.random.normal(k2, (256, 1024))
    yb = jax.random.normal(k3, (256, 1024))
    w_spec = pj.QuantSpec(bits=8, symmetric=True, axis=1)
    a_spec = pj.QuantSpec(bits=8)

    def loss_fp32(params, x, y):
        w, b = params
        return jnp.mean((x @ w + b - y) ** 2)

    def loss_qat(params, x, y):
        w, b = params
        wq = pj.fake_quant(w, pj.calibrate(w, w_spec))
        xq = pj.fake_quant(x, pj.calibrate(x, a_spec))
        return jnp.mean((xq @ wq + b - y) ** 2)

    def sgd_step(loss):
        @jax.jit
        def update(params, x, y):
            g = jax.grad(loss)(params, x, y)
            return jax.tree.map(lambda p, g: p - 1e-3 * g, params, g)
        return update

    fp32, qat = sgd_step(loss_fp32), sgd_step(loss_qat)
    t = interleaved_medians({"fp32": lambda: fp32(params, xb, yb),
                             "qat": lambda: qat(params, xb, yb)}, repeats=reps, sync=sync)
    print(row("dense 1024x1024 b256 grad step, fp32 (baseline)", t["fp32"]))
    print(row("same step, W per-channel + x per-tensor fake-quant", t["qat"]))
    print(f"\nQAT step time / fp32 step time = {t['qat'] / t['fp32']:.3f} (target <= 1.10)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--repeats", type=int, default=80)
    args = parser.parse_args()
    print(cpu_info())
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, n = {args.n} float32")
    print(HEADER)
    standalone_ops(args.n, args.repeats)
    qat_dense_step(args.repeats)


if __name__ == "__main__":
    main()
