"""Quantization-aware training on scikit-learn's digits: fp32 vs PTQ vs QAT vs LSQ.

    python examples/qat_digits.py [--epochs 30] [--out examples/out/qat_digits.png]

A small Flax linen CNN built from stock ``nn.Conv`` / ``nn.Dense`` (8x8 grey digits, 10
classes; fixed seed and split) is trained in fp32 with optax Adam, then quantized by
``pj.quantize_model(CNN(), rules)``: the model code stays float, the ``QuantRule`` s say
what every conv and dense layer gets.  The integer rows use one rule,
``QuantRule(".*", weight=b, act=b)``: ``b``-bit symmetric weights per output channel
and a ``b``-bit per-tensor affine quantizer on each layer's input (EMA observer).

* PTQ: the fp32 weights as they are (``qmodel.init_from(fp32_variables, x)``); input
  ranges observed on training batches (``qmodel.apply(..., mutable=["quant_stats"])``).
* QAT: fine-tuned from fp32 through ``qmodel.apply(..., mutable=["quant_stats"])``:
  fake quantization (straight-through gradients, EMA range observers).
* LSQ: the same with ``lsq=True`` in the rule: learned step sizes and zero points
  (Esser et al. 2019; LSQ+ for the affine inputs), in the ``quant_params`` collection,
  initialised from the fp32 kernels and a training batch, trained with the params.
* served: the 4-bit QAT model as integer codes + scales (``pj.serve_model``): the same
  traced model run with int8 x int8 -> int32 convolutions and matmuls; its
  predictions must equal the fake-quant evaluation's on every test image.
* float formats (rules with ``QuantSpec`` s of ``pychop_jax.formats``): fp8 e4m3 PTQ
  with one float32 scale per tensor for every kernel and input; MXFP8 PTQ and QAT (e4m3
  elements, power-of-two E8M0 scales, blocks of 32, weights and inputs); MXFP4
  weight-only PTQ.  MX blocks are 32 elements of the contraction.  The dense layers
  have 256 and 32 inputs: a rule weight spec with ``group_size=32``
  (``pj.formats.MXFP8_E4M3`` as it is) puts their kernels' blocks along the contracted
  axis, and the same spec as ``act`` puts their inputs' blocks along the last axis
  (calibrated per call, as MX hardware scales its operands).  The convolutions contract
  over only 3x3x1 = 9 and 3x3x8 = 72 elements, spread over three kernel axes (input
  channels: 1 and 8), so no axis holds a block of 32: there each output channel's whole
  window shares one E8M0 scale (``mx_conv``: ``QuantSpec(dtype=...,
  scale_dtype="float8_e8m0fnu", axis=-1)``, per output channel as a rule weight spec; a
  "block" of 9 / 72 elements), and the conv inputs get one E8M0 scale per tensor
  (observed like the integer rows' inputs).  The table labels these rows "MX dense,
  E8M0/ch conv".  The MXFP8 QAT model is also served (``pj.serve_model``: e4m3 codes +
  E8M0 scales; the dense layers multiply the codes with float32 accumulation, the
  convolutions run on the dequantized codes).

Prints one table and saves a plot of accuracy vs bits.  Each row of the table is a
function returning a ``Row``, so a row can be added by appending to ``ROWS`` (or by
calling ``run`` with a longer list).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import pychop_jax as pj
from pychop_jax import QuantRule, QuantSpec

SEED = 0
BATCH = 128
#: the collections training updates by gradient: the weights, and the learned (LSQ)
#: step sizes and zero points of ``QuantRule(lsq=True)``
TRAINED = ("params", pj.flax.models.LSQ_PARAMS)


# -- data and model -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Data:
    x_train: np.ndarray  # (N, 8, 8, 1) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int32
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(seed: int = SEED) -> Data:
    """Digits scaled to [0, 1], a stratified 80/20 split fixed by ``seed``."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y,
                                              random_state=seed)
    return Data(x_tr, y_tr, x_te, y_te)


class CNN(nn.Module):
    """conv 3x3/8 - conv 3x3/16 stride 2 - dense 32 - dense 10 (ReLU between), stock
    Flax layers: ``pj.quantize_model(CNN(), rules)`` quantizes it, the fp32 params load
    unchanged."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(x))
        x = nn.relu(nn.Dense(32, name="fc")(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="head")(x)


#: the module paths of the CNN's layers, for rules that treat them differently
CONVS, DENSES = "conv1|conv2", "fc|head"


def int_rules(bits: int, *, lsq: bool = False) -> tuple[QuantRule, ...]:
    """Every conv and dense layer: ``bits``-bit symmetric weights per output channel, a
    ``bits``-bit affine per-tensor input quantizer (EMA observer, or learned with
    ``lsq``)."""
    return (QuantRule(".*", weight=bits, act=bits, lsq=lsq),)


# -- training and evaluation --------------------------------------------------------------------
def _batches(data: Data, key, batch: int = BATCH):
    order = np.asarray(jax.random.permutation(key, len(data.y_train)))
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i:i + batch]
        yield data.x_train[idx], data.y_train[idx]


def train(model, variables, data: Data, *, epochs: int, lr: float, seed: int, desc: str):
    """Adam on the cross-entropy over the ``TRAINED`` collections, with ``quant_stats``
    mutable (a quantized model's observers update; the fp32 model has none); returns
    the variables.  ``model``: the fp32 ``CNN`` or a ``pj.quantize_model`` of it."""
    trained = {k: v for k, v in variables.items() if k in TRAINED}
    rest = {k: v for k, v in variables.items() if k not in TRAINED}
    tx = optax.adam(optax.cosine_decay_schedule(lr, epochs * (len(data.y_train) // BATCH)))
    opt_state = tx.init(trained)

    @jax.jit
    def step(trained, rest, opt_state, x, y):
        def loss_fn(trained):
            logits, updates = model.apply({**trained, **rest}, x, mutable=["quant_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        changes, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, changes), {**rest, **updates}, opt_state, loss

    key = jax.random.key(seed)
    with tqdm(range(epochs), desc=desc, leave=False, unit="epoch") as bar:
        for _ in bar:
            key, sub = jax.random.split(key)
            for x, y in _batches(data, sub):
                trained, rest, opt_state, loss = step(trained, rest, opt_state, x, y)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return {**trained, **rest}


def observe(qmodel, variables, data: Data, *, batches: int = 8):
    """Post-training calibration: run ``batches`` training batches with ``quant_stats``
    mutable so that the observers record the input ranges; parameters are not touched."""
    run = jax.jit(lambda v, x: qmodel.apply(v, x, mutable=["quant_stats"])[1])
    for i, (x, _) in enumerate(_batches(data, jax.random.key(SEED))):
        if i == batches:
            break
        variables = {**variables, **run(variables, x)}
    return variables


def accuracy(model, variables, data: Data) -> float:
    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, data.x_test)
    return float(jnp.mean(jnp.argmax(logits, -1) == data.y_test)) * 100


def quantized(rules: Sequence[QuantRule], float_variables, data: Data):
    """The quantized CNN and its variables built from the float params: the
    quantization collections from a training batch (LSQ step sizes initialised from
    the float kernels and that batch's activations, observers empty)."""
    qmodel = pj.quantize_model(CNN(), rules)
    variables = qmodel.init_from({"params": float_variables["params"]}, data.x_train[:BATCH])
    return qmodel, variables


# -- the rows of the table ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    bits: int  # weight / input bits, 32 for float
    method: str  # "fp32", "PTQ", "QAT", "LSQ", "served" (the plot's series), "formats"
    accuracy: float  # test accuracy, percent


@dataclasses.dataclass
class Context:
    """What the rows share: the data, the epochs, the trained fp32 variables and the
    quantized models trained so far (row name -> (quantized model, variables))."""

    data: Data
    epochs: int
    fp32: dict | None = None
    trained: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)


def fp32_row(ctx: Context) -> Row:
    model = CNN()
    variables = model.init(jax.random.key(SEED), ctx.data.x_train[:1])
    ctx.fp32 = train(model, variables, ctx.data, epochs=ctx.epochs, lr=3e-3, seed=SEED,
                     desc="fp32")
    return Row("fp32", 32, "fp32", accuracy(model, ctx.fp32, ctx.data))


def ptq_row(bits: int) -> Callable[[Context], Row]:
    def row(ctx: Context) -> Row:
        qmodel, variables = quantized(int_rules(bits), ctx.fp32, ctx.data)
        variables = observe(qmodel, variables, ctx.data)
        return Row(f"{bits}-bit PTQ", bits, "PTQ", accuracy(qmodel, variables, ctx.data))
    return row


def qat_row(bits: int, *, lsq: bool = False, epochs_factor: float = 0.5,
            lr: float = 1e-3) -> Callable[[Context], Row]:
    method = "LSQ" if lsq else "QAT"

    def row(ctx: Context) -> Row:
        qmodel, variables = quantized(int_rules(bits, lsq=lsq), ctx.fp32, ctx.data)
        epochs = max(1, round(ctx.epochs * epochs_factor))
        variables = train(qmodel, variables, ctx.data, epochs=epochs, lr=lr, seed=SEED + 1,
                          desc=f"{bits}-bit {method}")
        name = f"{bits}-bit QAT" + (" (LSQ)" if lsq else "") + ", from fp32"
        ctx.trained[name] = (qmodel, variables)
        return Row(name, bits, method, accuracy(qmodel, variables, ctx.data))
    return row


def served_row(source: str, *, fmt: tuple[int, str] | None = None
               ) -> Callable[[Context], Row]:
    """The model of row ``source`` served (``pj.serve_model``: codes + scales) with
    integer matmuls / convolutions; for a float-format row, ``fmt = (bits, label)``: its
    fp8 / MX codes and scales served on the float path."""
    how = "integer ops" if fmt is None else f"{fmt[1]} codes"

    def row(ctx: Context) -> Row:
        qmodel, variables = ctx.trained[source]
        served_fn, served_vars = pj.serve_model(qmodel, variables, ctx.data.x_test[:1])
        served = jax.jit(served_fn)(served_vars, ctx.data.x_test)
        fake = jax.jit(lambda v, x: qmodel.apply(v, x))(variables, ctx.data.x_test)
        same = int(jnp.sum(jnp.argmax(served, -1) == jnp.argmax(fake, -1)))
        ctx.notes.append(
            f"{source} served with {how}: same prediction as its fake-quant "
            f"evaluation on {same}/{len(ctx.data.y_test)} test images, "
            f"max |logit difference| {float(jnp.abs(served - fake).max()):.1e}")
        acc = float(jnp.mean(jnp.argmax(served, -1) == ctx.data.y_test)) * 100
        if fmt is not None:
            return Row(f"{source.split(' (')[0]}, served ({how})", fmt[0], "formats", acc)
        bits = next(r for r in ROW_BITS if source.startswith(f"{r}-bit"))
        return Row(f"{bits}-bit QAT, served (int ops)", bits, "served", acc)
    return row


ROW_BITS = (8, 4, 2)


# -- float and block-scaled formats ------------------------------------------------------------
E4M3 = QuantSpec(dtype="float8_e4m3fn")  # one float32 scale per tensor


def mx_conv(dtype: str) -> QuantSpec:
    """MX elements with one E8M0 scale per output channel of a conv kernel (a rule's
    weight spec with an axis and no group size: per output channel): the block is the
    channel's whole window (9 or 72 elements; no kernel axis holds 32)."""
    return QuantSpec(dtype=dtype, axis=-1, scale_dtype="float8_e8m0fnu")


#: fp8 e4m3, per tensor, weights and inputs
FP8 = (QuantRule(".*", weight=E4M3, act=E4M3),)
#: MXFP8: dense kernels in blocks of 32 along their contraction, dense inputs in blocks
#: of 32 along their last axis (dynamic); conv kernels one E8M0 scale per output
#: channel, conv inputs one (observed) E8M0 scale per tensor
MXFP8 = (QuantRule(CONVS, weight=mx_conv("float8_e4m3fn"),
                   act=QuantSpec(dtype="float8_e4m3fn", scale_dtype="float8_e8m0fnu")),
         QuantRule(DENSES, weight=pj.formats.MXFP8_E4M3, act=pj.formats.MXFP8_E4M3))
#: MXFP4, weights only (inputs float)
MXFP4_W = (QuantRule(CONVS, weight=mx_conv("float4_e2m1fn")),
           QuantRule(DENSES, weight=pj.formats.MXFP4))


def format_row(name: str, bits: int, rules: Sequence[QuantRule], *, qat: bool = False,
               epochs_factor: float = 0.5, lr: float = 1e-3) -> Callable[[Context], Row]:
    """A row of float / block formats: PTQ (inputs observed on training batches) or, with
    ``qat=True``, fine-tuned from fp32 like ``qat_row``."""
    def row(ctx: Context) -> Row:
        qmodel, variables = quantized(rules, ctx.fp32, ctx.data)
        if qat:
            epochs = max(1, round(ctx.epochs * epochs_factor))
            variables = train(qmodel, variables, ctx.data, epochs=epochs, lr=lr,
                              seed=SEED + 1, desc=name)
        else:
            variables = observe(qmodel, variables, ctx.data)
        ctx.trained[name] = (qmodel, variables)
        return Row(name, bits, "formats", accuracy(qmodel, variables, ctx.data))
    return row


FP8_PTQ = "fp8 e4m3 PTQ (per tensor)"
MXFP8_PTQ = "MXFP8 PTQ (MX dense, E8M0/ch conv)"
MXFP8_QAT = "MXFP8 QAT (MX dense, E8M0/ch conv)"
MXFP4_PTQ = "MXFP4 w-only PTQ (MX dense, E8M0/ch conv)"

FORMAT_ROWS: list[Callable[[Context], Row]] = [
    format_row(FP8_PTQ, 8, FP8),
    format_row(MXFP8_PTQ, 8, MXFP8),
    format_row(MXFP4_PTQ, 4, MXFP4_W),
    format_row(MXFP8_QAT, 8, MXFP8, qat=True),
    served_row(MXFP8_QAT, fmt=(8, "MXFP8")),
]


ROWS: list[Callable[[Context], Row]] = [
    fp32_row,
    ptq_row(8),
    ptq_row(4),
    qat_row(4),
    qat_row(2, lsq=True, epochs_factor=1.0, lr=2e-3),
    served_row("4-bit QAT, from fp32"),
    *FORMAT_ROWS,
]


def run(rows=ROWS, *, epochs: int = 30, data: Data | None = None,
        notes: list | None = None) -> list[Row]:
    """Evaluate ``rows`` in order (the first must train the fp32 model); lines worth
    printing under the table are appended to ``notes``."""
    ctx = Context(data or load_data(), epochs)
    out = [row(ctx) for row in rows]
    if notes is not None:
        notes.extend(ctx.notes)
    return out


# -- report -------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    base = next((r.accuracy for r in rows if r.method == "fp32"), None)
    w = max([30, *(len(r.name) for r in rows)])
    lines = [f"| {'model':<{w}} | {'bits':>4} | {'test acc.':>9} | {'vs fp32':>8} |",
             f"|{'-' * (w + 2)}|{'-' * 6}|{'-' * 11}|{'-' * 10}|"]
    for r in rows:
        delta = f"{r.accuracy - base:+7.2f}" if base is not None else ""
        lines.append(f"| {r.name:<{w}} | {r.bits:>4} | {r.accuracy:>8.2f}% | {delta:>8} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = next(r.accuracy for r in rows if r.method == "fp32")
    ax.axhline(base, color="grey", ls="--", label=f"fp32 ({base:.1f}%)")
    for method, style in (("PTQ", "o-"), ("QAT", "s-"), ("LSQ", "^-"), ("served", "x")):
        pts = sorted((r.bits, r.accuracy) for r in rows if r.method == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=method, ms=8)
    for r in rows:  # float / block formats: one labelled point each
        if r.method == "formats":
            ax.plot(r.bits, r.accuracy, "D", color="C5", ms=6)
            ax.annotate(r.name.split(" (")[0], (r.bits, r.accuracy), fontsize=7,
                        xytext=(4, -3), textcoords="offset points")
    ax.set_xlabel("bits (weights and inputs of every layer)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted({r.bits for r in rows if r.bits < 32}))
    ax.set_title("digits CNN: post-training quantization vs QAT")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="fp32 epochs (QAT: half)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out",
                                                      "qat_digits.png"),
                        help="where to save the plot ('': no plot)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    notes = []
    rows = run(epochs=args.epochs, notes=notes)
    print(table(rows))
    for note in notes:
        print(note)
    if args.out:
        plot(rows, args.out)
    print(f"\nplot: {args.out or '-'}   ({time.perf_counter() - start:.0f} s, jax "
          f"{jax.__version__} on {jax.default_backend()})")
    return rows


if __name__ == "__main__":
    main()
