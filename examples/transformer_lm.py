"""A byte-level transformer language model on the Python standard library's source.

    python examples/transformer_lm.py [--steps 800] [--batch 32] [--seq-len 64] ...
    python examples/transformer_lm.py --quick          # seconds; for tests

The fp32 half of the quantization example: a small decoder-only transformer written with
stock ``flax.linen`` layers only (``transformer_lm_model.TransformerLM``; no
``pychop_jax`` import anywhere) is trained with optax AdamW (linear warmup, cosine
decay) on the bytes of the interpreter's own standard-library ``.py`` files, and scored
by held-out bits per byte (mean cross-entropy in nats / ln 2) on fixed windows of the
held-out files.  See ``transformer_lm_model`` for exactly which files, the split, and
the parameter paths.

Prints a table with one row per entry of ``ROWS``: held-out bits/byte, number of
parameters (array elements in the row's variables), their bytes, and the median
forward time of a jitted call on a 64 x 256 batch.  A row is a function
``row(ctx) -> (name, apply_fn, variables)`` where ``apply_fn(variables, tokens)`` returns
logits; quantized rows are added by appending to ``ROWS`` (or passing a longer list to
``run``), and are measured by the same ``evaluate_bpb`` and ``forward_time``.  Saves a
plot of the training loss to ``examples/out/transformer_lm.png``.

The model's ``max_len`` is ``max(--seq-len, --fwd-seq)`` so that the 64 x 256 timing
batch fits; with the default ``--seq-len 64`` the position embeddings past 64 are never
trained, so held-out bits/byte are measured at the training context only (windows of
65 bytes, all 64 predictions counted).  Costs on 2 CPU cores, roughly: training
800 x 32 x 64 bytes ~100-115 s (~130 ms/step), one ``evaluate_bpb`` over 1024 windows
~1.5 s, one ``forward_time`` ~4 s (six 64 x 256 calls, compilation aside).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transformer_lm_model as lm  # noqa: E402

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


def train(apply_fn: Callable, params, data: np.ndarray, *, steps: int, batch: int,
          seq_len: int, lr: float = 6e-3, warmup: int = 100, weight_decay: float = 0.01,
          seed: int = SEED, desc: str = "train") -> TrainResult:
    """AdamW with linear warmup and cosine decay on ``cross_entropy(apply_fn(params, x), y)``.

    ``apply_fn(params, tokens) -> logits`` is differentiated with respect to ``params``;
    batches come from ``lm.batches(data, batch, seq_len, seed)``.  One jitted step;
    parameters and optimizer state are donated.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=min(warmup, max(steps - 1, 1)), decay_steps=max(steps, 2),
        end_value=lr / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.98, weight_decay=weight_decay))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply_fn(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the caller's stays valid
    opt_state = tx.init(params)
    data_iter = lm.batches(data, batch, seq_len, seed)
    losses = []
    start, cpu_start = time.perf_counter(), time.process_time()
    compile_s = 0.0
    with tqdm(range(steps), desc=desc, leave=False, mininterval=1.0) as bar:
        for i in bar:
            x, y = next(data_iter)
            params, opt_state, loss = step(params, opt_state, x, y)
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
                       step_s, total_s, cpu_s)


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
    """What a row may use: the trained fp32 model and the data."""
    args: argparse.Namespace
    config: lm.Config
    model: lm.TransformerLM
    params: object  # trained fp32 linen params
    train_data: np.ndarray
    heldout: np.ndarray
    fp32: TrainResult


Row = tuple[str, Callable, object]  # (name, apply_fn(variables, tokens) -> logits, variables)


def fp32_row(ctx: Context) -> Row:
    return "fp32", ctx.model.apply, {"params": ctx.params}


ROWS: list[Callable[[Context], Row]] = [fp32_row]


@dataclasses.dataclass
class Result:
    name: str
    bpb: float
    params: int
    param_bytes: int
    forward_ms: float


def measure(row: Row, ctx: Context) -> Result:
    name, apply_fn, variables = row
    a = ctx.args
    bpb = evaluate_bpb(apply_fn, variables, ctx.heldout, seq_len=a.seq_len,
                       n_windows=a.eval_windows)
    fwd = forward_time(apply_fn, variables, batch=a.fwd_batch, seq_len=a.fwd_seq)
    return Result(name, bpb, lm.count_params(variables), lm.tree_bytes(variables),
                  1e3 * fwd)


def table(results: list[Result], fwd_shape: tuple[int, int] = (64, 256)) -> str:
    head = f"forward {fwd_shape[0]}x{fwd_shape[1]}"
    lines = [f"{'model':<28} {'bits/byte':>9} {'params':>10} {'param bytes':>12} {head:>16}"]
    for r in results:
        lines.append(f"{r.name:<28} {r.bpb:>9.4f} {r.params:>10,} {r.param_bytes:>12,} "
                     f"{r.forward_ms:>13.1f} ms")
    return "\n".join(lines)


def plot(fp32: TrainResult, results: list[Result], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = fp32.losses / math.log(2)
    k = max(1, len(bits) // 50)
    smooth = np.convolve(bits, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(len(bits)), bits, color="0.8", lw=0.8, label="training batch")
    ax.plot(np.arange(k - 1, len(bits)), smooth, color="C0", label=f"mean of {k} steps")
    for i, r in enumerate(results):
        ax.axhline(r.bpb, color=f"C{i + 1}", ls="--", lw=1, label=f"held-out: {r.name}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(0, min(8.5, float(bits.max()) + 0.2))
    ax.set_title("byte-level transformer on the Python standard library")
    ax.legend()
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
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--eval-windows", type=int, default=1024,
                   help="held-out windows of seq-len+1 bytes (0: all of them)")
    p.add_argument("--fwd-batch", type=int, default=64)
    p.add_argument("--fwd-seq", type=int, default=256)
    p.add_argument("--max-bytes", type=int, default=None, help="truncate both streams")
    p.add_argument("--out", default=DEFAULT_OUT, help="plot path ('' for none)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and data, a few steps (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seq_len = 30, 8, 32
        args.d_model, args.layers, args.heads, args.warmup = 32, 1, 2, 5
        args.eval_windows, args.fwd_batch, args.fwd_seq = 16, 4, 64
        args.max_bytes = args.max_bytes or 200_000
    if args.eval_windows == 0:
        args.eval_windows = None
    return args


def setup(args: argparse.Namespace) -> Context:
    """Load the corpus and train the fp32 model."""
    train_data, heldout, info = lm.load_corpus(args.max_bytes)
    config = lm.Config(d_model=args.d_model, num_heads=args.heads, num_layers=args.layers,
                       max_len=max(args.seq_len, args.fwd_seq))
    model, params = lm.init_linen(config, args.seed)
    print(f"corpus: {info['files']} .py files under {info['root']} "
          f"({len(info['heldout_files'])} held out); train {info['train_bytes']:,} bytes, "
          f"held-out {info['heldout_bytes']:,} bytes")
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


def run(rows: list[Callable[[Context], Row]] | None = None, argv=None):
    """Train fp32, build and measure every row; returns ``(ctx, results)``."""
    args = parse_args(argv)
    ctx = setup(args)
    results = []
    for make_row in rows if rows is not None else ROWS:
        results.append(measure(make_row(ctx), ctx))
    print(table(results, (args.fwd_batch, args.fwd_seq)))
    if args.out:
        plot(ctx.fp32, results, args.out)
        print(f"plot: {args.out}")
    return ctx, results


if __name__ == "__main__":
    run()
