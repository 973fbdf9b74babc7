"""Decoding speed of served quantized models against the memory-bandwidth roof.

    python benchmarks/bench_decode.py [--quick] [--repeats 3] [--batches 1 8]

A stock-Flax decoder (the LM example's ``TransformerLM`` with its KV cache,
by default ``d_model=2048``, 8 layers, 16 heads, a 32,000-token vocabulary: 534 M
parameters, large enough to be bound by memory bandwidth on a CPU; random weights:
speed does not depend on them) generates 128 tokens after a 128-token prompt
(``pj.serving.generate``: one prefill call, then a scanned loop of one-token steps),
at batch 1 and 8, as:

* ``fp32`` -- the float model; ``bf16`` (context) -- its params and activations in
  bfloat16;
* served rule sets (``pj.serve_model``): int8 weight-only (per output channel), int4
  g128 weight-only (packed), w8a8 with dynamic per-token int8 inputs
  (``pj.formats.INT8_PER_TOKEN``), and int4 g128 weights with an int8 KV cache
  (``QuantRule(kv_cache=8)``, float16 scales).

First it prints the CPU and measures this machine's weight-stream bandwidth (a float32
matrix-vector product over a 256 MiB matrix).  Each row's **roof** is the time it must
take to read what one decoding step reads -- the served weights (codes and scales; an
embedding lookup reads one row), the KV cache -- at that bandwidth; ``roof`` is that
time over the measured one.  Speed-ups are against ``fp32`` at the same batch; prefill
times are the prompt's single call.  ``--quick``: a small model (d=256, 4 layers) for a
check that the script runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import transformer_lm_model as lm  # noqa: E402
from _timing import cpu_info, interleaved_medians  # noqa: E402
from bench_decode_matmul import cpu_flags, stream_probe  # noqa: E402

import pychop_jax as pj  # noqa: E402
from pychop_jax import QuantRule, QuantSpec  # noqa: E402
from pychop_jax.core import xla_cpu  # noqa: E402

PROMPT, NEW = 128, 128
INT4_G128 = QuantSpec(bits=4, symmetric=True, axis=0, group_size=128)
KV8 = QuantSpec(bits=8, symmetric=True, scale_dtype="float16")
RULE_SETS = {
    "int8 weight-only": [QuantRule(".*", weight=8)],
    "int4 g128 weight-only": [QuantRule(".*", weight=INT4_G128)],
    "w8a8 (per-token inputs)": [QuantRule(".*_embed", weight=8),
                                QuantRule(".*", weight=8, act=pj.formats.INT8_PER_TOKEN)],
    "int4 g128 + int8 KV cache": [QuantRule(r"blocks_\d+/attn", kv_cache=KV8),
                                  QuantRule(".*", weight=INT4_G128)],
}


def tree_nbytes(tree) -> int:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, pj.QuantizedArray))
    return int(sum(x.nbytes if isinstance(x, pj.QuantizedArray) else np.asarray(x).nbytes
                   for x in leaves))


def step_bytes(params, cache, config: lm.Config, batch: int) -> int:
    """What one decoding step reads: every weight but the two embedding tables (one row
    each a token), and the whole KV cache (attention reads every position)."""
    lookups = {"tok_embed", "pos_embed"}
    weights = sum(tree_nbytes(v) for k, v in params.items() if k not in lookups)
    rows = sum(tree_nbytes(params[k]) // (config.vocab if k == "tok_embed" else config.max_len)
               for k in lookups) * batch
    return weights + rows + tree_nbytes(cache)


def float_step(model):
    """The float model's decoding call ``step(variables, cache, tokens) -> (logits,
    cache)``."""
    def step(variables, cache, tokens):
        logits, updates = model.apply({**variables, "cache": cache}, tokens, decode=True,
                                      mutable=["cache"])
        return logits.astype(jnp.float32), updates["cache"]

    return step


def served_step(served_fn):
    def step(served, cache, tokens):
        logits, updates = served_fn({**served, "cache": cache}, tokens, decode=True,
                                    mutable=["cache"])
        return logits, updates["cache"]

    return step


def decoding(step):
    """``(prefill, decode)``: jitted calls for the prompt and for NEW - 1 steps, the
    variables an argument (not constants of the program)."""
    prefill = jax.jit(step)

    def run(variables, c, token):
        def body(carry, _):
            token, c = carry
            logits, c = step(variables, c, token[:, None])
            return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), c), None

        (token, c), _ = jax.lax.scan(body, (token, c), None, length=NEW - 1)
        return token, c

    return prefill, jax.jit(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model (d=256, 4 layers)")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--rows", nargs="+", default=None,
                        help="the rule sets to run (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    print(cpu_info())
    print(cpu_flags())
    print(f"jax {jax.__version__} ({jax.default_backend()}); decoding kernels: "
          f"{'built' if xla_cpu.decode_kernels_available() else 'not built (pure XLA)'}")
    probe, probe_bytes = stream_probe()
    t = interleaved_medians({"probe": probe}, repeats=12, sync=jax.block_until_ready)["probe"]
    bandwidth = probe_bytes / t
    print(f"weight-stream bandwidth: {bandwidth / 1e9:.1f} GB/s (float32 matrix-vector "
          f"product, {probe_bytes >> 20} MiB)")

    if args.quick:
        config = lm.Config(d_model=256, num_heads=4, num_layers=4, max_len=PROMPT + NEW,
                           vocab=4096)
    else:
        config = lm.Config(d_model=args.d_model, num_heads=args.heads, num_layers=args.layers,
                           max_len=PROMPT + NEW, vocab=32000)
    model, params = lm.init_linen(config, seed=0)
    n_params = lm.count_params(params)
    print(f"model: d={config.d_model} layers={config.num_layers} heads={config.num_heads} "
          f"vocab={config.vocab}: {n_params / 1e6:.0f} M parameters; prompt {PROMPT}, "
          f"{NEW} new tokens")

    for batch in args.batches:
        prompt = jax.random.randint(jax.random.key(1), (batch, PROMPT), 0, config.vocab)
        cache = lm.init_cache(model, batch)
        rows = {}

        rows["fp32"] = (float_step(model), {"params": params}, cache, params, cache)
        bf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
        bf_cache = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, cache)
        rows["bf16 (context)"] = (float_step(model), {"params": bf}, bf_cache, bf, bf_cache)
        for name, rules in RULE_SETS.items():
            if args.rows is not None and name not in args.rows:
                continue
            qmodel = pj.quantize_model(model, rules)
            variables = qmodel.init_from({"params": params, "cache": cache}, prompt[:, :8],
                                         decode=True)
            variables = {k: v for k, v in variables.items() if k != "cache"}
            served_fn, served = pj.serve_model(qmodel, {**variables, "cache": cache},
                                               prompt[:, :8], decode=True, mutable=["cache"])

            step = served_step(served_fn)
            stored = jax.jit(step)(served, cache, prompt[:, :1])[1]  # the cache as stored
            rows[name] = (step, served, cache, served["params"], stored)

        bytes_per, fns_prefill, fns_decode = {}, {}, {}
        for name, (step, v, c, p, c_shape) in rows.items():
            prefill, decode = decoding(step)
            start = time.perf_counter()
            logits, c1 = jax.block_until_ready(prefill(v, c, prompt))
            token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            jax.block_until_ready(decode(v, c1, token))
            print(f"  compiled {name} (batch {batch}): {time.perf_counter() - start:.1f} s",
                  flush=True)
            fns_prefill[name] = functools.partial(prefill, v, c, prompt)
            fns_decode[name] = functools.partial(decode, v, c1, token)
            bytes_per[name] = step_bytes(p, c_shape, config, batch)
        prefill_t = interleaved_medians(fns_prefill, repeats=args.repeats, block=2, warmup=0,
                                        sync=jax.block_until_ready)
        decode_t = interleaved_medians(fns_decode, repeats=args.repeats, block=2, warmup=0,
                                       sync=jax.block_until_ready)
        base = decode_t["fp32"]
        print(f"\nbatch {batch}: {NEW - 1} decoding steps after a {PROMPT}-token prefill")
        print(f"| {'rule set':<26} | {'tokens/s':>9} | {'vs fp32':>7} | {'MB/step':>8} | "
              f"{'roof':>5} | {'prefill ms':>10} | {'vs fp32':>7} |")
        print(f"|{'-' * 28}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 7}|{'-' * 12}|{'-' * 9}|")
        for name in rows:
            per_token = decode_t[name] / (NEW - 1)
            roof = bytes_per[name] / bandwidth / per_token
            print(f"| {name:<26} | {batch * (NEW - 1) / decode_t[name]:9.1f} | "
                  f"{base / decode_t[name]:6.2f}x | {bytes_per[name] / 1e6:8.1f} | "
                  f"{roof:5.0%} | {prefill_t[name] * 1e3:10.1f} | "
                  f"{prefill_t['fp32'] / prefill_t[name]:6.2f}x |")


if __name__ == "__main__":
    main()
