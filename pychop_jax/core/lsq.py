"""Learned step size quantization (LSQ, LSQ+), written once against an array namespace ``xp``.

The initial state and the gradients of ``ste``'s ``'lsq'`` rule, on ``numerics``' grid
(``qmin``, ``qmax``, the per-group view) with the notation of Esser et al. (2019,
"Learned Step Size Quantization", ICLR 2020) and Bhalgat et al. (2020, "LSQ+")::

    init:   scale = 2 * mean(|x|) / sqrt(Q_P)                 (Q_P = qmax)
            zero_point = clip(qmin - round(lo / scale), qmin, qmax)   (asymmetric; a float)
    grads:  t = x / scale,  [lo_q, hi_q] = [qmin - round(zp), qmax - round(zp)]
            d xhat / d x     = 1 inside (lo_q < t < hi_q), else 0
            d xhat / d scale = round(t) - t inside, lo_q / hi_q outside
            d xhat / d zp    = 0 inside, -scale outside
            scale and zero-point gradients summed per scale, times 1 / sqrt(N * Q_P)

A floating zero point is the learned one; the forward pass rounds it
(``numerics.integer_zero_point``).  These formulas feed training, not codes, so they are
not part of ``numerics``' bit-identity contract.
"""

from __future__ import annotations

# the grid's own helpers: LSQ works on numerics' views, bounds and flushes (one way:
# numerics does not import this module)
from .numerics import (
    _bounds,
    _const,
    _device,
    _finfo,
    _flush,
    _step_bounds,
    _views,
    compute_dtype,
    integer_zero_point,
    layout,
    observe_range,
    to_grid,
)
from .spec import QuantSpec

__all__ = ["lsq_init", "lsq_grads"]


def lsq_init(xp, x, spec: QuantSpec):
    """LSQ's initial step size and a float zero point, state-shaped.

    ``scale = 2 * mean(|x|) / sqrt(Q_P)`` over the reduced axes (Esser et al., 2019,
    section 2.1), with ``Q_P = qmax`` (``2^(b-1) - 1`` symmetric, ``2^b - 1``
    asymmetric).  Symmetric grids get ``zero_point = 0``; asymmetric ones the zero
    point that puts ``lo = min(min(x), 0)`` on the grid,
    ``clip(qmin - round(lo / scale), qmin, qmax)`` (0 for non-negative data: the
    paper's unsigned quantizer), as a float so that LSQ+ can learn it.  Non-finite
    values are left out; an all-zero input gets ``scale = 1``.
    """
    F = compute_dtype(xp, x.dtype)
    x = xp.astype(x, F)
    view, axes, _ = layout(spec, x.shape)
    state_shape = spec.scale_shape(x.shape)
    xv = xp.reshape(x, view)
    finite = xp.isfinite(xv)
    zero = _const(xp, 0.0, F, x)
    one = _const(xp, 1.0, F, x)
    total = xp.sum(xp.where(finite, xp.abs(xv), zero), axis=axes, keepdims=True)
    count = xp.sum(xp.astype(finite, F), axis=axes, keepdims=True)
    mean_abs = total / xp.maximum(count, one)  # same-shape division: exact everywhere
    qmin, qmax = (xp.astype(b, F) for b in _bounds(xp, spec, x))
    scale = (mean_abs + mean_abs) * (one / xp.sqrt(qmax))
    tiny = _const(xp, _finfo(xp, F).tiny, F, x)
    scale = xp.reshape(xp.where(scale == zero, one, xp.maximum(scale, tiny)), state_shape)
    if spec.symmetric:
        return scale, xp.zeros(state_shape, dtype=F, **_device(xp, x))
    lo, _ = observe_range(xp, x, spec)
    return scale, xp.clip(qmin - xp.round(to_grid(xp, lo, scale)), qmin, qmax)


def lsq_grads(xp, x, scale, zero_point, spec: QuantSpec, g):
    """Cotangents ``(dx, dscale, dzero_point)`` of the learned-step-size quantizer.

    With ``t = x / scale``, ``z = round(zero_point)`` and the step range
    ``[lo_q, hi_q] = [qmin - z, qmax - z]`` (``[-Q_N, Q_P]`` for a symmetric grid),
    Esser et al. (2019), eq. 3, and Bhalgat et al. (2020, LSQ+) give::

        d xhat / d x     = 1                        if lo_q < t < hi_q, else 0
        d xhat / d scale = round(t) - t             if lo_q < t < hi_q
                           lo_q                     if t <= lo_q
                           hi_q                     if t >= hi_q
        d xhat / d zp    = 0 inside, -scale outside (LSQ+'s offset beta = -scale * zp;
                           zero for symmetric grids, whose zero point is fixed)

    The scale and zero-point gradients are summed over the elements that share them
    and multiplied by the gradient scale ``1 / sqrt(N * Q_P)``, ``N`` = elements per
    scale (``x.size / scale.size``: all weights of a channel, or every activation of
    the batch), ``Q_P = qmax``.  ``g`` is the incoming cotangent (``x``'s shape);
    ``scale``/``zero_point`` are state-shaped, ``zero_point`` integer or float.
    NaN inputs get no gradient.  Returns ``dx`` in the compute dtype, ``dscale`` and
    ``dzero_point`` in the scale's dtype and the state's shape.
    """
    shape = x.shape
    F = scale.dtype
    xv, sv, zv = _views(xp, xp.astype(x, F), scale, zero_point, spec)
    gv = xp.reshape(xp.astype(g, F), xv.shape)
    _, axes, _ = layout(spec, shape)
    low, high = (xp.astype(b, F) for b in _step_bounds(xp, integer_zero_point(xp, zv, spec), spec))
    t = to_grid(xp, _flush(xp, xv), sv)
    zero = _const(xp, 0.0, F, t)
    inside = (t > low) & (t < high)
    below, above = t <= low, t >= high
    ds = xp.where(inside, xp.round(t) - t, xp.where(below, low, xp.where(above, high, zero)))
    n = 1
    for d in axes:
        n *= xv.shape[d]
    qmax = xp.astype(_bounds(xp, spec, scale)[1], F)
    gscale = _const(xp, 1.0, F, t) / xp.sqrt(_const(xp, float(n), F, t) * qmax)
    dscale = xp.sum(gv * ds, axis=axes, keepdims=True) * gscale
    if spec.symmetric:
        dzp = xp.zeros(zero_point.shape, dtype=F, **_device(xp, t))
    else:
        outside = xp.where(below | above, -sv, zero)
        dzp = xp.reshape(xp.sum(gv * outside, axis=axes, keepdims=True) * gscale, zero_point.shape)
    dx = xp.reshape(xp.where(inside, gv, zero), shape)
    return dx, xp.reshape(dscale, scale.shape), dzp
