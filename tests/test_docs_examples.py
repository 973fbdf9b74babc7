"""The pychop docs' integer-quantization examples, run verbatim, with checks after them.

The snippets are the documentation's text.  Where the docs use a name they never
import, the import is added on a line above the verbatim text (``import pychop``,
and ``NumpyChopi`` in the NumPy example); nothing inside the text is changed.
"""

import ast

import jax.numpy as jnp
import numpy as np
import pytest

import pychop

torch = pytest.importorskip("torch")

X = np.array([[0.1, -0.2], [0.3, 0.4]])

JAX_EXAMPLE = """\
import jax.numpy as jnp
from pychop import Chopi
pychop.backend('jax')
x = jnp.array([[0.1, -0.2], [0.3, 0.4]])
Chopi = Chopi(num_bits=8, symmetric=False)
q = Chopi.quantize(x)
dq = Chopi.dequantize(q)
"""

TORCH_EXAMPLE = """\
import torch
from pychop import Chopi
pychop.backend('torch')
x = torch.tensor([[0.1, -0.2], [0.3, 0.4]])
ch = Chopi(num_bits=8, symmetric=False)
q = ch.quantize(x)  # Inference mode
dq = ch.dequantize(q)
"""

NUMPY_EXAMPLE = """\
import numpy as np
from pychop import Chopi
pychop.backend('numpy')
x = np.array([[0.1, -0.2], [0.3, 0.4]])
ch = NumpyChopi(num_bits=8, symmetric=False)
q = ch.quantize(x)
dq = ch.dequantize(q)
"""

COMPARISON_EXAMPLE = """\
import numpy as np, torch, pychop, jax
from numpy import linalg
X_np = np.random.randn(500, 500)
X_th = torch.Tensor(X_np)
X_jx = jax.numpy.asarray(X_np)
pychop.backend('numpy')
pyq_f = pychop.Chopi(num_bits=8)
X_q = pyq_f.quantize(X_np); X_inv = pyq_f.dequantize(X_q)
linalg.norm(X_inv - X_np)
pychop.backend('torch')
pyq_f = pychop.Chopi(num_bits=8)
X_q = pyq_f.quantize(X_th); X_inv = pyq_f.dequantize(X_q)
linalg.norm(X_inv - X_np)
pychop.backend('jax')
pyq_f = pychop.Chopi(num_bits=8)
X_q = pyq_f.quantize(X_jx); X_inv = pyq_f.dequantize(X_q)
linalg.norm(X_inv - X_jx)
"""


@pytest.fixture(autouse=True)
def restore_backend():
    before = pychop.get_backend()
    yield
    pychop.backend(before)


def run(snippet: str, preamble: str = "import pychop") -> dict:
    namespace = {}
    exec(compile(preamble + "\n" + snippet, "<docs example>", "exec"), namespace)
    return namespace


def check_round_trip(x, q, dq, quantizer):
    """uint8 codes on [0, 255]; the round trip within half a step of x."""
    x, q, dq = (np.asarray(a) for a in (x, q, dq))
    assert q.dtype == np.uint8 and q.shape == x.shape
    assert q.min() >= 0 and q.max() <= 255
    assert quantizer.qmin == 0 and quantizer.qmax == 255
    # the range [-0.2, 0.4] is covered: its ends map to the ends of the grid
    assert q.min() == 0 and q.max() == 255
    scale = float(np.asarray(quantizer.scale))
    assert scale == pytest.approx(0.6 / 255, rel=1e-6)
    assert np.abs(dq.astype(np.float64) - x).max() <= scale / 2 * (1 + 1e-5)


def test_jax_example():
    ns = run(JAX_EXAMPLE)
    assert type(ns["Chopi"]).__name__ == "JaxChopi"
    assert isinstance(ns["q"], type(ns["x"]))  # a jax.Array
    assert ns["dq"].dtype == jnp.float32
    check_round_trip(X, ns["q"], ns["dq"], ns["Chopi"])


def test_torch_example():
    ns = run(TORCH_EXAMPLE)
    assert isinstance(ns["ch"], torch.nn.Module)
    assert ns["q"].dtype == torch.uint8 and ns["dq"].dtype == torch.float32
    check_round_trip(X, ns["q"].numpy(), ns["dq"].numpy(), ns["ch"])


def test_numpy_example():
    ns = run(NUMPY_EXAMPLE, preamble="import pychop\nfrom pychop import NumpyChopi")
    assert ns["dq"].dtype == np.float64  # float64 input is computed in float64
    check_round_trip(X, ns["q"], ns["dq"], ns["ch"])


def test_three_backend_comparison_example():
    """Statement by statement, keeping each ``linalg.norm(...)`` value and the codes."""
    namespace, norms, codes = {}, [], []
    for node in ast.parse(COMPARISON_EXAMPLE).body:
        if isinstance(node, ast.Expr) and ast.unparse(node).startswith("linalg.norm"):
            norms.append(float(eval(compile(ast.Expression(node.value), "<docs>", "eval"),
                                    namespace)))
            codes.append((np.asarray(namespace["X_q"]), namespace["pyq_f"]))
        else:
            exec(compile(ast.Module([node], []), "<docs>", "exec"), namespace)
    x = namespace["X_np"]
    assert len(norms) == 3
    for norm, (q, quantizer) in zip(norms, codes, strict=True):
        assert q.dtype == np.uint8 and q.shape == (500, 500)
        scale = float(np.asarray(quantizer.scale))
        assert scale == pytest.approx((x.max() - x.min()) / 255, rel=1e-5)
        # uniform rounding error: rms scale / sqrt(12), so the norm is close to
        # sqrt(n) * scale / sqrt(12) and never above sqrt(n) * scale / 2
        n = x.size
        assert norm <= np.sqrt(n) * scale / 2
        assert norm == pytest.approx(np.sqrt(n) * scale / np.sqrt(12), rel=0.05)
    # torch and jax both quantize the float32 copy: identical codes
    np.testing.assert_array_equal(codes[1][0], codes[2][0])
    # numpy quantized the float64 data: codes differ at most where float32 rounding
    # moved a value across a rounding boundary
    assert np.mean(codes[0][0] != codes[1][0]) < 1e-3
