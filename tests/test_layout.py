"""The package's shape as users meet it: imports without torch, star imports that stay
light, the public modules, and modules reached by their subpackage only."""

import importlib
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (imports are process-wide state)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_both_packages_import_and_star_import_with_torch_blocked():
    out = _run("""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import pychop_jax, pychop
        from pychop import *
        from pychop_jax import *
        import numpy as np
        pychop.backend("numpy")
        q = pychop.Chopi(num_bits=8).quantize(np.linspace(-1, 1, 9, dtype=np.float32))
        try:
            pychop.TorchChopi
        except ImportError:
            print("torch names raise ImportError")
        print(sorted(n for n in ("TorchChopi", "Chopi") if n in globals()), q.dtype)
    """)
    assert "torch names raise ImportError" in out
    assert "['Chopi'] uint8" in out


def test_star_import_loads_neither_flax_nnx_nor_torch():
    out = _run("""
        import sys
        from pychop_jax import *
        print("flax.nnx" in sys.modules, "torch" in sys.modules, "equinox" in sys.modules)
        quantize_model, serve_model, calibrate_model  # the transform's entry points
        from pychop_jax.flax import models
        print("flax.nnx" in sys.modules)
        models.QuantizedNnxModel  # loads nnx on first access
        print("flax.nnx" in sys.modules)
    """)
    assert out.split() == ["False", "False", "False", "False", "True"]


def test_the_transform_modules_and_where_the_entry_points_live():
    import pychop_jax as pj
    from pychop_jax.flax import models
    from pychop_jax.serving import deploy
    from pychop_jax.serving.algorithms import calibration
    from pychop_jax.transform import methods, plan, qat, rules

    assert pj.quantize_model is models.quantize_model
    assert pj.quantization_report is models.quantization_report
    assert pj.serve_model is deploy.serve_model and deploy.INPUTS == "quant_inputs"
    assert pj.calibrate_model is calibration.calibrate_model
    assert pj.algorithms.site_layout is calibration.site_layout
    assert not hasattr(pj.algorithms, "for_layer")
    assert pj.QuantRule is rules.QuantRule and pj.QuantReport is rules.QuantReport
    assert pj.qat is qat
    assert (plan.STATS, plan.LEARNED, plan.METHOD) == ("quant_stats", "quant_params",
                                                       "quant_method")
    assert models.STATS == plan.STATS
    assert issubclass(pj.GPTQ, methods.QuantMethod)
    for name in ("dataflow", "plan", "rules", "interpret", "training", "function", "tracing",
                 "views", "methods", "qat"):
        importlib.import_module(f"pychop_jax.transform.{name}")


@pytest.mark.parametrize("gone", ["pychop_jax.flax.quantize_model", "pychop_jax.flax.rules",
                                  "pychop_jax.flax.operands", "pychop_jax.flax.qat",
                                  "pychop_jax.flax.nnx_model",
                                  "pychop_jax.serving.serve_model"])
def test_the_interceptor_modules_are_gone(gone):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(gone)


def test_public_modules_and_no_flat_layout_names():
    import pychop_jax as pj
    import pychop_jax.linen as qnn
    import pychop_jax.nnx as qnnx
    from pychop_jax.flax import linen, nnx

    assert qnn.QuantDense is linen.QuantDense and qnnx.QuantDense is nnx.QuantDense
    assert pj.serving.to_served is pj.serving.serve.to_served
    # the modules live in their subpackages only: no top-level aliases
    for name in ("numerics", "ops", "ste", "ptq", "checkpoint", "int_matmul", "adapter",
                 "numpy_backend", "no_such_module"):
        with pytest.raises(AttributeError):
            getattr(pj, name)
    with pytest.warns(DeprecationWarning, match="QuantizedKernel"):
        assert pj.IntKernel is pj.QuantizedKernel


def test_each_core_concept_in_its_module():
    """numerics keeps the grid formulas; the bit encodings, the stateless MX rule and
    LSQ live beside floatgrid, in blockscale and beside the STE rules."""
    from pychop_jax.core import blockscale, encodings, lsq, numerics

    assert callable(encodings.codes_as_bits) and callable(encodings.encode_float_bits)
    assert callable(blockscale.mx_fake_quant) and callable(lsq.lsq_grads)
    for moved in ("codes_as_bits", "encode_float_bits", "decode_float_bits",
                  "mx_fake_quant", "lsq_init", "lsq_grads"):
        assert not hasattr(numerics, moved), moved
    assert callable(numerics.integer_zero_point)


def test_one_framework_concept_behind_every_quantizer():
    import pychop
    from pychop_jax.interop import Framework, framework_named

    assert isinstance(pychop.JaxChopi.backend, Framework)
    assert pychop.NumpyChopi.backend is framework_named("numpy")
    with pytest.raises(ValueError, match="unknown framework"):
        framework_named("tensorflow")
