"""A byte-level transformer language model on the Python standard library's source,
trained in fp32 and then quantized by rules: PTQ, QAT, LSQ, integer serving.

    python examples/transformer_lm.py [--steps 800] [--qat-steps 150] ...
    python examples/transformer_lm.py --quick          # tiny model, a few steps; for tests
    python examples/transformer_lm.py --rows main ...  # row suites (``SUITES``), or "all"

A small decoder-only transformer written with stock ``flax.linen`` layers only
(``transformer_lm_model.TransformerLM``; no ``pychop_jax`` import there) is trained
with optax AdamW (linear warmup, cosine decay) on the bytes of the interpreter's own
standard-library ``.py`` files, and scored by held-out bits per byte (mean
cross-entropy in nats / ln 2) on fixed windows of the held-out files.  See
``transformer_lm_model`` for exactly which files, the split, and the parameter paths.

Then the same model, whose code never mentions quantization, is quantized with
``pj.quantize_model(model, rules)``: a list of ``QuantRule`` s (module-path regex ->
weight / input specs, first match wins).  One list per row drives everything that
row does -- the fake-quantized evaluation, PTQ calibration of input ranges (observers
updated while ``quant_stats`` is mutable), the QAT fine-tune (``train(..., state=)``
carries ``quant_stats``; LSQ's ``quant_params`` are trained with the params) and
``pj.serve_model`` (codes + scales, int8 x int8 -> int32 matmuls where inputs are
quantized too).  The rows (``ROWS``):

* fp32;
* int8 weight-only PTQ, per output channel (q/k/v: per head and head_dim);
* w8a8 PTQ: int8 weights and int8 per-tensor inputs with static ranges from
  ``--calib-batches`` training batches (minmax observers), and the same model served
  on the integer path;
* int4 weight-only PTQ, round to nearest, groups of 32 and of 128 inputs;
* int4 g32 QAT: ``--qat-steps`` AdamW steps from fp32 through the fake-quantized model,
  and the same with LSQ (learned step sizes, initialised from the round-to-nearest
  scales, learning at ``--lsq-lr-scale`` times the rate); an fp32 control fine-tuned
  the same way tells how much of QAT's gain is just more training;
* served rows (``pj.serve_model``): checkpoint bytes (``pj.save_quantized``) and the
  forward time of a 64 x 256 batch against fp32, timed interleaved.

The int4 rules keep one float16 scale per group (``QuantSpec(scale_dtype="float16")``,
rounded up; 4.5 bits per weight at g32).  Other suites (``--rows``): ``attention`` adds
w8a8 with the attention products quantized too (``QuantRule(attention=...)``: the
q.k^T and probs.v operands int8 or int4 per tensor, static ranges) and its served
copy; ``scales`` puts the int4 rows beside the same rows with float32 scales.

Prints the rules' reports (which rule took which layer), one table (held-out
bits/byte, change vs fp32, checkpoint bytes, forward time) and the wall and process
CPU time; saves a plot (training curves and bits/byte per row) to
``examples/out/transformer_lm.png``.  A row is a function ``row(ctx) -> Row``; add one
by appending to ``ROWS`` (or pass a list to ``run``).

The model's ``max_len`` is ``max(--seq-len, --fwd-seq)`` so that the 64 x 256 timing
batch fits; with the default ``--seq-len 64`` the position embeddings past 64 are never
trained, so held-out bits/byte are measured at the training context only (windows of
65 bytes, all 64 predictions counted).  fp32 training is ~225 s of process CPU time
(800 x 32 x 64 bytes; ~100-115 s wall on 2 idle cores).  The run ends with the wall and
process CPU seconds of each phase (fp32 training, each row, the forward timings).

Reproducibility: the corpus (the running interpreter's stdlib; its file count, bytes
and sha256 are printed), the initial parameters' key, the batches and the held-out
windows are fixed by ``--seed``, and on one platform -- jaxlib, the CPU's vector ISA
and the number of CPUs XLA:CPU splits its work over, printed as ``platform:`` -- reruns
give bit-identical losses and bits/byte.  Another platform rounds differently from the
random init on, and 800 AdamW steps amplify those last-bit differences: the fp32
held-out figure spreads over about +-0.005 bits/byte (0.25 %) between platforms, and
the rows' changes vs fp32 by a few tenths of a percentage point at 4 bits.  Compare
figures from the same platform line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transformer_lm_model as lm  # noqa: E402

import pychop_jax as pj  # noqa: E402
from pychop_jax import QuantRule, QuantSpec  # noqa: E402

STATS, LSQ_PARAMS = "quant_stats", "quant_params"  # quantize_model's linen collections

SEED = 0
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                           "transformer_lm.png")


# -- training -----------------------------------------------------------------------------------
def cross_entropy(logits, targets):
    """Mean next-byte cross-entropy in nats."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()


@dataclasses.dataclass
class TrainResult:
    params: object
    losses: np.ndarray  # per step, nats
    compile_s: float  # the first step, compilation included
    step_s: float  # mean time of the other steps
    total_s: float  # the whole loop, batches and compilation included
    cpu_s: float  # process CPU time of the loop (all threads): a check on a shared machine
    state: object = None  # the carried, non-differentiated state (``state=``), updated


def train(apply_fn: Callable, params, data: np.ndarray, *, steps: int, batch: int,
          seq_len: int, lr: float = 6e-3, warmup: int = 100, weight_decay: float = 0.01,
          decay_mask=None, lr_scale: dict | None = None, state=None, seed: int = SEED,
          desc: str = "train") -> TrainResult:
    """AdamW with linear warmup and cosine decay on ``cross_entropy(logits, y)``.

    Without ``state``: ``apply_fn(params, tokens) -> logits``, differentiated with respect
    to ``params``.  With ``state`` (a pytree carried from step to step but not
    differentiated: a quantized model's ``quant_stats``): ``apply_fn(params, state,
    tokens) -> (logits, state)``, the returned state feeding the next step and
    ``TrainResult.state``.  A QAT fine-tune of a ``quantize_model`` model passes its
    ``params`` (and, for LSQ, its ``quant_params``) as ``params`` and its
    ``quant_stats`` as ``state``.  ``decay_mask``: optax's ``mask`` of the weight decay
    (e.g. to leave learned step sizes alone); ``None`` decays every leaf.  ``lr_scale``:
    ``{key: factor}`` multiplies the updates of ``params[key]`` (a dict of subtrees,
    e.g. ``{"quant_params": 0.1}``: step sizes learn at a tenth of the rate).

    Batches come from ``lm.batches(data, batch, seq_len, seed)``.  One jitted step;
    parameters, state and optimizer state are donated.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=min(warmup, max(steps - 1, 1)), decay_steps=max(steps, 2),
        end_value=lr / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.98, weight_decay=weight_decay,
                                 mask=decay_mask))
    carried = state is not None

    def loss_fn(params, state, x, y):
        if carried:
            logits, state = apply_fn(params, state, x)
        else:
            logits = apply_fn(params, x)
        return cross_entropy(logits, y), state

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, state, opt_state, x, y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        for key, factor in (lr_scale or {}).items():
            updates[key] = jax.tree_util.tree_map(lambda u, f=factor: u * f, updates[key])
        return optax.apply_updates(params, updates), state, opt_state, loss

    params = jax.tree_util.tree_map(jnp.array, params)  # copies: the caller's stay valid
    state = jax.tree_util.tree_map(jnp.array, state) if carried else {}
    opt_state = tx.init(params)
    data_iter = lm.batches(data, batch, seq_len, seed)
    losses = []
    start, cpu_start = time.perf_counter(), time.process_time()
    compile_s = 0.0
    with tqdm(range(steps), desc=desc, leave=False, mininterval=1.0) as bar:
        for i in bar:
            x, y = next(data_iter)
            params, state, opt_state, loss = step(params, state, opt_state, x, y)
            losses.append(loss)
            if i == 0:
                loss.block_until_ready()
                compile_s = time.perf_counter() - start
            if i % 50 == 49:
                bar.set_postfix(bpb=f"{float(loss) / math.log(2):.3f}")
    jax.block_until_ready(params)
    total_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    step_s = (total_s - compile_s) / max(steps - 1, 1)
    return TrainResult(params, np.asarray(jax.device_get(losses), np.float64), compile_s,
                       step_s, total_s, cpu_s, state if carried else None)


# -- measurements -------------------------------------------------------------------------------
@functools.cache
def _eval_fn(apply_fn):
    @jax.jit
    def nats(variables, windows, weights):
        logits = apply_fn(variables, windows[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), windows[:, 1:])
        return (ce.sum(axis=1) * weights).sum()
    return nats


def evaluate_bpb(apply_fn: Callable, variables, heldout: np.ndarray, *, seq_len: int = 64,
                 n_windows: int | None = 1024, batch: int = 64) -> float:
    """Held-out bits per byte: mean next-byte cross-entropy (nats) / ln 2.

    Over ``lm.eval_windows(heldout, seq_len, n_windows)`` (fixed, non-overlapping windows
    of ``seq_len + 1`` bytes; every one of the ``seq_len`` predictions in a window counts),
    in jitted batches of ``batch`` windows (the last one padded, with weight 0).
    """
    windows = lm.eval_windows(heldout, seq_len, n_windows)
    n = len(windows)
    pad = (-n) % batch
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    windows = np.concatenate([windows, np.zeros((pad, seq_len + 1), np.int32)])
    fn = _eval_fn(apply_fn)
    total = 0.0
    for i in range(0, len(windows), batch):
        total += float(fn(variables, windows[i:i + batch], weights[i:i + batch]))
    return total / (n * seq_len) / math.log(2)


def forward_time(apply_fn: Callable, variables, *, batch: int = 64, seq_len: int = 256,
                 repeats: int = 5, seed: int = SEED) -> float:
    """Median seconds of a jitted ``apply_fn(variables, tokens)`` on one
    ``(batch, seq_len)`` batch of random bytes, after a warm-up call."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, seq_len)),
                         jnp.int32)
    fn = jax.jit(apply_fn)
    jax.block_until_ready(fn(variables, tokens))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(variables, tokens))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# -- rows ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What a row may use: the trained fp32 model and the data, and what earlier rows
    left behind (``quantized``: row name -> (quantized model, variables), for the
    served rows; ``reports``: rule-set name -> ``QuantReport``; ``curves``: row name
    -> fine-tuning losses; ``algorithm_log``: the "algorithms" suite's ``{grid: {method:
    (bits/byte, calibrate_model (wall, CPU) seconds, CalibrationReport)}}`` and
    ``"fp32"`` -> bits/byte)."""
    args: argparse.Namespace
    config: lm.Config
    model: lm.TransformerLM
    params: object  # trained fp32 linen params
    train_data: np.ndarray
    heldout: np.ndarray
    fp32: TrainResult
    quantized: dict = dataclasses.field(default_factory=dict)
    reports: dict = dataclasses.field(default_factory=dict)
    curves: dict = dataclasses.field(default_factory=dict)
    algorithm_log: dict = dataclasses.field(default_factory=dict)
    qmodels: dict = dataclasses.field(default_factory=dict)  # rule-set name -> (rules, qmodel)


@dataclasses.dataclass
class Row:
    """One model of the table: ``apply_fn(variables, tokens) -> logits``.

    ``deployed``: a model as it would ship (fp32, or a ``serve_model`` output): its
    checkpoint is written with ``pj.save_quantized`` and its forward pass is timed.
    Unpacks as the ``(name, apply_fn, variables)`` tuple rows used to be.
    """
    name: str
    apply_fn: Callable
    variables: object
    deployed: bool = False

    def __iter__(self):
        return iter((self.name, self.apply_fn, self.variables))


def fp32_row(ctx: Context) -> Row:
    return Row("fp32", ctx.model.apply, {"params": ctx.params}, deployed=True)


# -- quantization rules: the same rules drive QAT, PTQ calibration and serving ---------------------
def per_channel_rules(c: lm.Config, bits: int = 8, act: int | None = None,
                      observer: str = "minmax") -> list[QuantRule]:
    """Weights symmetric per output channel (``bits``); inputs ``act``-bit affine per
    tensor, or float.  Embeddings are weight-only (their input is token ids), per row.

    The q/k/v kernels are ``(d, heads, head_dim)``: one scale per (head, head_dim) is a
    single group spanning the whole input axis (``axis=0, group_size=d``); the ``int``
    shorthand would give one scale per head_dim index, shared by the heads.
    """
    qkv = QuantSpec(bits=bits, symmetric=True, axis=0, group_size=c.d_model)
    return [QuantRule(".*_embed", weight=bits),
            QuantRule(".*attn/(query|key|value)", weight=qkv, act=act, observer=observer),
            QuantRule(".*", weight=bits, act=act, observer=observer)]


def group_rules(c: lm.Config, bits: int = 4, group: int = 32, lsq: bool = False,
                scale_dtype: str | None = "float16") -> list[QuantRule]:
    """Weight-only, symmetric, one scale per ``group`` consecutive inputs of each output.

    ``scale_dtype="float16"`` (default; GGUF Q4_0 / GPTQ / AWQ checkpoints do the same):
    each scale rounded up to float16 and stored in 2 bytes, 4 + 16/g bits per weight
    (4.5 at g32) instead of 4 + 32/g; ``None`` keeps float32 scales.  g128 uses it too:
    one rule set, and the served g128 checkpoint shrinks as well.

    Dense / q,k,v kernels are grouped along their input axis 0; the attention output
    kernel ``(heads, head_dim, d)`` along head_dim (a group cannot span two heads), or
    per output channel when ``group >= d`` (all of its d inputs in one group);
    embedding tables ``(rows, d)`` along d.
    """
    d, hd = c.d_model, c.d_model // c.num_heads

    def spec(axis, n):
        return QuantSpec(bits=bits, symmetric=True, axis=axis, group_size=min(group, n),
                         scale_dtype=scale_dtype)

    if group >= d:
        out = QuantSpec(bits=bits, symmetric=True, axis=-1, scale_dtype=scale_dtype)
    elif group <= hd:
        out = spec(1, hd)
    else:
        raise ValueError(f"group={group}: the attention output's groups must fit in one "
                         f"head ({hd}) or span all {d} inputs")
    return [QuantRule(".*_embed", weight=spec(1, d), lsq=lsq),
            QuantRule(".*attn/out", weight=out, lsq=lsq),
            QuantRule(".*mlp_out", weight=spec(0, c.mlp_ratio * d), lsq=lsq),
            QuantRule(".*", weight=spec(0, d), lsq=lsq)]


def quantized_variables(qmodel, ctx: Context):
    """The quantized model's variables around the trained fp32 ``params``
    (``qmodel.init_from``): empty observer ranges, and LSQ step sizes (``quant_params``)
    computed from the fp32 weights and one training batch."""
    sample = next(lm.batches(ctx.train_data, ctx.args.batch, ctx.args.seq_len,
                             ctx.args.seed + 1))[0]
    return jax.jit(qmodel.init_from)({"params": ctx.params}, sample)


def rtn_step_sizes(ctx: Context, rules: list[QuantRule], variables):
    """``variables`` with every learned weight step size (``quant_params/<weight>/
    weight_scale``) set to the round-to-nearest scale of the fp32 weight (``pj.calibrate``
    under the spec the rule lays on it, ``QuantReport.ops[i].weight_spec``): LSQ then
    starts from the PTQ model instead of Esser et al.'s ``2 mean|w| / sqrt(Q_P)``, which
    for 4-bit groups clips far more of each group."""
    report = pj.quantization_report(ctx.model, rules, jnp.zeros((1, 8), jnp.int32))
    steps = jax.tree_util.tree_map(lambda a: a, variables[LSQ_PARAMS])  # a copy to edit
    for path, op in report.weights().items():
        if op.rule is None or not rules[op.rule].lsq or op.weight_spec is None:
            continue
        node, step = variables["params"], steps
        for key in path.split("/"):
            node, step = node[key], step[key]
        step["weight_scale"] = pj.calibrate(node, op.weight_spec).scale
    return {**variables, LSQ_PARAMS: steps}


def calibrate(qmodel, variables, ctx: Context, batches: int):
    """PTQ calibration: ``batches`` training batches through the quantized model with
    ``quant_stats`` mutable, so that the observers record the input ranges."""
    observe = jax.jit(lambda v, x: qmodel.apply(v, x, mutable=[STATS])[1])
    data = lm.batches(ctx.train_data, ctx.args.batch, ctx.args.seq_len, ctx.args.seed + 2)
    for _ in range(batches):
        variables = {**variables, **observe(variables, next(data)[0])}
    return variables


def quantized_model(ctx: Context, rules_name: str, rules: list[QuantRule]):
    """``(qmodel, variables)`` for ``rules`` around the fp32 params (``quantized_variables``).

    One ``pj.quantize_model`` per rule set and run (``ctx.qmodels``): rows with equal rules
    (int4 g32 RTN and its QAT fine-tune) share the quantized model, so its jitted
    held-out evaluation (``_eval_fn``, keyed by ``qmodel.apply``) is compiled once."""
    if rules_name not in ctx.reports:
        sample = jnp.zeros((1, 8), jnp.int32)
        ctx.reports[rules_name] = pj.quantization_report(ctx.model, rules, sample)
    known = ctx.qmodels.get(rules_name)
    if known is not None and known[0] == rules:
        qmodel = known[1]
    else:
        qmodel = pj.quantize_model(ctx.model, rules)
        ctx.qmodels[rules_name] = (rules, qmodel)
    return qmodel, quantized_variables(qmodel, ctx)


def ptq_row(name: str, rules_name: str, make_rules: Callable[[lm.Config], list]):
    """Post-training quantization of the fp32 params; input ranges (if any rule
    quantizes inputs) from ``--calib-batches`` training batches."""
    def row(ctx: Context) -> Row:
        qmodel, variables = quantized_model(ctx, rules_name, make_rules(ctx.config))
        if STATS in variables:
            variables = calibrate(qmodel, variables, ctx, ctx.args.calib_batches)
        ctx.quantized[name] = (qmodel, variables)
        return Row(name, qmodel.apply, variables)
    return row


def qat_row(name: str, rules_name: str, make_rules: Callable[[lm.Config], list]):
    """QAT fine-tune from fp32: ``--qat-steps`` AdamW steps (peak ``--qat-lr``) through the
    fake-quantized model; ``quant_params`` (LSQ step sizes, from ``rtn_step_sizes``) are
    trained with the params (no weight decay, ``--lsq-lr-scale`` times the rate),
    ``quant_stats`` (observer ranges) are carried."""
    def row(ctx: Context) -> Row:
        rules = make_rules(ctx.config)
        qmodel, variables = quantized_model(ctx, rules_name, rules)
        if LSQ_PARAMS in variables:
            variables = rtn_step_sizes(ctx, rules, variables)
        a = ctx.args
        trainable = {k: variables[k] for k in ("params", LSQ_PARAMS) if k in variables}
        stats = {k: variables[k] for k in (STATS,) if k in variables}

        def apply_fn(trainable, state, x):
            return qmodel.apply({**trainable, **state}, x, mutable=list(state))

        mask = {k: jax.tree_util.tree_map(lambda _, k=k: k == "params", v)
                for k, v in trainable.items()}
        result = train(apply_fn, trainable, ctx.train_data, steps=a.qat_steps, batch=a.batch,
                       seq_len=a.seq_len, lr=a.qat_lr, warmup=max(1, a.qat_steps // 10),
                       weight_decay=a.weight_decay, decay_mask=mask, state=stats,
                       lr_scale={LSQ_PARAMS: a.lsq_lr_scale} if LSQ_PARAMS in trainable else None,
                       seed=a.seed + 3, desc=name)
        ctx.curves[name] = result
        variables = {**result.params, **result.state}
        ctx.quantized[name] = (qmodel, variables)
        return Row(name, qmodel.apply, variables)
    return row


def fp32_control_row(ctx: Context) -> Row:
    """The fp32 model fine-tuned exactly as the QAT rows are (same steps, schedule and
    batches), without quantization: QAT's gain over round-to-nearest also contains
    this much further training."""
    a = ctx.args
    result = train(lambda p, x: ctx.model.apply({"params": p}, x), ctx.params,
                   ctx.train_data, steps=a.qat_steps, batch=a.batch, seq_len=a.seq_len,
                   lr=a.qat_lr, warmup=max(1, a.qat_steps // 10),
                   weight_decay=a.weight_decay, seed=a.seed + 3, desc="fp32 control")
    ctx.curves["fp32 control"] = result
    return Row("fp32, same fine-tune (control)", ctx.model.apply, {"params": result.params})


def served_row(source: str, name: str | None = None):
    """Row ``source``'s model after ``pj.serve_model``: codes + scales (``QuantizedArray``
    s; integer matmuls where the rules quantize weights and inputs), run by the same
    traced function."""
    def row(ctx: Context) -> Row:
        qmodel, variables = ctx.quantized[source]
        served_fn, served_vars = pj.serve_model(qmodel, variables, jnp.zeros((1, 8), jnp.int32))
        return Row(name or f"{source}, served", served_fn, served_vars, deployed=True)
    return row


W8 = "int8 weights per channel"
W8A8 = "int8 weights, int8 inputs (static)"
W4G32, W4G128, W4G32_LSQ = "int4 weights g32", "int4 weights g128", "int4 weights g32, LSQ"

W8A8_ROW = ptq_row("w8a8 PTQ (static ranges)", W8A8, functools.partial(per_channel_rules, act=8))
W4G32_ROW = ptq_row("int4 g32 PTQ (RTN)", W4G32, group_rules)
W4G128_ROW = ptq_row("int4 g128 PTQ (RTN)", W4G128, functools.partial(group_rules, group=128))
W4G32_QAT_ROW = qat_row("int4 g32 QAT", W4G32, group_rules)
W4G32_QAT_SERVED = served_row("int4 g32 QAT")

ROWS: list[Callable[[Context], Row]] = [
    fp32_row,
    ptq_row("int8 weight-only PTQ", W8, per_channel_rules),
    W8A8_ROW,
    W4G32_ROW,
    W4G128_ROW,
    fp32_control_row,
    W4G32_QAT_ROW,
    qat_row("int4 g32 QAT, LSQ", W4G32_LSQ, functools.partial(group_rules, lsq=True)),
    served_row("int8 weight-only PTQ"),
    served_row("w8a8 PTQ (static ranges)", "w8a8 PTQ, served (int8 matmuls)"),
    served_row("int4 g128 PTQ (RTN)"),
    W4G32_QAT_SERVED,
]


def attention_rules(c: lm.Config, bits: int = 8) -> list[QuantRule]:
    """w8a8 (``per_channel_rules(act=8)``) plus the attention products: the q.k^T and
    probs.v operands of every attention module ``bits``-bit affine per tensor, each with
    its own minmax range from the calibration batches (``QuantRule(attention=...)``)."""
    return [QuantRule(r".*blocks_\d+/attn", attention=bits, observer="minmax"),
            *per_channel_rules(c, act=8)]


W8A8_ATTN = "int8 weights, int8 inputs, int8 attention products (static)"
W8A8_ATTN4 = "int8 weights, int8 inputs, int4 attention products (static)"

#: w8a8 with the attention products quantized too (not in "main": its time budget)
ATTENTION_ROWS: list[Callable[[Context], Row]] = [
    fp32_row,
    W8A8_ROW,
    ptq_row("w8a8 + attention PTQ", W8A8_ATTN, attention_rules),
    ptq_row("w8a8 + attention (int4) PTQ", W8A8_ATTN4,
            functools.partial(attention_rules, bits=4)),
    served_row("w8a8 + attention PTQ"),
]

_F32 = dict(scale_dtype=None)
#: the int4 rows with float16 scales (as in "main") beside the same rows with float32
#: scales: bits/byte and checkpoint bytes of the scale format alone
SCALE_ROWS: list[Callable[[Context], Row]] = [
    fp32_row,
    W4G32_ROW,
    ptq_row("int4 g32 PTQ (RTN), fp32 scales", W4G32 + ", fp32 scales",
            functools.partial(group_rules, **_F32)),
    W4G128_ROW,
    ptq_row("int4 g128 PTQ (RTN), fp32 scales", W4G128 + ", fp32 scales",
            functools.partial(group_rules, group=128, **_F32)),
    W4G32_QAT_ROW,
    qat_row("int4 g32 QAT, fp32 scales", W4G32 + ", fp32 scales",
            functools.partial(group_rules, **_F32)),
    W4G32_QAT_SERVED,
    served_row("int4 g32 QAT, fp32 scales"),
]

# -- float and block-scaled formats (suite "formats") --------------------------------------------
E4M3 = QuantSpec(dtype="float8_e4m3fn")  # fp8, one float32 scale per tensor


def format_rules(c: lm.Config, weight: QuantSpec, act: QuantSpec | None = None,
                 observer: str = "minmax") -> list[QuantRule]:
    """Every kernel in ``weight``'s element format; inputs in ``act`` (per tensor) or float.

    A block spec (``group_size``: MX blocks of 32, NVFP4 of 16, NF4 of 64) is laid along
    each kernel's contraction: axis 0 of the Dense / q,k,v kernels (d or 4d inputs),
    head_dim of the attention output kernel ``(heads, head_dim, d)`` (a block cannot span
    two heads), d of the embedding tables (what ``attend`` contracts).  Where that axis
    is shorter than the block (head_dim 16 < 32 in ``--quick``; head_dim 32 < NF4's 64)
    the block is the whole axis.  Per-tensor specs apply as they are.
    """
    d, hd = c.d_model, c.d_model // c.num_heads

    def on(axis, n):
        if weight.group_size is None:
            return weight
        return dataclasses.replace(weight, axis=axis, group_size=min(weight.group_size, n))

    return [QuantRule(".*_embed", weight=on(1, d)),
            QuantRule(".*attn/out", weight=on(1, hd), act=act, observer=observer),
            QuantRule(".*mlp_out", weight=on(0, c.mlp_ratio * d), act=act, observer=observer),
            QuantRule(".*", weight=on(0, d), act=act, observer=observer)]


def _formats(weight: QuantSpec, act: QuantSpec | None = None, observer: str = "minmax"):
    return functools.partial(format_rules, weight=weight, act=act, observer=observer)


F = pj.formats
FP8_W, FP8_WA = "fp8 e4m3 weights per tensor", "fp8 e4m3 weights and inputs per tensor"
MXFP8_W, MXFP4_W = "MXFP8 weights (blocks of 32)", "MXFP4 weights (blocks of 32)"
NVFP4_W, NF4_W = "NVFP4 weights (blocks of 16)", "NF4 weights (blocks of 64)"
MXFP8_W_FP8_A = "MXFP8 weights, fp8 e4m3 inputs per tensor (QAT)"

FORMAT_ROWS: list[Callable[[Context], Row]] = [
    fp32_row,
    ptq_row("fp8 e4m3 weight-only PTQ", FP8_W, _formats(E4M3)),
    ptq_row("fp8 e4m3 w+a PTQ (static)", FP8_WA, _formats(E4M3, E4M3)),
    ptq_row("MXFP8 weight-only PTQ", MXFP8_W, _formats(F.MXFP8_E4M3)),
    ptq_row("MXFP4 weight-only PTQ", MXFP4_W, _formats(F.MXFP4)),
    ptq_row("NVFP4 weight-only PTQ", NVFP4_W, _formats(F.NVFP4)),
    ptq_row("NF4 weight-only PTQ", NF4_W, _formats(F.NF4)),
    ptq_row("MXFP8 w + fp8 a PTQ", MXFP8_W_FP8_A, _formats(F.MXFP8_E4M3, E4M3, "ema")),
    qat_row("MXFP8 w + fp8 a QAT", MXFP8_W_FP8_A, _formats(F.MXFP8_E4M3, E4M3, "ema")),
    served_row("fp8 e4m3 weight-only PTQ"),
    served_row("fp8 e4m3 w+a PTQ (static)"),
    served_row("MXFP4 weight-only PTQ"),
    served_row("NVFP4 weight-only PTQ"),
    served_row("NF4 weight-only PTQ"),
    served_row("MXFP8 w + fp8 a QAT"),
]


# -- the "algorithms" suite: GPTQ / AWQ / HQQ / SmoothQuant against round-to-nearest ------------
def algorithm_rules(c: lm.Config, bits: int = 4, group: int = 128, method=None
                    ) -> list[QuantRule]:
    """``group_rules``' grids made asymmetric (HQQ optimizes a zero point; every row of
    a grid, round-to-nearest included, uses the same grid), with ``method`` on every
    Dense / attention kernel, the output head included.  The embedding tables stay
    float, as in the GPTQ / AWQ papers' LLM setups: the algorithms read a layer's input
    activations, and a table lookup has none, so quantizing the tables would add the
    same round-to-nearest loss to every row.  Scales stay float32: HQQ optimizes a
    float32 scale, which a float16 grid would re-round."""
    return [QuantRule(".*_embed"),  # first match wins: the tables stay float
            *(QuantRule(r.module_path, weight=dataclasses.replace(r.weight, symmetric=False),
                        method=method)
              for r in group_rules(c, bits, group, scale_dtype=None)
              if "_embed" not in r.module_path)]


def w8a8_rules(c: lm.Config, method=None) -> list[QuantRule]:
    """``per_channel_rules(act=8)`` (minmax ranges) with ``method`` on the layers whose
    inputs are quantized."""
    return [r if r.act is None else dataclasses.replace(r, method=method)
            for r in per_channel_rules(c, act=8)]


def calibration_batches(ctx: Context) -> list:
    """``--calib-batches`` training batches of tokens (the PTQ rows' calibration data)."""
    data = lm.batches(ctx.train_data, ctx.args.batch, ctx.args.seq_len, ctx.args.seed + 2)
    return [jnp.asarray(next(data)[0]) for _ in range(ctx.args.calib_batches)]


def algorithm_row(grid: str, method_name: str, make_rules: Callable[..., list], method=None):
    """``make_rules(config, method=method)`` calibrated by ``pj.calibrate_model`` on
    ``calibration_batches`` (the algorithms, then the input ranges of ``act`` rules);
    its wall time (compilation included) and held-out bits/byte go to
    ``ctx.algorithm_log`` for ``algorithm_table``."""
    name = f"{grid} {method_name}"

    def row(ctx: Context) -> Row:
        log = ctx.algorithm_log
        a = ctx.args
        if "fp32" not in log:
            log["fp32"] = evaluate_bpb(ctx.model.apply, {"params": ctx.params}, ctx.heldout,
                                       seq_len=a.seq_len, n_windows=a.eval_windows)
        rules = make_rules(ctx.config, method=method)
        qmodel, variables = quantized_model(ctx, f"{grid} (algorithms)", rules)
        batches = calibration_batches(ctx)
        start, cpu_start = time.perf_counter(), time.process_time()
        variables, report = pj.calibrate_model(qmodel, variables, batches)
        jax.block_until_ready(variables)
        seconds = (time.perf_counter() - start, time.process_time() - cpu_start)
        bpb = evaluate_bpb(qmodel.apply, variables, ctx.heldout, seq_len=a.seq_len,
                           n_windows=a.eval_windows)
        log.setdefault(grid, {})[method_name] = (bpb, seconds, report)
        ctx.quantized[name] = (qmodel, variables)
        return Row(name, qmodel.apply, variables)
    return row


def algorithm_table(ctx: Context) -> str:
    """Per grid and algorithm: held-out bits/byte, change vs fp32, the share of
    round-to-nearest's gap to fp32 that the algorithm recovers
    ``(bpb_RTN - bpb) / (bpb_RTN - bpb_fp32)``, and ``calibrate_model``'s wall time
    and process CPU time (all threads: on a shared machine, the wall time of an idle
    one is about the CPU time over the cores used)."""
    log = ctx.algorithm_log
    fp32 = log.get("fp32")
    lines = [f"| {'grid (weight-only, asym.)':<25} | {'method':<17} | bits/byte | vs fp32 "
             "| gap recovered | calibrate_model s (CPU s) |",
             f"|{'-' * 27}|{'-' * 19}|---|---|---|---|"]
    for grid, methods in log.items():
        if grid == "fp32":
            continue
        rtn = methods.get("RTN", (None,))[0]
        for method, (bpb, (seconds, cpu), _) in methods.items():
            gap = ""
            if method != "RTN" and rtn is not None and rtn > fp32:
                gap = f"{100 * (rtn - bpb) / (rtn - fp32):.0f} %"
            lines.append(f"| {grid:<25} | {method:<17} | {bpb:.4f} | "
                         f"{100 * (bpb / fp32 - 1):+.2f}% | {gap} | {seconds:.1f} ({cpu:.0f}) |")
    return "\n".join(lines)


def outlier_summary(report) -> str:
    """SmoothQuant's per-layer ``max_k max|X[:, k]| / median_k max|X[:, k]|`` of the
    layers' inputs, before and after smoothing."""
    return "\n".join(f"  {e.path:<28} max/median of per-channel max|X|: "
                     f"{e.details['outliers']:7.1f} -> {e.details['outliers_smoothed']:5.1f}"
                     for e in report.layers)


def algorithm_summary_row(ctx: Context) -> Row:
    """The suite's last row: SmoothQuant w8a8 (the row itself), then prints
    ``algorithm_table`` and the layers' input outlier ratios."""
    row = algorithm_row("w8a8", "SmoothQuant a=0.5", w8a8_rules,
                        pj.SmoothQuant(0.5))(ctx)
    print("\nalgorithms (held-out bits/byte; gap recovered = share of RTN's gap to fp32 "
          "removed; calibrate_model wall time, compilation included, on "
          f"{len(calibration_batches(ctx))} calibration batches of "
          f"{ctx.args.batch}x{ctx.args.seq_len} tokens):")
    print(algorithm_table(ctx))
    report = ctx.algorithm_log["w8a8"]["SmoothQuant a=0.5"][2]
    print("layer inputs (SmoothQuant's statistics, RTN-quantized model up to the layer):")
    print(outlier_summary(report))
    return row


def _algorithm_rows() -> list[Callable[[Context], Row]]:
    rows = [fp32_row]
    for bits, group in ((4, 128), (3, 128), (2, 32)):
        grid = f"int{bits} g{group}"
        rules = functools.partial(algorithm_rules, bits=bits, group=group)
        rows += [algorithm_row(grid, "RTN", rules),
                 algorithm_row(grid, "GPTQ act_order", rules, pj.GPTQ(act_order=True)),
                 algorithm_row(grid, "AWQ", rules, pj.AWQ()),
                 algorithm_row(grid, "HQQ", rules, pj.HQQ())]
    rows += [algorithm_row("w8a8", "RTN", w8a8_rules),
             algorithm_summary_row]
    return rows


ALGORITHM_ROWS: list[Callable[[Context], Row]] = _algorithm_rows()


# Row suites, chosen with ``--rows``: each is run after the same fp32 training.  "main" is
# the table above; other suites add their own lists here (each starting with ``fp32_row``).
# -- decoding with a KV cache (suite "decode") -------------------------------------------------
KV_FORMATS = {  # QuantRule(kv_cache=...): keys / values stored per (token, head) or in groups
    "int8 KV cache": QuantSpec(bits=8, symmetric=True, scale_dtype="float16"),
    "fp8 e4m3 KV cache": QuantSpec(dtype="float8_e4m3fn", scale_dtype="float8_e8m0fnu"),
    "int4 g32 KV cache": QuantSpec(bits=4, symmetric=True, axis=-1, group_size=32,
                                   scale_dtype="float16"),
}
PROMPT_BYTES, CONTINUATION_BYTES = 64, 96


def kv_rules(kv: QuantSpec | None, weights: list[QuantRule] | None = None) -> list[QuantRule]:
    """``weights`` (default: none, float) with the attention modules' KV cache in ``kv``."""
    cache = [QuantRule(r"blocks_\d+/attn", kv_cache=kv)] if kv is not None else []
    return cache + list(weights or [])


@dataclasses.dataclass
class DecodeRow:
    name: str
    checkpoint_bytes: int
    bpb: float = float("nan")
    cache_bytes: float = float("nan")
    tokens_per_s: float = float("nan")


def decode_step(ctx: Context, rules: list[QuantRule] | None):
    """``(step, variables, checkpoint bytes)``: the model's decoding call
    ``step(variables, cache, tokens) -> (logits, cache)``, fp32 (``rules is None``) or
    served from codes under ``rules`` (weights and KV cache)."""
    model = ctx.model
    if rules is None:
        def float_step(variables, cache, tokens):
            logits, upd = model.apply({**variables, "cache": cache}, tokens, decode=True,
                                      mutable=["cache"])
            return logits, upd["cache"]
        return float_step, {"params": ctx.params}, lm.tree_bytes(ctx.params)
    cache = lm.init_cache(model, 1)
    sample = jnp.zeros((1, 8), jnp.int32)
    qmodel = pj.quantize_model(model, rules)
    with warnings.catch_warnings():  # a rule set of caches only has no weight rule
        warnings.simplefilter("ignore")
        variables = qmodel.init_from({"params": ctx.params, "cache": cache}, sample, decode=True)
    variables = {k: v for k, v in variables.items() if k != "cache"}
    served_fn, served = pj.serve_model(qmodel, {**variables, "cache": cache}, sample,
                                       decode=True, mutable=["cache"])
    served = {k: v for k, v in served.items() if k != "cache"}

    def step(served, cache, tokens):
        logits, upd = served_fn({**served, "cache": cache}, tokens, decode=True,
                                mutable=["cache"])
        return logits, upd["cache"]

    with tempfile.TemporaryDirectory() as tmp:
        nbytes = pj.save_quantized(os.path.join(tmp, "served.msgpack"), served)
    return step, served, nbytes


def teacher_forced_bpb(ctx: Context, step, variables, batch: int = 64) -> tuple[float, float]:
    """Held-out bits/byte with every window prefilled through the KV cache (its keys and
    values written -- quantized, if the rules say so -- then read by the attention), and
    the cache's stored bytes per token."""
    a = ctx.args
    windows = lm.eval_windows(ctx.heldout, a.seq_len, a.eval_windows)
    windows = windows[:len(windows) // batch * batch] if len(windows) >= batch else windows
    batch = min(batch, len(windows))
    cache = lm.init_cache(ctx.model, batch)

    @jax.jit
    def loss(variables, cache, w):  # (the empty cache an argument: XLA would fold a constant)
        logits, new = step(variables, cache, w[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()
        return ce, new

    total, new = 0.0, None
    for i in range(0, len(windows), batch):
        ce, new = loss(variables, cache, jnp.asarray(windows[i:i + batch]))
        total += float(ce)
    per_token = pj_tree_nbytes(new) / (batch * ctx.config.max_len)
    return total / (len(windows) // batch) / math.log(2), per_token


def pj_tree_nbytes(tree) -> int:
    """Bytes a tree holds, a ``QuantizedArray`` counting its codes and scales."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, pj.QuantizedArray))
    return int(sum(x.nbytes if isinstance(x, pj.QuantizedArray) else np.asarray(x).nbytes
                   for x in leaves))


def continuation(ctx: Context, step, variables, prompt):
    """Greedy bytes after ``prompt`` ``(1, length)`` (as many as the cache holds, at most
    ``CONTINUATION_BYTES``), and decoding tokens/s (prefill included)."""
    n = min(CONTINUATION_BYTES, ctx.config.max_len - prompt.shape[1])
    cache = lm.init_cache(ctx.model, 1)
    gen = jax.jit(lambda v, c, p: pj.serving.generate(functools.partial(step, v), c, p, n,
                                                      max_len=ctx.config.max_len))
    tokens, _ = jax.block_until_ready(gen(variables, cache, prompt))  # compiled
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(gen(variables, cache, prompt))
        times.append(time.perf_counter() - start)
    return np.asarray(tokens[0]), n / float(np.median(times))


def decode_section(ctx: Context) -> str:
    """The "decode" suite: bits/byte teacher-forced through each KV cache format, cache
    bytes per token, checkpoint bytes and batch-1 decoding tokens/s, then the
    continuations of a held-out prompt by the fp32 model and by int4 weights served with
    an int8 cache."""
    a = ctx.args
    int4 = group_rules(ctx.config)
    rows = [("fp32, float cache", None)]
    rows += [(f"fp32 weights, {name}", kv_rules(kv)) for name, kv in KV_FORMATS.items()]
    rows += [("int4 g32 served, float cache", int4),
             ("int4 g32 served, int8 KV cache", kv_rules(KV_FORMATS["int8 KV cache"], int4))]
    length = min(PROMPT_BYTES, ctx.config.max_len // 2)
    prompt = jnp.asarray(ctx.heldout[None, :length].astype(np.int32))
    results, texts = [], {}
    for name, rules in rows:
        step, variables, nbytes = decode_step(ctx, rules)
        row = DecodeRow(name, nbytes)
        row.bpb, row.cache_bytes = teacher_forced_bpb(ctx, step, variables)
        tokens, row.tokens_per_s = continuation(ctx, step, variables, prompt)
        if name in ("fp32, float cache", "int4 g32 served, int8 KV cache"):
            texts[name] = tokens
        results.append(row)
    base = results[0]
    lines = [f"decoding with a KV cache ({a.seq_len}-byte held-out windows prefilled through "
             f"the cache; {CONTINUATION_BYTES} greedy bytes at batch 1 for tokens/s -- this "
             "small model's own speed: benchmarks/bench_decode.py measures a 534 M-parameter "
             "decoder)",
             f"| {'model':<34} | bits/byte | vs fp32 | checkpoint bytes | cache B/token  "
             f"| tokens/s |", f"|{'-' * 36}|{'-' * 11}|{'-' * 9}|{'-' * 18}|{'-' * 16}|"
             f"{'-' * 10}|"]
    for r in results:
        ratio = r.cache_bytes / base.cache_bytes
        lines.append(f"| {r.name:<34} | {r.bpb:9.4f} | {100 * (r.bpb / base.bpb - 1):+6.2f}% "
                     f"| {r.checkpoint_bytes:16,d} | {r.cache_bytes:6.0f} ({ratio:4.2f}x) "
                     f"| {r.tokens_per_s:8.0f} |")
    text = lambda t: bytes(np.asarray(t, np.uint8)).decode("utf-8", "replace")  # noqa: E731
    lines.append(f"held-out prompt: {text(np.asarray(prompt[0]))!r}")
    for name, tokens in texts.items():
        lines.append(f"{name}: {text(tokens)!r}")
    return "\n".join(lines)


DECODE_ROWS: list[Callable[[Context], Row]] = []  # the suite prints its own table


SUITES: dict[str, list[Callable[[Context], Row]]] = {
    "main": ROWS, "formats": FORMAT_ROWS, "algorithms": ALGORITHM_ROWS,
    "attention": ATTENTION_ROWS, "scales": SCALE_ROWS, "decode": DECODE_ROWS}


def suite_rows(names: list[str]) -> list[Callable[[Context], Row]]:
    """The rows of the named suites in order, ``"all"`` for every suite; a row shared by
    two suites (``fp32_row``) runs once."""
    names = list(SUITES) if "all" in names else names
    rows = []
    for name in names:
        rows += [r for r in SUITES[name] if r not in rows]
    return rows


@dataclasses.dataclass
class Result:
    name: str
    bpb: float
    params: int  # array elements in the row's variables
    param_bytes: int  # their bytes (codes, scales and float leaves)
    forward_ms: float | None = None  # deployed rows: median jitted forward time
    checkpoint_bytes: int | None = None  # deployed rows: pj.save_quantized's file


def measure(row: Row, ctx: Context) -> Result:
    """Held-out bits/byte of a row; a deployed row's checkpoint size too (its forward
    time is measured for all deployed rows together, ``forward_times``)."""
    name, apply_fn, variables = row
    a = ctx.args
    bpb = evaluate_bpb(apply_fn, variables, ctx.heldout, seq_len=a.seq_len,
                       n_windows=a.eval_windows)
    result = Result(name, bpb, lm.count_params(variables), lm.tree_bytes(variables))
    if getattr(row, "deployed", False):
        with tempfile.TemporaryDirectory() as tmp:
            result.checkpoint_bytes = pj.save_quantized(os.path.join(tmp, "ckpt.msgpack"),
                                                        variables)
    return result


def forward_times(rows: list[Row], *, batch: int = 64, seq_len: int = 256,
                  rounds: int = 5, seed: int = SEED) -> list[float]:
    """Median seconds of each row's jitted forward pass on one ``(batch, seq_len)``
    batch of random bytes, the rows timed in turn, ``rounds`` times (interleaved, so
    that a slow spell of a shared machine hits every row alike), after a warm-up call
    each."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, seq_len)),
                         jnp.int32)
    fns = [(jax.jit(r.apply_fn), r.variables) for r in rows]
    for fn, v in fns:
        jax.block_until_ready(fn(v, tokens))
    times = [[] for _ in rows]
    for _ in range(rounds):
        for (fn, v), ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            jax.block_until_ready(fn(v, tokens))
            ts.append(time.perf_counter() - t)
    return [float(np.median(ts)) for ts in times]


def table(results: list[Result], fwd_shape: tuple[int, int] = (64, 256)) -> str:
    base = next((r for r in results if r.name == "fp32"), None)
    head = f"forward {fwd_shape[0]}x{fwd_shape[1]}"
    lines = [f"| {'model':<36} | {'bits/byte':>9} | {'vs fp32':>8} | {'checkpoint bytes':>22} "
             f"| {head:>20} |",
             f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|{'-' * 24}|{'-' * 22}|"]
    for r in results:
        delta = f"{100 * (r.bpb / base.bpb - 1):+7.2f}%" if base else ""
        ckpt = fwd = ""
        if r.checkpoint_bytes is not None:
            ckpt = f"{r.checkpoint_bytes:,}"
            if base and base.checkpoint_bytes:
                ckpt += f" ({r.checkpoint_bytes / base.checkpoint_bytes:.3f}x)"
        if r.forward_ms is not None:
            fwd = f"{r.forward_ms:.1f} ms"
            if base and base.forward_ms:
                fwd += f" ({r.forward_ms / base.forward_ms:.2f}x)"
        lines.append(f"| {r.name:<36} | {r.bpb:>9.4f} | {delta:>8} | {ckpt:>22} | {fwd:>20} |")
    return "\n".join(lines)


def plot(fp32: TrainResult, results: list[Result], path: str, curves=None) -> None:
    """Left: training loss of fp32 and of the QAT fine-tunes (appended after it);
    right: held-out bits/byte of every row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(losses):
        bits = np.asarray(losses) / math.log(2)
        k = max(1, len(bits) // 50)
        return np.arange(k - 1, len(bits)), np.convolve(bits, np.ones(k) / k, mode="valid")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5),
                                 gridspec_kw={"width_ratios": [1, 1.3]})
    bits = fp32.losses / math.log(2)
    ax.plot(np.arange(len(bits)), bits, color="0.85", lw=0.8, label="fp32 training batch")
    ax.plot(*smooth(fp32.losses), color="C0", label="fp32 (running mean)")
    for i, (name, res) in enumerate((curves or {}).items()):
        x, y = smooth(res.losses)
        ax.plot(len(bits) + x, y, color=f"C{i + 1}", label=f"{name} fine-tune")
    ax.set_xlabel("step")
    ax.set_ylabel("training bits per byte")
    ax.set_ylim(max(0.0, float(np.median(bits[-50:])) - 0.5),
                min(8.5, float(np.median(bits[-50:])) + 1.5))
    ax.set_title("byte-level transformer on the Python standard library")
    ax.legend(fontsize=8)
    names = [r.name for r in results][::-1]
    values = [r.bpb for r in results][::-1]
    colors = ["C0" if r.name == "fp32" else ("C2" if "served" in r.name else "C1")
              for r in results][::-1]
    bx.barh(names, values, color=colors)
    lo = min(values)
    bx.set_xlim(lo - 0.05 * lo, max(values) + 0.02 * lo)
    for y, v in enumerate(values):
        bx.text(v, y, f" {v:.4f}", va="center", fontsize=8)
    bx.set_xlabel("held-out bits per byte (lower is better)")
    bx.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- driver -------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64, help="training and held-out context")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--qat-steps", type=int, default=150, help="QAT fine-tuning steps")
    p.add_argument("--qat-lr", type=float, default=1e-3, help="QAT peak learning rate")
    p.add_argument("--lsq-lr-scale", type=float, default=0.1,
                   help="LSQ step sizes learn at this times the QAT learning rate")
    p.add_argument("--calib-batches", type=int, default=16,
                   help="training batches that set the PTQ input ranges")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--eval-windows", type=int, default=1024,
                   help="held-out windows of seq-len+1 bytes (0: all of them)")
    p.add_argument("--fwd-batch", type=int, default=64)
    p.add_argument("--fwd-seq", type=int, default=256)
    p.add_argument("--fwd-rounds", type=int, default=5,
                   help="interleaved timed forward calls per deployed row")
    p.add_argument("--max-bytes", type=int, default=None, help="truncate both streams")
    p.add_argument("--out", default=DEFAULT_OUT, help="plot path ('' for none)")
    p.add_argument("--rows", nargs="+", default=["main", "decode"], choices=[*SUITES, "all"],
                   help="row suites to run after fp32 training (default: main decode)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and data, a few steps (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seq_len = 30, 8, 32
        args.d_model, args.layers, args.heads, args.warmup = 32, 1, 2, 5
        args.eval_windows, args.fwd_batch, args.fwd_seq = 16, 4, 64
        args.qat_steps, args.calib_batches, args.fwd_rounds = 4, 2, 2
        args.max_bytes = args.max_bytes or 200_000
    if args.eval_windows == 0:
        args.eval_windows = None
    return args


#: ``/proc/cpuinfo`` flags, widest first: XLA:CPU's code (and so the float rounding) follows
#: the host's vector ISA
_ISA_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))


def platform_line() -> str:
    """What the figures depend on besides the code, the corpus and the seed: jax/jaxlib,
    the CPU's model and vector ISA, and how many CPUs XLA:CPU splits its work over.

    On one such platform the run is bit-reproducible (same losses, same bits/byte);
    another ISA or CPU count rounds differently from the random init on, and 800 steps
    amplify those last-bit differences into a few thousandths of a bit per byte (module
    docstring)."""
    import jaxlib

    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("cpu family", "model"):
                    ids[key] = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    if len(ids) == 2:  # a VM's "model name" can be as vague as "AMD EPYC"
        model += f" (family {ids['cpu family']} model {ids['model']})"
    isa = next((name for flag, name in _ISA_FLAGS if flag in flags), "ISA unknown")
    cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count())
    flags_env = os.environ.get("XLA_FLAGS", "")
    return (f"platform: jax {jax.__version__}, jaxlib {jaxlib.__version__} "
            f"({jax.default_backend()}); {model}, {isa}, {cpus} CPU{'s' * (cpus != 1)}"
            + (f"; XLA_FLAGS={flags_env!r}" if flags_env else ""))


def setup(args: argparse.Namespace) -> Context:
    """Load the corpus and train the fp32 model."""
    train_data, heldout, info = lm.load_corpus(args.max_bytes)
    config = lm.Config(d_model=args.d_model, num_heads=args.heads, num_layers=args.layers,
                       max_len=max(args.seq_len, args.fwd_seq))
    model, params = lm.init_linen(config, args.seed)
    print(f"corpus: {info['files']} .py files under {info['root']} "
          f"({len(info['heldout_files'])} held out); train {info['train_bytes']:,} bytes, "
          f"held-out {info['heldout_bytes']:,} bytes; sha256 {info['sha256'][:12]}")
    print(platform_line())
    print(f"model: d={config.d_model} layers={config.num_layers} heads={config.num_heads} "
          f"max_len={config.max_len}: {lm.count_params(params):,} parameters")
    fp32 = train(lambda p, x: model.apply({"params": p}, x), params, train_data,
                 steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                 warmup=args.warmup, weight_decay=args.weight_decay, seed=args.seed,
                 desc="fp32")
    print(f"fp32 training: {args.steps} steps of {args.batch}x{args.seq_len} bytes in "
          f"{fp32.total_s:.1f} s (first step {fp32.compile_s:.1f} s, then "
          f"{1e3 * fp32.step_s:.1f} ms/step; process CPU {fp32.cpu_s:.0f} s on "
          f"{os.cpu_count()} cores); last-50-step training loss "
          f"{fp32.losses[-50:].mean() / math.log(2):.3f} bits/byte")
    return Context(args, config, model, fp32.params, train_data, heldout, fp32)


def rule_report(reports: dict) -> str:
    """Each rule set's ``QuantReport.summary()``, under its name."""
    return "\n".join(f"rules '{name}':\n" + "\n".join(
        "  " + line for line in report.summary().splitlines())
        for name, report in reports.items())


def phase_times(phases: dict) -> str:
    """``{phase: (wall s, process CPU s)}`` (a row's phase: building it -- calibration,
    fine-tune, ``serve_model`` -- and its held-out evaluation, compilations included),
    as a few lines for the run's log: where a run's time went."""
    items = [f"{name} {wall:.1f}/{cpu:.0f}" for name, (wall, cpu) in phases.items()]
    lines, line = [], "time per phase (wall s / process CPU s):"
    for item in items:
        if len(line) + len(item) > 96:
            lines.append(line)
            line = "   "
        line += f" {item};"
    return "\n".join(lines + [line.rstrip(";")])


def run(rows: list[Callable[[Context], Row]] | None = None, argv=None):
    """Train fp32, build and measure every row; returns ``(ctx, results)``."""
    start, cpu_start = time.perf_counter(), time.process_time()
    args = parse_args(argv)
    ctx = setup(args)
    phases = {"corpus, fp32 training": (time.perf_counter() - start,
                                         time.process_time() - cpu_start)}
    results, deployed = [], []
    rows = rows if rows is not None else suite_rows(args.rows)
    with tqdm(rows, desc="rows", unit="row", leave=False) as bar:
        for make_row in bar:
            t, c = time.perf_counter(), time.process_time()
            row = make_row(ctx)
            if not isinstance(row, Row):
                row = Row(*row, deployed=not results)  # a plain (name, fn, variables) tuple
            bar.set_postfix_str(row.name)
            results.append(measure(row, ctx))
            if row.deployed:
                deployed.append((row, results[-1]))
            phases[row.name] = (time.perf_counter() - t, time.process_time() - c)
    if deployed:
        t, c = time.perf_counter(), time.process_time()
        times = forward_times([r for r, _ in deployed], batch=args.fwd_batch,
                              seq_len=args.fwd_seq, rounds=args.fwd_rounds, seed=args.seed)
        for (_, result), seconds in zip(deployed, times, strict=True):
            result.forward_ms = 1e3 * seconds
        phases["forward times"] = (time.perf_counter() - t, time.process_time() - c)
    if ctx.reports:
        print(rule_report(ctx.reports))
    for name, res in ctx.curves.items():
        print(f"{name}: {len(res.losses)} fine-tuning steps in {res.total_s:.1f} s "
              f"(first step {res.compile_s:.1f} s, then {1e3 * res.step_s:.1f} ms/step)")
    if results:
        print(table(results, (args.fwd_batch, args.fwd_seq)))
    if "decode" in args.rows or "all" in args.rows:
        t, c = time.perf_counter(), time.process_time()
        print(decode_section(ctx))
        phases["decode"] = (time.perf_counter() - t, time.process_time() - c)
    if args.out:
        t, c = time.perf_counter(), time.process_time()
        plot(ctx.fp32, results, args.out, ctx.curves)
        print(f"plot: {args.out}")
        phases["plot"] = (time.perf_counter() - t, time.process_time() - c)
    print(phase_times(phases))
    print(f"total {time.perf_counter() - start:.0f} s wall, process CPU "
          f"{time.process_time() - cpu_start:.0f} s on {os.cpu_count()} cores "
          f"(jax {jax.__version__}, {jax.default_backend()})")
    return ctx, results


if __name__ == "__main__":
    run()
