"""GPTQ / AWQ / HQQ / SmoothQuant against round-to-nearest on a synthetic transformer stack.

The model: an input projection, ``--blocks`` pre-LayerNorm transformer blocks
(``nn.MultiHeadDotProductAttention``: DenseGeneral q/k/v/out; MLP Dense up / gelu /
Dense down) and a final LayerNorm + head, width 256, 2 heads of 128, MLP 1024.
Activation outliers are made real the way they arise in LLMs: a few channels (4 of
256) of every LayerNorm's scale are set to 20-50, so those input channels of q/k/v
and of the MLP's up projection are 20-50x larger than the others, and, as in trained
models (where the weights meeting outlier channels are small), those kernels' rows
for the outlier channels are divided by the same factor: the float layers compute
what they would without outliers, but round-to-nearest's error on those rows is
amplified 20-50x.

The input tokens are correlated as real activations are: 64 features drawn with a
decaying spectrum (standard deviations ``1 / (1 + i / 4)``) and randomly rotated, so
the layers' inputs have far fewer effective dimensions than channels.  (With
independent input channels the expected Hessian is diagonal, where round-to-nearest
is already optimal in expectation and GPTQ can only fit calibration noise.)

Every block layer is quantized (input projection and head stay float), with
calibration on ``--calib`` sequences of 64 tokens and evaluation on 16 held-out ones;
MSEs are reported on both (the algorithms fit the calibration set):

* weight-only int4 g128 / int3 g128 / int2 g32 (asymmetric, groups along the input
  axis): RTN, GPTQ (act_order), AWQ, HQQ; "gap recovered" is the share of RTN's
  output MSE (against fp32) that the algorithm removes, ``1 - mse / mse_rtn``;
* w8a8 (int8 per-channel weights, int8 per-tensor inputs, minmax ranges): RTN and
  SmoothQuant (alpha 0.5);
* HQQ's weight and output errors against RTN's (``hqq_diagnostics``): what a
  calibration-free method can do on this model;
* times: ``calibrate_model`` wall time per algorithm (compilation included), and the
  steady-state time of one 1024x1024 matrix (jitted, interleaved medians) as a
  ratio to round-to-nearest of the same matrix (``calibrate`` + ``fake_quant``).

    python benchmarks/bench_ptq_algos.py [--blocks 2] [--calib 64] [--repeats 6] [--timing-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_medians  # noqa: E402

import pychop_jax as pj  # noqa: E402
from pychop_jax.algorithms import gptq, hqq  # noqa: E402

D, HEADS, FF, SEQ, FEATURES = 256, 2, 1024, 64, 64
OUTLIERS = (3, 77, 150, 201)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(HEADS, name="attn", deterministic=True)(h)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(FF, name="up")(h)))


class Stack(nn.Module):
    blocks: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="inp")(x)
        for i in range(self.blocks):
            x = Block(name=f"blocks_{i}")(x)
        return nn.Dense(D, name="head")(nn.LayerNorm(name="ln_f")(x))


def with_outliers(params, rng):
    """LayerNorm scales of 20-50 on the outlier channels, and the rows of those channels
    in the kernels that read the LayerNorm (q/k/v after ln1, up after ln2) divided by
    the same factors."""
    rows = jnp.array(OUTLIERS)
    params = jax.tree.map(lambda a: a, params)  # a copy to edit
    for name, block in params.items():
        if not name.startswith("blocks_"):
            continue
        for ln, readers in (("ln1", [block["attn"][p] for p in ("query", "key", "value")]),
                            ("ln2", [block["up"]])):
            factors = jnp.asarray(rng.uniform(20, 50, len(OUTLIERS)), jnp.float32)
            block[ln]["scale"] = block[ln]["scale"].at[rows].set(factors)
            for layer in readers:
                k = layer["kernel"]
                layer["kernel"] = k.at[rows].divide(factors.reshape((-1,) + (1,) * (k.ndim - 1)))
    return params


def mse(a, b):
    return float(jnp.mean((a - b) ** 2))


def weight_rules(bits, group, method):
    spec = pj.QuantSpec(bits=bits, symmetric=False, axis=0, group_size=group)
    # q/k/v kernels (D, H, Dh): groups along D (axis 0); out (H, Dh, D): along Dh (axis 1)
    out_spec = pj.QuantSpec(bits=bits, symmetric=False, axis=1, group_size=group)
    return [pj.QuantRule("inp|head"),
            pj.QuantRule(".*attn/out", weight=out_spec, method=method),
            pj.QuantRule(".*", weight=spec, method=method)]


def evaluate(model, params, rules, calib, held_out):
    """(output MSE vs fp32 on held_out and on calib, calibrate_model seconds, report)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = pj.quantize_model(model, rules)
        variables = qmodel.init(jax.random.key(0), calib[0])
    variables = {**variables, "params": params}
    t0 = time.perf_counter()
    variables, report = pj.calibrate_model(qmodel, variables, calib)
    seconds = time.perf_counter() - t0
    fwd = jax.jit(lambda v, x: qmodel.apply(v, x))
    ref = jax.jit(lambda x: model.apply({"params": params}, x))
    err = [float(np.mean([mse(fwd(variables, x), ref(x)) for x in xs]))
           for xs in (held_out, calib)]
    return err, seconds, report


def accuracy(model, params, calib, held_out, args):
    print(f"model: {args.blocks} blocks, width {D}, MLP {FF}, {HEADS} heads; "
          f"{len(calib)} calibration batches of 8 x {SEQ} tokens; "
          f"outlier channels {OUTLIERS} (LayerNorm scales 20-50)")

    print("\n| weight-only grid | method | held-out MSE vs fp32 | gap recovered vs RTN | "
          "calibration-set MSE | gap recovered | calibrate_model s |")
    print("|---|---|---|---|---|---|---|")
    methods = {"RTN": None, "GPTQ (act_order)": pj.GPTQ(act_order=True), "AWQ": pj.AWQ(),
               "HQQ": pj.HQQ()}
    for bits, group in ((4, 128), (3, 128), (2, 32)):
        base = None
        for name, method in methods.items():
            err, seconds, _ = evaluate(model, params, weight_rules(bits, group, method), calib,
                                       held_out)
            base = err if method is None else base
            gaps = ["" if method is None else f"{100 * (1 - e / b):.1f} %"
                    for e, b in zip(err, base, strict=True)]
            print(f"| int{bits} g{group} | {name} | {err[0]:.4g} | {gaps[0]} | {err[1]:.4g} | "
                  f"{gaps[1]} | {seconds:.1f} |", flush=True)

    print("\n| w8a8 | method | held-out MSE vs fp32 | gap recovered vs RTN | "
          "max/median input channel max |")
    print("|---|---|---|---|---|")
    base = None
    for name, method in (("RTN", None), ("SmoothQuant a=0.5", pj.SmoothQuant(0.5))):
        rules = [pj.QuantRule("inp|head"),
                 pj.QuantRule(".*", weight=8, act=8, observer="minmax", method=method)]
        (err, _), _, report = evaluate(model, params, rules, calib, held_out)
        base = err if method is None else base
        gap = "" if method is None else f"{100 * (1 - err / base):.1f} %"
        ratios = ""
        if report.layers:
            r = report.by_path()["blocks_0/attn/query"].details
            ratios = f"{r['outliers']:.1f} -> {r['outliers_smoothed']:.1f} (blocks_0 q/k/v)"
        print(f"| w8a8 | {name} | {err:.4g} | {gap} | {ratios} |", flush=True)


def best_shrink(w, bits, group, ratios=tuple(1.0 - i / 100 for i in range(51))):
    """A calibration-free bound: per group of ``group`` rows of ``w (K, N)`` and column,
    the affine range ``[r lo, r hi]`` with the least squared weight error over
    ``ratios`` (what any weight-only range / zero-point search can reach on l2)."""
    k, n = w.shape
    v = w.reshape(k // group, group, n)
    lo, hi = jnp.minimum(v.min(1, keepdims=True), 0), jnp.maximum(v.max(1, keepdims=True), 0)
    best, out = None, None
    for r in ratios:
        scale = (hi - lo) * r / (2**bits - 1)
        zp = jnp.round(-lo * r / scale)
        q = (jnp.clip(jnp.round(v / scale) + zp, 0, 2**bits - 1) - zp) * scale
        err = jnp.sum((v - q) ** 2, axis=1, keepdims=True)
        out = q if best is None else jnp.where(err < best, q, out)
        best = err if best is None else jnp.minimum(err, best)
    return out.reshape(k, n)


def hqq_diagnostics(model, params, data):
    """Why a calibration-free method gains little here: HQQ's squared weight error and
    output error (on the fp32 model's own inputs) as ratios to RTN's, for the layers
    that read a LayerNorm (q/k/v after ln1, up after ln2); the same without the outlier
    input channels; and the best per-group range shrink on weight l2 (``best_shrink``)."""
    _, inter = model.apply({"params": params}, data, capture_intermediates=True)
    inter = inter["intermediates"]
    normal = np.ones(D, bool)
    normal[list(OUTLIERS)] = False
    print("\n| weight-only grid | HQQ weight sq. error / RTN | HQQ output error / RTN | "
          "same, outlier input channels left out | RTN output error from outlier channels | "
          "best l2 range shrink: weight / output error vs RTN |")
    print("|---|---|---|---|---|---|")
    for bits, group in ((4, 128), (3, 128), (2, 32)):
        spec = pj.QuantSpec(bits=bits, symmetric=False, axis=0, group_size=group)
        tot = {}
        for name, block in params.items():
            if not name.startswith("blocks_"):
                continue
            for ln, kernels in (("ln1", [block["attn"][p]["kernel"] for p in
                                         ("query", "key", "value")]),
                                ("ln2", [block["up"]["kernel"]])):
                x = inter[name][ln]["__call__"][0].reshape(-1, D)
                for w in kernels:
                    w2 = w.reshape(D, -1)
                    qs = {"rtn": pj.fake_quant(w, pj.calibrate(w, spec)).reshape(D, -1),
                          "hqq": pj.fake_quant(w, hqq(w, spec)[0]).reshape(D, -1),
                          "l2": best_shrink(w2, bits, group)}
                    for key, q in qs.items():
                        d = w2 - q
                        for part, value in (("w", jnp.sum(d**2)), ("o", jnp.mean((x @ d) ** 2)),
                                            ("i", jnp.mean((x[:, normal] @ d[normal]) ** 2))):
                            tot[part, key] = tot.get((part, key), 0.0) + float(value)
        r = lambda part, key, tot=tot: tot[part, key] / tot[part, "rtn"]  # noqa: E731
        print(f"| int{bits} g{group} | {r('w', 'hqq'):.3f} | {r('o', 'hqq'):.3f} | "
              f"{r('i', 'hqq'):.3f} | {1 - tot['i', 'rtn'] / tot['o', 'rtn']:.0%} | "
              f"{r('w', 'l2'):.3f} / {r('o', 'l2'):.3f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--calib", type=int, default=64, help="calibration sequences")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--timing-only", action="store_true", help="skip the accuracy tables")
    parser.add_argument("--hqq-only", action="store_true", help="only hqq_diagnostics")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); jax {jax.__version__} "
          f"({jax.default_backend()})")
    rng = np.random.default_rng(0)
    model = Stack(args.blocks)
    spectrum = 1.0 / (1.0 + np.arange(FEATURES) / 4)
    rotation = np.linalg.qr(rng.normal(size=(FEATURES, FEATURES)))[0]
    z = rng.normal(size=(args.calib + 16, SEQ, FEATURES)) * spectrum
    data = jnp.asarray(z @ rotation, jnp.float32)
    calib = [data[i:i + 8] for i in range(0, args.calib, 8)]
    held_out = [data[args.calib:args.calib + 8], data[args.calib + 8:]]
    params = with_outliers(model.init(jax.random.key(1), calib[0])["params"], rng)
    if args.hqq_only:
        return hqq_diagnostics(model, params, jnp.concatenate(calib))
    if not args.timing_only:
        accuracy(model, params, calib, held_out, args)
        hqq_diagnostics(model, params, jnp.concatenate(calib))
    print("\n| one 1024x1024 matrix, int4 g128 (H given) | median ms | "
          "time / RTN time |")
    print("|---|---|---|")
    w = jnp.asarray(rng.normal(size=(1024, 1024)) * 0.02, jnp.float32)
    x = jnp.asarray(rng.normal(size=(2048, 1024)), jnp.float32)
    hess = 2 * x.T @ x / len(x)
    spec = pj.QuantSpec(bits=4, symmetric=False, axis=0, group_size=128)
    rtn = jax.jit(lambda w: pj.fake_quant(w, pj.calibrate(w, spec)))
    fns = {
        "RTN (calibrate + fake_quant)": lambda: rtn(w),
        "GPTQ": lambda: gptq(w, hess, spec)[0],
        "GPTQ act_order": lambda: gptq(w, hess, spec, act_order=True)[0],
        "HQQ (20 iterations)": lambda: hqq(w, spec)[0].scale,
    }
    t = interleaved_medians(fns, repeats=args.repeats, block=3, warmup=1, settle=0.0,
                            sync=jax.block_until_ready)
    base = t["RTN (calibrate + fake_quant)"]
    for name, seconds in t.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.1f}x |")


if __name__ == "__main__":
    main()
