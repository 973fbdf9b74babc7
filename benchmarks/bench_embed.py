"""The served ``Embed`` lookup: a gather of codes vs dequantizing the whole table.

    python benchmarks/bench_embed.py [--repeats 12] [--tokens 2048]

For a ``(vocab, d)`` table quantized per row (int8, and int4 packed two codes per
byte) and ``--tokens`` random ids, jitted:

* ``fp32 take``: the float table's ``jnp.take`` (the unquantized model);
* ``dequantize table, then take``: the whole table dequantized inside the call, then
  the rows taken -- the baseline;
* ``gather codes (served lookup)``: ``pj.serve_model`` of the lookup ``take(table, ids)``
  (weight-only rule): the rows' codes and scales gathered, only those rows dequantized.

Baseline and candidates run interleaved (``benchmarks/_timing.py``), medians;
"vs base" = baseline time / candidate time.  The CPU model is printed first.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import HEADER, cpu_info, interleaved_medians, row  # noqa: E402

import pychop_jax as pj  # noqa: E402


def lookup(params, ids):
    return jnp.take(params["table"], ids, axis=0)


def served_lookup(table, ids, spec):
    """``f(q, ids)``: the served lookup of ``table`` quantized by ``spec``, its served
    variables' table replaced by ``q``."""
    qf = pj.quantize_model(lookup, [pj.QuantRule(".*", weight=spec)])
    served_fn, served = pj.serve_model(qf, qf.init({"table": table}, ids), ids)
    return jax.jit(lambda q, i: served_fn({**served, "params": {"table": q}}, i))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    print(cpu_info())
    print(f"jax {jax.__version__} ({jax.default_backend()}); {args.tokens} ids per lookup")
    take = jax.jit(lambda t, i: jnp.take(t, i, axis=0))
    before = jax.jit(lambda q, i: jnp.take(q.dequantize(), i, axis=0))
    print(HEADER)
    for vocab, d in ((256, 128), (32768, 512)):
        table = jax.random.normal(jax.random.key(0), (vocab, d))
        ids = jax.random.randint(jax.random.key(1), (args.tokens,), 0, vocab)
        fns = {"fp32": functools.partial(take, table, ids)}
        for bits in (8, 4):
            spec = pj.QuantSpec(bits=bits, symmetric=True, axis=0)
            q = pj.QuantizedArray.quantize(table, spec)
            after = served_lookup(table, ids, spec)
            assert bool(jnp.array_equal(after(q, ids), before(q, ids)))
            fns[f"before int{bits}"] = functools.partial(before, q, ids)
            fns[f"after int{bits}"] = functools.partial(after, q, ids)
        t = interleaved_medians(fns, repeats=args.repeats, sync=jax.block_until_ready)
        print(row(f"({vocab}, {d}) fp32 take", t["fp32"], args.tokens * d))
        for bits in (8, 4):
            packed = " (packed)" if bits == 4 else ""
            base = t[f"before int{bits}"]
            print(row(f"({vocab}, {d}) int{bits}{packed}: dequantize table, then take",
                      base, args.tokens * d))
            print(row(f"({vocab}, {d}) int{bits}{packed}: gather codes (served lookup)",
                      t[f"after int{bits}"], args.tokens * d, baseline=base)
                  + f"  {t[f'after int{bits}'] / t['fp32']:.2f}x fp32 take time")


if __name__ == "__main__":
    main()
