"""The digits QAT example, shortened: QAT must beat the post-training-quantized model it
starts from, 8-bit PTQ must stay at the fp32 accuracy, and the integer-served QAT model
must predict what its fake-quant evaluation predicts on every test image (and really
run integer convolutions and matmuls)."""

import contextlib
import importlib.util
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

import pychop_jax as pj

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "qat_digits.py")


def _example():
    spec = importlib.util.spec_from_file_location("qat_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained():
    """(example module, data, a row function that trains fp32 once): both tests start
    from the same 10-epoch fp32 model (the same seed: the model each trained before)."""
    ex = _example()
    data = ex.load_data()
    cache = {}

    def fp32_row(ctx):
        if not cache:
            cache["row"], cache["fp32"] = ex.fp32_row(ctx), ctx.fp32
        ctx.fp32 = cache["fp32"]
        return cache["row"]

    return ex, data, fp32_row


@contextlib.contextmanager
def _no_deprecations():
    """The example's rows emit no DeprecationWarning (it uses none of the deprecated
    QAT layers / ``to_served``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        yield
    found = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
             if issubclass(w.category, DeprecationWarning)]
    assert not found, found


def _matmuls(jaxpr):
    """The conv / dot_general equations of a jaxpr, those of its sub-jaxprs (jit, ...)
    included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            out.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    out.extend(_matmuls(sub))
    return out


def _int_ops_checked(ex):
    """A row function that checks that the served 4-bit QAT model multiplies int8 codes:
    its two convolutions and two dense layers are int8 x int8 -> int32 products, and
    every other product is a rank-1 outer product (zero-point corrections, scales),
    nothing contracting in float; it yields no row."""
    def check(ctx):
        qmodel, variables = ctx.trained["4-bit QAT, from fp32"]
        served_fn, served_vars = pj.serve_model(qmodel, variables, ctx.data.x_test[:1])
        jaxpr = jax.make_jaxpr(served_fn)(served_vars, ctx.data.x_test[:8]).jaxpr
        ops = _matmuls(jaxpr)
        codes = [e for e in ops if [v.aval.dtype for v in e.invars] == [jnp.int8] * 2]
        assert sorted(e.primitive.name for e in codes) == \
            ["conv_general_dilated"] * 2 + ["dot_general"] * 2
        assert all(e.params["preferred_element_type"] == jnp.int32 for e in codes)
        for e in ops:
            if e not in codes:
                assert e.primitive.name == "dot_general", e
                (contracted, _), _ = e.params["dimension_numbers"]
                assert all(e.invars[0].aval.shape[d] == 1 for d in contracted), e
        return None
    return check


@pytest.mark.slow
def test_short_qat_run_beats_its_ptq_start(tmp_path, trained):
    ex, data, fp32_row = trained
    notes = []
    with _no_deprecations():
        fp32, ptq8, ptq4, qat4, _, served = ex.run(
            [fp32_row, ex.ptq_row(8), ex.ptq_row(4), ex.qat_row(4), _int_ops_checked(ex),
             ex.served_row("4-bit QAT, from fp32")], epochs=10, data=data, notes=notes)
    assert fp32.accuracy > 90  # the fp32 model did learn
    assert abs(ptq8.accuracy - fp32.accuracy) <= 0.5
    assert qat4.accuracy > ptq4.accuracy
    assert qat4.method == "QAT" and qat4.bits == 4
    # the integer-served model predicts exactly what its fake-quant evaluation does
    assert served.accuracy == qat4.accuracy and served.method == "served"
    n = len(data.y_test)
    assert f"on {n}/{n} test images" in notes[0]
    table = ex.table([fp32, ptq8, ptq4, qat4])
    assert "4-bit QAT" in table and f"{qat4.accuracy:.2f}%" in table
    ex.plot([fp32, ptq8, ptq4, qat4], str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.slow
def test_short_run_of_the_format_rows(trained):
    """fp8 e4m3 per-tensor PTQ stays within 0.5 pt of fp32 (the issue's target); the MX
    rows run and stay close; the served MXFP8 QAT model predicts what its fake-quant
    evaluation predicts."""
    ex, data, fp32_row = trained
    notes = []
    with _no_deprecations():
        fp32, fp8, mxfp4, mxfp8, served = ex.run(
            [fp32_row, ex.format_row(ex.FP8_PTQ, 8, ex.FP8),
             ex.format_row(ex.MXFP4_PTQ, 4, ex.MXFP4_W),
             ex.format_row(ex.MXFP8_QAT, 8, ex.MXFP8, qat=True, epochs_factor=0.2),
             ex.served_row(ex.MXFP8_QAT, fmt=(8, "MXFP8"))], epochs=10, data=data,
            notes=notes)
    assert fp32.accuracy > 90
    assert abs(fp8.accuracy - fp32.accuracy) <= 0.5
    assert mxfp4.accuracy > fp32.accuracy - 5 and mxfp8.accuracy > fp32.accuracy - 2
    assert {fp8.method, mxfp4.method, mxfp8.method, served.method} == {"formats"}
    assert (fp8.bits, mxfp4.bits, mxfp8.bits) == (8, 4, 8)
    assert served.accuracy == mxfp8.accuracy and "MXFP8 codes" in served.name
    n = len(data.y_test)
    assert f"on {n}/{n} test images" in notes[0]
    assert "E8M0/ch conv" in ex.table([fp32, mxfp4])


def test_rules_lay_the_quantizers_the_example_describes():
    """The rows' rules, laid on the stock CNN (an abstract trace): integer weights per
    output channel; MX blocks of 32 along the dense kernels' contraction (axis 0) and the
    dense inputs' last axis; one E8M0 scale per conv output channel and per conv input."""
    ex = _example()
    x = jnp.zeros((2, 8, 8, 1), jnp.float32)

    def laid(rules):
        report = pj.quantization_report(ex.CNN(), rules, x)
        assert not report.unmatched and len(report.ops) == 4
        return {op.module: (op.weight_spec, op.input_spec) for op in report.ops}

    ints = laid(ex.int_rules(4))
    for module, axis in (("conv1", 3), ("conv2", 3), ("fc", 1), ("head", 1)):
        w, a = ints[module]
        assert (w.bits, w.symmetric, w.axis, w.group_size) == (4, True, axis, None)
        assert (a.bits, a.symmetric, a.axis) == (4, False, None)
    mx = laid(ex.MXFP8)
    e8m0 = "float8_e8m0fnu"
    for conv in ("conv1", "conv2"):
        w, a = mx[conv]
        assert (w.dtype, w.scale_dtype, w.axis, w.group_size) == \
            ("float8_e4m3fn", e8m0, 3, None)
        assert (a.dtype, a.scale_dtype, a.axis) == ("float8_e4m3fn", e8m0, None)
    for dense in ("fc", "head"):
        w, a = mx[dense]
        assert (w.dtype, w.scale_dtype, w.axis, w.group_size) == \
            ("float8_e4m3fn", e8m0, 0, 32)
        assert a == pj.formats.MXFP8_E4M3  # blocks of 32 along the last axis, per call
    mx4 = laid(ex.MXFP4_W)
    assert mx4["fc"][0].dtype == "float4_e2m1fn" and mx4["fc"][0].group_size == 32
    assert mx4["conv2"][0].axis == 3 and {a for _, a in mx4.values()} == {None}
    fp8 = laid(ex.FP8)
    assert all(w.axis is None and a.axis is None and w.dtype == a.dtype == "float8_e4m3fn"
               for w, a in fp8.values())
