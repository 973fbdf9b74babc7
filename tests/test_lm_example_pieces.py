"""The fp32 pieces of the byte-level language-model example (examples/transformer_lm*.py):
the standard-library corpus and its split, the batch sampler, the linen and nnx models
(same paths, same logits, causal), and a few training steps of the script's --quick mode."""

import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lm = _load("transformer_lm_model")
TINY = lm.Config(d_model=16, num_heads=2, num_layers=2, mlp_ratio=2, max_len=12)


@pytest.fixture(scope="module")
def corpus():
    return lm.load_corpus()


@pytest.fixture(scope="module")
def tiny():
    """(linen model, params, nnx model from the params, jitted linen fn, jitted nnx fn)."""
    model, params = lm.init_linen(TINY, seed=1)
    nmodel = lm.nnx_from_linen(params, TINY)
    nnx_fn = nnx.jit(lambda m, x: m(x))
    return (model, params, nmodel, jax.jit(lambda x: model.apply({"params": params}, x)),
            lambda x: nnx_fn(nmodel, x))


_SETUPS = {}


@pytest.fixture
def example(monkeypatch):
    """The example script, its ``setup`` (corpus, fp32 training) run once per argument
    set in this process: the --quick runs below train the same fp32 model.  Each run
    gets its own Context (the rows' dicts fresh, its own args)."""
    ex = _load("transformer_lm")
    real = ex.setup

    def setup(args):
        key = repr(sorted((k, v) for k, v in vars(args).items() if k != "out"))
        if key not in _SETUPS:
            _SETUPS[key] = real(args)
        return dataclasses.replace(_SETUPS[key], args=args, quantized={}, reports={},
                                   curves={}, algorithm_log={}, qmodels={})

    monkeypatch.setattr(ex, "setup", setup)
    return ex


def test_corpus_is_the_stdlib_sources(corpus):
    train, heldout, info = corpus
    files = lm.corpus_files()
    assert info["files"] == len(files) > 100
    assert files == sorted(files) and "os.py" in files and "json/decoder.py" in files
    for rel in files:
        parts = rel.split("/")
        assert rel.endswith(".py") and not parts[-1].startswith("_sysconfigdata_")
        assert not lm.EXCLUDED_DIRS & set(parts[:-1]), rel
    assert train.dtype == heldout.dtype == np.uint8
    assert train.size > 1_000_000 and heldout.size > 100_000
    sizes = {rel: os.path.getsize(os.path.join(info["root"], rel)) for rel in files}
    assert train.size + heldout.size == sum(sizes.values())
    assert heldout.size == sum(sizes[rel] for rel in info["heldout_files"])
    # the digest printed beside the figures: of the two whole streams, train first
    assert info["sha256"] == hashlib.sha256(train.tobytes() + heldout.tobytes()).hexdigest()
    # the first held-out file starts the held-out stream
    first = info["heldout_files"][0]
    with open(os.path.join(info["root"], first), "rb") as f:
        assert heldout[:sizes[first]].tobytes() == f.read()


def test_split_is_fixed_and_disjoint(corpus):
    _, heldout, info = corpus
    files = lm.corpus_files()
    held = [rel for rel in files if lm.is_heldout(rel)]
    assert held == info["heldout_files"]
    assert 0.02 < len(held) / len(files) < 0.10
    # a function of the path alone
    assert lm.is_heldout("os.py") == lm.is_heldout("os.py")
    assert [lm.is_heldout(p) for p in held] == [True] * len(held)
    train2, heldout2, _ = lm.load_corpus(max_bytes=5000)
    assert np.array_equal(heldout2, heldout[:5000]) and train2.size == 5000


def test_batches_are_deterministic_shifted_windows(corpus):
    train = corpus[0]
    a, b, c = (lm.batches(train, 4, 16, seed) for seed in (3, 3, 4))
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == np.int32
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert not np.array_equal(xa, xc)
        assert np.array_equal(xa[:, 1:], ya[:, :-1])


def test_eval_windows_are_fixed_and_disjoint():
    data = np.arange(1000, dtype=np.int64) % 256
    w = lm.eval_windows(data.astype(np.uint8), 9)
    assert w.shape == (111, 10) and w[0, 0] == 0 and w[1, 0] == 9  # share one byte only
    some = lm.eval_windows(data.astype(np.uint8), 9, 5)
    assert np.array_equal(some, w[[0, 28, 55, 82, 110]])


def test_linen_param_paths_are_as_documented(tiny):
    params = tiny[1]
    paths = lm.param_paths(params)
    d, h, f = TINY.d_model, TINY.num_heads, TINY.mlp_ratio * TINY.d_model
    want = {"tok_embed/embedding": (256, d), "pos_embed/embedding": (TINY.max_len, d),
            "ln_f/scale": (d,), "ln_f/bias": (d,), "head/kernel": (d, 256), "head/bias": (256,)}
    for i in range(TINY.num_layers):
        b = f"blocks_{i}/"
        for n in ("query", "key", "value"):
            want[b + f"attn/{n}/kernel"] = (d, h, d // h)
            want[b + f"attn/{n}/bias"] = (h, d // h)
        want[b + "attn/out/kernel"], want[b + "attn/out/bias"] = (h, d // h, d), (d,)
        for n in ("ln_1", "ln_2"):
            want[b + f"{n}/scale"] = want[b + f"{n}/bias"] = (d,)
        want[b + "mlp_in/kernel"], want[b + "mlp_in/bias"] = (d, f), (f,)
        want[b + "mlp_out/kernel"], want[b + "mlp_out/bias"] = (f, d), (d,)
    assert paths == want
    assert lm.count_params(params) == sum(math.prod(s) for s in want.values())


def test_nnx_from_linen_has_the_same_paths_and_logits(tiny):
    _, params, _, linen_fn, nnx_fn = tiny
    nmodel = lm.nnx_from_linen(params, TINY)
    assert isinstance(nmodel.blocks_1.attn.query, nnx.LinearGeneral)
    assert isinstance(nmodel.head, nnx.Linear) and isinstance(nmodel.tok_embed, nnx.Embed)
    assert lm.param_paths(nnx.state(nmodel, nnx.Param)) == lm.param_paths(params)
    assert len(jax.tree_util.tree_leaves(nnx.state(nmodel))) == len(
        jax.tree_util.tree_leaves(params))  # parameters only: no rng or cache state
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    want, got = linen_fn(tokens), nnx_fn(tokens)
    assert want.shape == (2, 12, 256)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a copy: changing the nnx model leaves the linen params alone
    nmodel.head.bias[...] = nmodel.head.bias[...] + 1.0
    assert float(jnp.abs(params["head"]["bias"]).max()) == 0.0
    with pytest.raises(ValueError, match="do not fit"):
        lm.nnx_from_linen(params, lm.Config(d_model=16, num_heads=2, num_layers=3,
                                            mlp_ratio=2, max_len=12))


def test_attention_is_causal(tiny):
    linen_fn, nnx_fn = tiny[3:]
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 12))
    b = a.copy()
    t = 5
    b[:, t + 1:] = rng.integers(0, 256, (2, 12 - t - 1))  # change only the future
    for apply in (linen_fn, nnx_fn):
        la, lb = apply(jnp.asarray(a, jnp.int32)), apply(jnp.asarray(b, jnp.int32))
        np.testing.assert_allclose(la[:, :t + 1], lb[:, :t + 1], rtol=1e-6, atol=1e-6)
        assert float(jnp.abs(la[:, t + 1:] - lb[:, t + 1:]).max()) > 1e-4


def test_nnx_model_trains():
    model = lm.NNXTransformerLM(dataclasses.replace(TINY, num_layers=1), rngs=nnx.Rngs(0))
    x, y = next(lm.batches(np.frombuffer(b"abcabcabd" * 20, np.uint8), 4, 12, 0))

    def loss_fn(m):
        logits = m(jnp.asarray(x))
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()

    @nnx.jit
    def sgd_step(m):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        params = nnx.state(m, nnx.Param)
        nnx.update(m, jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads))
        return loss

    losses = [float(sgd_step(model)) for _ in range(3)]
    assert losses[-1] < losses[0]


def mixed_rules(config):
    """int4 group weights everywhere; the MLP's learned (LSQ, quant_params), the rest
    calibrated with observed int8 inputs (quant_stats): a fine-tune carries both."""
    import pychop_jax as pj

    ex = _load("transformer_lm")
    g = ex.group_rules(config)
    return [g[0], g[1], pj.QuantRule(".*mlp_(in|out)", weight=g[2].weight, lsq=True),
            pj.QuantRule(".*", weight=g[-1].weight, act=8)]


@pytest.mark.slow
def test_quick_script_run_lowers_the_loss(tmp_path, example):
    ex = example
    out = tmp_path / "lm.png"
    rows = [ex.fp32_row,
            ex.ptq_row("w8a8 PTQ", "w8a8", lambda c: ex.per_channel_rules(c, act=8)),
            ex.served_row("w8a8 PTQ"),
            ex.qat_row("mixed QAT", "mixed", mixed_rules)]
    ctx, results = ex.run(rows, argv=["--quick", "--out", str(out)])
    fp32, ptq, served, qat = results
    losses = ctx.fp32.losses
    assert len(losses) == ctx.args.steps and losses[-5:].mean() < losses[:5].mean() - 0.5
    assert fp32.name == "fp32" and fp32.bpb < 8.0  # below the uniform 8 bits/byte
    assert fp32.params == lm.count_params(ctx.params) and fp32.param_bytes == 4 * fp32.params
    assert fp32.forward_ms > 0 and out.stat().st_size > 1000
    # PTQ int8: close to fp32, and served on the integer path it scores the same
    assert abs(ptq.bpb - fp32.bpb) < 0.01 * fp32.bpb and ptq.forward_ms is None
    assert served.bpb == pytest.approx(ptq.bpb, rel=1e-3)
    assert served.checkpoint_bytes < 0.35 * fp32.checkpoint_bytes and served.forward_ms > 0
    # the QAT fine-tune carried the observers' ranges and learned the LSQ step sizes
    qmodel, variables = ctx.quantized["mixed QAT"]
    steps = ctx.args.qat_steps
    assert len(ctx.curves["mixed QAT"].losses) == steps and np.isfinite(qat.bpb)
    query = variables["quant_stats"]["blocks_0"]["attn"]["query"]["kernel"]
    assert int(query["input"].count) == steps
    _, fresh = ex.quantized_model(ctx, "mixed", mixed_rules(ctx.config))
    learned = variables["quant_params"]["blocks_0"]["mlp_in"]["kernel"]["weight_scale"]
    fresh = ex.rtn_step_sizes(ctx, mixed_rules(ctx.config), fresh)  # where LSQ started
    start = fresh["quant_params"]["blocks_0"]["mlp_in"]["kernel"]["weight_scale"]
    assert learned.shape == start.shape and not np.allclose(learned, start)
    assert "weight int4 symmetric, groups of 32 along the contraction" in \
        ex.rule_report(ctx.reports)
    # the row machinery: the same numbers for the same apply_fn and variables
    name, apply_fn, variables = ex.fp32_row(ctx)
    bpb = ex.evaluate_bpb(apply_fn, variables, ctx.heldout, seq_len=ctx.args.seq_len,
                          n_windows=ctx.args.eval_windows)
    assert bpb == pytest.approx(fp32.bpb, rel=1e-6)
    assert "fp32" in ex.table(results)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["MXFP4", "NVFP4", "NF4"])
def test_format_rules_put_blocks_on_the_contraction(preset):
    """The "formats" suite's rules: blocks along each kernel's contracted axis, clipped to
    head_dim where that is shorter; the served model (packed codes + scales) gives the
    fake-quantized model's logits."""
    import pychop_jax as pj

    ex = _load("transformer_lm")
    c = lm.Config(d_model=64, num_heads=4, num_layers=1, mlp_ratio=2, max_len=8)
    model, params = lm.init_linen(c, seed=2)
    spec = pj.formats.PRESETS[preset]
    g = spec.group_size
    qmodel = pj.quantize_model(model, ex.format_rules(c, spec))
    x = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    logits = qmodel.apply({"params": params}, x)
    served_fn, served = pj.serve_model(qmodel, {"params": params}, x)
    np.testing.assert_allclose(jax.jit(served_fn)(served, x), logits, rtol=1e-5, atol=1e-5)
    p, s = params["blocks_0"], served["params"]["blocks_0"]
    expected = {("attn", "out"): (1, min(g, 16)), ("attn", "query"): (0, min(g, 64)),
                ("mlp_in",): (0, min(g, 64)), ("mlp_out",): (0, min(g, 128))}
    for path, (axis, group) in expected.items():
        kernel, qa = p, s
        for key in path:
            kernel, qa = kernel[key], qa[key]
        kernel, qa = kernel["kernel"], qa["kernel"]
        assert (qa.spec.axis, qa.spec.group_size, qa.spec.dtype) == (axis, group, spec.dtype)
        want = dataclasses.replace(spec, axis=axis, group_size=group)
        np.testing.assert_array_equal(qa.dequantize(),
                                      pj.fake_quant(kernel, pj.calibrate(kernel, want)))
    table = served["params"]["tok_embed"]["embedding"]
    assert (table.spec.axis, table.spec.group_size) == (1, min(g, 64))


@pytest.mark.slow
def test_quick_algorithm_rows(capsys, example):
    """The "algorithms" suite's machinery on the --quick model: an RTN and an HQQ row on
    the same grid, then the SmoothQuant w8a8 row that prints the suite's table."""
    ex = example
    import pychop_jax as pj

    rules = functools.partial(ex.algorithm_rules, bits=3, group=128)
    rows = [ex.fp32_row, ex.algorithm_row("int3 g128", "RTN", rules),
            ex.algorithm_row("int3 g128", "HQQ", rules, pj.HQQ()), ex.algorithm_summary_row]
    ctx, results = ex.run(rows, argv=["--quick", "--out", ""])
    log = ctx.algorithm_log
    fp32, rtn, hqq, smooth = results
    assert log["fp32"] == pytest.approx(fp32.bpb, rel=1e-6)
    assert log["int3 g128"]["RTN"][0] == pytest.approx(rtn.bpb, rel=1e-6)
    assert log["int3 g128"]["HQQ"][0] == pytest.approx(hqq.bpb, rel=1e-6)
    assert smooth.name == "w8a8 SmoothQuant a=0.5" and np.isfinite(smooth.bpb)
    hqq_report = log["int3 g128"]["HQQ"][2]
    assert {e.path for e in hqq_report.layers} >= {"blocks_0/attn/out/kernel", "head/kernel"}
    assert all(e.details["lp"] <= e.details["lp_rtn"] for e in hqq_report.layers)
    # every grid of the rules is asymmetric (HQQ optimizes the zero point); the
    # embedding tables stay float (no rule for them)
    first, *quantizing = rules(ctx.config)
    assert all(not r.weight.symmetric for r in quantizing)
    assert first.module_path == ".*_embed" and first.weight is None and first.act is None
    out = capsys.readouterr().out
    gap = 100 * (rtn.bpb - hqq.bpb) / (rtn.bpb - fp32.bpb)
    assert f"| {gap:.0f} % |" in out and "max/median of per-channel max|X|" in out


@pytest.mark.slow
def test_quick_decode_suite(example, monkeypatch):
    """The "decode" suite on the --quick model: the float cache reproduces the fp32
    full-forward bits/byte, each quantized cache stores its codes and scales per token
    and head (int8 and fp8 about a quarter of float32's bytes, int4 about a seventh)
    and costs little, and the continuations are printed."""
    ex = example
    monkeypatch.setattr(ex, "CONTINUATION_BYTES", 8)
    ctx, (fp32,) = ex.run([ex.fp32_row], argv=["--quick", "--out", ""])
    text = ex.decode_section(ctx)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "bits/byte" not in line}
    assert float(rows["fp32, float cache"][0]) == pytest.approx(fp32.bpb, rel=1e-4)
    hd = ctx.config.d_model // ctx.config.num_heads  # bytes per (token, head) / float32's
    for name, ratio in [("int8 KV cache", (hd + 2) / (4 * hd)),  # float16 scale
                        ("fp8 e4m3 KV cache", (hd + 1) / (4 * hd)),  # E8M0 scale
                        ("int4 g32 KV cache", (hd / 2 + 2) / (4 * hd))]:  # one group
        bpb, _, _, cache, _ = rows[f"fp32 weights, {name}"]
        assert float(cache.split("(")[1].rstrip("x)")) == pytest.approx(ratio, abs=0.006), name
        assert float(bpb) < fp32.bpb * 1.05, name
    assert "int4 g32 served, int8 KV cache:" in text
