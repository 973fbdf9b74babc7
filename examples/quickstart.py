"""Quickstart: calibrate -> quantize -> dequantize, jitted, with the error per bit width.

    python examples/quickstart.py

Prints, for every bit width and both grids, the round-trip error of a jitted
calibrate/quantize/dequantize pipeline on Gaussian data, next to the bound scale/2
that the numerics guarantee.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pychop_jax as pj


def main():
    x = jax.random.normal(jax.random.key(0), (256, 512), jnp.float32)

    @functools.partial(jax.jit, static_argnums=1)  # the spec is static
    def round_trip(x, spec):
        state = pj.calibrate(x, spec)
        q = pj.quantize(x, state)
        return q, pj.dequantize(q, state), state

    print(f"{'bits':>4} {'grid':<10} {'codes':<7} {'max |x - xhat|':>15} {'scale/2':>10} "
          f"{'rms error':>10} {'SNR dB':>7}")
    for bits in (2, 3, 4, 6, 8, 12, 16):
        for symmetric in (False, True):
            spec = pj.QuantSpec(bits=bits, symmetric=symmetric)
            q, xhat, state = round_trip(x, spec)
            err = jnp.abs(x - xhat)
            rms = float(jnp.sqrt(jnp.mean(err**2)))
            snr = 10 * np.log10(float(jnp.mean(x**2)) / rms**2)
            half = float(state.scale.max()) / 2
            # the contract: |x - xhat| <= scale/2 (+ float32 rounding of x/scale and xhat)
            assert float(err.max()) <= half + 4 * 2**-23 * float(jnp.abs(x).max())
            print(f"{bits:>4} {'symmetric' if symmetric else 'affine':<10} {q.dtype.name:<7} "
                  f"{float(err.max()):>15.3e} {half:>10.3e} {rms:>10.3e} {snr:>7.1f}")

    # per-channel: one scale per column, shaped (1, 512)
    state = pj.calibrate(x, pj.QuantSpec(bits=4, symmetric=True, axis=1))
    print("\nper-channel 4-bit scale shape:", state.scale.shape,
          "| rms error:", float(jnp.sqrt(jnp.mean((x - pj.fake_quant(x, state)) ** 2))))


if __name__ == "__main__":
    main()
