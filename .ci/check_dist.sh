#!/usr/bin/env bash
# The distribution as users get it: build the sdist and the wheel, install the wheel
# (not editable) into a fresh virtual environment, and run a smoke test there from a
# directory outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls "$work/dist"/*.tar.gz "$work/dist"/*.whl
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c "$root/constraints.txt" "$work/dist"/*.whl
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.resources, sys

import jax, jax.numpy as jnp, numpy as np
import pychop, pychop_jax as pj

assert "site-packages" in pj.__file__, pj.__file__  # the installed wheel, not the checkout
for package in ("pychop_jax", "pychop"):
    assert importlib.resources.files(package).joinpath("py.typed").is_file(), package
assert "torch" not in sys.modules and "flax.nnx" not in sys.modules
x = jax.random.normal(jax.random.key(0), (256, 512))
state = pj.calibrate(x, pj.QuantSpec(bits=8))
q = pj.quantize(x, state)
assert q.dtype == jnp.uint8
assert float(jnp.max(jnp.abs(pj.dequantize(q, state) - x))) <= float(state.scale.max()) / 2 + 1e-6
jax.jit(pj.fake_quant)(x, state)
pychop.backend("numpy")
ch = pychop.Chopi(num_bits=8)
np.testing.assert_array_equal(ch.quantize(np.asarray(x)), np.asarray(q))
from pychop_jax.core import xla_cpu  # the optional decoding custom call (setup.py)
codes = np.asarray(jax.random.randint(jax.random.key(1), (512, 256), -127, 128), np.int8)
y = jax.jit(xla_cpu.weight_only_matmul)(x[:1], codes, np.ones((1, 256), np.float32))
x1 = np.asarray(x[:1], np.float64)  # float rounding relative to sum |x| |codes|
np.testing.assert_allclose(np.asarray(y), x1 @ codes, rtol=1e-5,
                           atol=1e-5 * float(np.max(np.abs(x1) @ np.abs(codes))))
print("wheel smoke test passed:", pj.__version__, "; decoding custom call",
      "built" if xla_cpu.decode_kernels_available() else "NOT built (pure XLA)")
PY
