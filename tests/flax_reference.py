"""Independent float64 NumPy references for the Flax layer tests (shared by linen and nnx)."""

import numpy as np


def fake_quant_per_channel_symmetric(w, bits):
    """Kernel fake-quantized per output channel (last axis), symmetric grid."""
    w = np.asarray(w, np.float64)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True)
    scale = np.where(amax == 0, 1.0, amax / qmax)
    return np.clip(np.round(w / scale), -qmax - 1, qmax) * scale


def fake_quant_affine(x, lo, hi, bits):
    """Per-tensor affine fake quantization of ``x`` with the range ``[lo, hi]``."""
    x = np.asarray(x, np.float64)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    return (np.clip(np.round(x / scale) + zp, 0, qmax) - zp) * scale


def lsq_scale(x, bits, symmetric, axis=None):
    """Esser et al.'s init 2 * mean|x| / sqrt(Q_P), per tensor or per ``axis``."""
    qp = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    x = np.abs(np.asarray(x, np.float64))
    red = None if axis is None else tuple(d for d in range(x.ndim) if d != axis % x.ndim)
    return 2 * x.mean(axis=red) / np.sqrt(qp)
