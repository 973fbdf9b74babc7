"""QAT training step of the digits example's CNN vs the same step in fp32.

    python benchmarks/bench_flax.py [--batch 128] [--repeats 200]

One jitted step = forward, backward and an optax Adam update of
``examples/qat_digits.py``'s model.  The quantized model (``pj.quantize_model`` with the
example's ``int_rules``) fake-quantizes every layer: per-channel symmetric 8-bit kernels
(calibrated each step) and per-tensor affine 8-bit inputs with EMA observers (state
updated each step), or learned step sizes (LSQ, trained with the params).
Baseline and candidates run interleaved in one process (benchmarks/_timing.py);
"vs base" = baseline time / candidate time (lower than 1 = slower).

The "context" row is not the library: the same network with a minimal hand-written
fake quantization (``round``/``clip`` with a plain straight-through estimator, no
NaN handling, no cross-backend arithmetic order), i.e. roughly the floor of what
fake-quantizing every layer costs here.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _timing import HEADER, cpu_info, interleaved_medians, row  # noqa: E402
from qat_digits import CNN, TRAINED, int_rules, load_data, quantized  # noqa: E402


def _naive_fake_quant(x, scale, zero_point, qmin, qmax):
    q = jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)
    return x + lax.stop_gradient((q - zero_point) * scale - x)


class _NaiveOp(nn.Module):
    """``op`` with an 8-bit per-tensor affine input and per-channel symmetric kernel."""

    op: object

    @nn.compact
    def __call__(self, lhs, rhs, *args, **kwargs):
        xs, ws = lax.stop_gradient(lhs), lax.stop_gradient(rhs)
        lo, hi = jnp.minimum(xs.min(), 0), jnp.maximum(xs.max(), 0)
        s = jnp.where(hi > lo, (hi - lo) / 255, 1.0)
        x = _naive_fake_quant(lhs, s, jnp.round(-lo / s), 0, 255)
        amax = jnp.abs(ws).max(axis=tuple(range(rhs.ndim - 1)), keepdims=True)
        w = _naive_fake_quant(rhs, jnp.where(amax > 0, amax / 127, 1.0), 0, -128, 127)
        return self.op(x, w, *args, **kwargs)


class _NaiveCNN(nn.Module):
    """The example's CNN with ``_NaiveOp`` in every layer (same param names)."""

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, conv_general_dilated_cls=functools.partial(
            _NaiveOp, lax.conv_general_dilated))
        dense = functools.partial(nn.Dense, dot_general_cls=functools.partial(
            _NaiveOp, lax.dot_general))
        x = nn.relu(conv(8, (3, 3), name="conv1")(x))
        x = nn.relu(conv(16, (3, 3), strides=2, name="conv2")(x))
        x = nn.relu(dense(32, name="fc")(x.reshape(x.shape[0], -1)))
        return dense(10, name="head")(x)


def make_step(model, tx):
    """The example's training step: Adam over the ``TRAINED`` collections (params, LSQ
    step sizes), observers updating (``mutable=["quant_stats"]``)."""
    @jax.jit
    def step(trained, rest, opt_state, x, y):
        def loss_fn(trained):
            logits, updates = model.apply({**trained, **rest}, x, mutable=["quant_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        changes, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, changes), {**rest, **updates}, opt_state, loss
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    data = load_data()
    x = data.x_train[: args.batch]
    y = data.y_train[: args.batch]
    tx = optax.adam(1e-3)
    fp32_model = CNN()
    fp32 = fp32_model.init(jax.random.key(0), x)
    cases = {"fp32": (fp32_model, fp32), "naive": (_NaiveCNN(), fp32)}
    for name, bits, lsq in (("qat8", 8, False), ("qat4", 4, False), ("lsq2", 2, True)):
        cases[name] = quantized(int_rules(bits, lsq=lsq), fp32, data)

    fns = {}
    for name, (model, variables) in cases.items():
        trained = {k: v for k, v in variables.items() if k in TRAINED}
        rest = {k: v for k, v in variables.items() if k not in TRAINED}
        step = make_step(model, tx)
        args_ = (trained, rest, tx.init(trained), x, y)
        fns[name] = lambda step=step, a=args_: step(*a)
    t = interleaved_medians(fns, repeats=args.repeats, block=11, sync=jax.block_until_ready)

    n_params = sum(np.size(p) for p in jax.tree.leaves(fp32["params"]))
    print(cpu_info())
    print(f"jax {jax.__version__} ({jax.default_backend()}), batch {args.batch}, "
          f"{n_params} params")
    print(HEADER)
    base = t["fp32"]
    print(row("fp32 train step (baseline)", base))
    print(row("all layers 8-bit W+A fake-quant, EMA observers", t["qat8"], None, base, "<= 1.10x"))
    print(row("all layers 4-bit W+A fake-quant, EMA observers", t["qat4"], None, base))
    print(row("all layers 2-bit W+A LSQ (learned scales, zero points)", t["lsq2"], None, base))
    print(row("  context: minimal hand-written 8-bit fake quant, plain STE", t["naive"], None,
              base))
    print(f"\nQAT step time / fp32 step time: 8-bit {t['qat8'] / base:.3f}, "
          f"4-bit {t['qat4'] / base:.3f}, 2-bit LSQ {t['lsq2'] / base:.3f} (target <= 1.10); "
          f"context {t['naive'] / base:.3f}")


if __name__ == "__main__":
    main()
