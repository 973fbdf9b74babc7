"""The transformer LM example's model: QAT training step and served forward vs fp32.

    python benchmarks/bench_lm.py [--repeats 12] [--fwd-repeats 6]

On ``examples/transformer_lm_model.py``'s model (d=128, 4 layers, 4 heads, byte
vocabulary; random weights: timing only), quantized with ``examples/transformer_lm.py``'s
rules through ``pj.quantize_model`` / ``pj.serve_model``, in one process:

1. one jitted training step (forward, backward, clipped AdamW) on a 32 x 64 batch:
   fp32 vs QAT with int4 group-32 weight fake quantization + int8 inputs (EMA
   observers carried as state), and vs w8a8 QAT (int8 per-channel weights + int8
   inputs);
2. the forward pass on a 64 x 256 batch: fp32 vs the served w8a8 model (static input
   ranges, int8 x int8 -> int32 matmuls) and the served int4 weight-only model
   (packed codes dequantized inside the jitted forward);
3. the roof: XLA's bare int8 x int8 -> int32 dot vs the float32 dot at the sizes of
   the MLP's matmuls in that forward (16384 x 128 @ 128 x 512 and 16384 x 512 @ 512 x
   128), codes prepared outside the timed call; "roof" = the two float dots' time over
   the two int8 dots'.

Baselines and candidates run interleaved (``benchmarks/_timing.py``), medians;
"vs base" = baseline time / candidate time (above 1: faster than the baseline).  The
CPU model and its int8 dot-product instructions (``/proc/cpuinfo`` flags ``amx_int8``,
``avx512_vnni``, ``avx_vnni``) are printed first: XLA:CPU's int8 GEMM is only as fast as
those allow.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import transformer_lm as ex  # noqa: E402
import transformer_lm_model as lm  # noqa: E402
from _timing import HEADER, interleaved_medians, row  # noqa: E402

import pychop_jax as pj  # noqa: E402

W8A8 = "served w8a8 (int8 matmuls, static ranges)"
INT8_FLAGS = ("amx_int8", "amx_tile", "avx512_vnni", "avx_vnni", "avx512_bf16")


def cpu_description() -> str:
    """CPU model, cores, and which int8 dot-product instructions it has."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    have = [f for f in INT8_FLAGS if f in flags] or ["none of " + "/".join(INT8_FLAGS)]
    return f"{model}, {os.cpu_count()} cores; int8 instructions: {', '.join(have)}"


def train_step(apply_fn, tx):
    """A jitted step ``(params, state, opt_state, x, y) -> (params, state, opt_state,
    loss)``; ``apply_fn(params, state, x) -> (logits, state)``."""
    def loss_fn(params, state, x, y):
        logits, state = apply_fn(params, state, x)
        return ex.cross_entropy(logits, y), state

    @jax.jit
    def step(params, state, opt_state, x, y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=24, help="timed training steps each")
    parser.add_argument("--fwd-repeats", type=int, default=6, help="timed forwards each")
    args = parser.parse_args()
    print(cpu_description())
    print(f"jax {jax.__version__} ({jax.default_backend()})")
    sync = jax.block_until_ready

    config = lm.Config()
    model, params = lm.init_linen(config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (32, 64)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 256, (32, 64)), jnp.int32)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.98))

    # -- 1. training step ------------------------------------------------------------------
    def fp32_apply(p, state, x):
        return model.apply(p, x), state

    steps = {"fp32": (train_step(fp32_apply, tx), {"params": params}, {})}
    w4a8 = [*ex.group_rules(config)[:-1],
            pj.QuantRule(".*", weight=ex.group_rules(config)[-1].weight, act=8)]
    for name, rules in (("int4 g32 weights + int8 inputs (EMA)", w4a8),
                        ("w8a8 (int8 per-channel weights, int8 inputs)",
                         ex.per_channel_rules(config, act=8, observer="ema"))):
        qmodel = pj.quantize_model(model, rules)
        stats = {"quant_stats": qmodel.init_from({"params": params}, x[:1])["quant_stats"]}
        apply = functools.partial(lambda q, p, s, x: q.apply({**p, **s}, x,
                                                             mutable=["quant_stats"]), qmodel)
        steps[name] = (train_step(apply, tx), {"params": params}, stats)
    carried = {name: [p, s, tx.init(p)] for name, (_, p, s) in steps.items()}

    # trace + compile: what the transform costs (it runs at trace time only)
    print("\n0. trace + compile of the training step (target: quantized <= 2x the fp32 model's)")
    compile_s = {}
    for name, (fn, p, s) in steps.items():
        start = time.perf_counter()
        fn.lower(p, s, tx.init(p), x, y).compile()
        compile_s[name] = time.perf_counter() - start
    for name, seconds in compile_s.items():
        print(f"  {name:<52} {seconds:6.2f} s  {seconds / compile_s['fp32']:.2f}x fp32")

    def run_step(name):
        fn = steps[name][0]
        p, s, o = carried[name]
        p, s, o, loss = fn(p, s, o, x, y)
        carried[name][:] = [p, s, o]
        return loss

    t = interleaved_medians({n: functools.partial(run_step, n) for n in steps},
                            repeats=args.repeats, sync=sync)
    print("\n1. training step, batch 32 x 64 tokens (target: QAT <= 1.10x the fp32 step)")
    print(HEADER)
    base = t["fp32"]
    print(row("fp32 step", base))
    for name in list(steps)[1:]:
        print(row(f"QAT: {name}", t[name], baseline=base)
              + f"  step time {t[name] / base:.2f}x fp32")

    # -- 2. served forward -----------------------------------------------------------------
    tokens = jnp.asarray(rng.integers(0, 256, (64, 256)), jnp.int32)
    sample = tokens[:1, :8]
    forwards = {"fp32": (jax.jit(model.apply), {"params": params})}
    for name, rules in ((W8A8,
                         ex.per_channel_rules(config, act=8)),
                        ("served int4 g32 weight-only", ex.group_rules(config)),
                        ("served int4 g128 weight-only", ex.group_rules(config, group=128))):
        qmodel = pj.quantize_model(model, rules)
        variables = qmodel.init_from({"params": params}, sample)
        if "quant_stats" in variables:  # static ranges from two batches
            observe = jax.jit(lambda v, t, q=qmodel: q.apply(v, t, mutable=["quant_stats"])[1])
            for i in range(2):
                variables = {**variables, **observe(variables, tokens[16 * i:16 * (i + 1), :64])}
        served_fn, served = pj.serve_model(qmodel, variables, sample)
        forwards[name] = (jax.jit(served_fn), served)
    tf = interleaved_medians({n: functools.partial(f, v, tokens) for n, (f, v)
                              in forwards.items()},
                             repeats=args.fwd_repeats, block=3, warmup=1, sync=sync)
    print("\n2. forward, 64 x 256 tokens (targets: w8a8 >= 1.5x fp32 throughput with AMX, "
          ">= 0.9x the bare dot's gain anywhere; int4 <= 1.3x fp32 time)")
    print(HEADER)
    fwd_base = tf["fp32"]
    print(row("fp32 forward", fwd_base))
    for name in list(forwards)[1:]:
        print(row(name, tf[name], baseline=fwd_base)
              + f"  time {tf[name] / fwd_base:.2f}x fp32")

    # -- 3. the roof ---------------------------------------------------------------------------
    m, d, f = 64 * 256, config.d_model, config.mlp_ratio * config.d_model
    dn = (((1,), (0,)), ((), ()))
    f32 = jax.jit(lambda a, w: jax.lax.dot_general(a, w, dn))
    i8 = jax.jit(lambda a, w: jax.lax.dot_general(a, w, dn, preferred_element_type=jnp.int32))
    fns, flops = {}, {}
    for k, n in ((d, f), (f, d)):  # mlp_in, mlp_out
        a = jax.random.normal(jax.random.key(1), (m, k))
        w = jax.random.normal(jax.random.key(2), (k, n)) / k**0.5
        a8 = jax.random.randint(jax.random.key(3), (m, k), -128, 128).astype(jnp.int8)
        w8 = jax.random.randint(jax.random.key(4), (k, n), -128, 128).astype(jnp.int8)
        size = f"{m} x {k} @ {k} x {n}"
        fns[f"f32 {size}"] = functools.partial(f32, a, w)
        fns[f"int8 {size}"] = functools.partial(i8, a8, w8)
        flops[size] = 2 * m * k * n
    t = interleaved_medians(fns, repeats=args.repeats, sync=sync)
    print("\n3. the roof: XLA's bare dots at the MLP's sizes in that forward")
    print(HEADER)
    for size, fl in flops.items():
        print(row(f"float32 dot {size}", t[f"f32 {size}"], fl))
        print(row(f"int8 x int8 -> int32 dot {size} (codes given)", t[f"int8 {size}"], fl,
                  baseline=t[f"f32 {size}"]))
    roof = sum(t[f"f32 {s}"] for s in flops) / sum(t[f"int8 {s}"] for s in flops)
    print(f"roof (both dots): {roof:.2f}x")
    gain = fwd_base / tf[W8A8]
    print(f"\nserved w8a8 forward: {gain:.2f}x fp32 throughput; the roof (bare int8 dot): "
          f"{roof:.2f}x; gain / roof = {gain / roof:.2f}")


if __name__ == "__main__":
    main()
