"""GPTQ (Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023, arXiv:2210.17323;
reference implementation: github.com/IST-DASLab/gptq, ``gptq.py``).

For one layer with kernel matrix ``W (K, N)`` (``KernelLayout``: one row per input
channel, i.e. the paper's columns) and calibration input rows ``X (M, K)``::

    H = 2 X^T X / M                              (the Hessian of ||X W - X Q||^2)
    dead = diag(H) == 0:  H[d, d] = 1, W[d] = 0  (inputs that are always 0)
    act_order: rows by descending diag(H) (stable), undone at the end
    H += damp * mean(diag(H)) * I
    U = cholesky(H^-1)^T                         (upper triangular, H^-1 = U^T U)
    for each row k (in order):
        q_k   = Q(w_k)                           (round-to-nearest on the grid)
        e_k   = (w_k - q_k) / U[k, k]
        w_j  -= U[k, j] e_k          for j > k   (error feedback)
    loss = sum_k ||w_k - q_k||^2 / (2 U[k, k]^2)

The updates are applied lazily in blocks of ``block_size`` rows (the paper's
section 3, "lazy batch updates"): inside a block row by row, then one
``(K, B) x (B, N)`` product for the rows after it.  Both loops are ``lax.fori_loop``
s inside one jitted function.  This is an exact rearrangement of the sequential
loop above (same arithmetic up to float summation order).

Grids (``KernelLayout.plan``):

* scales constant along the input channels (per tensor / per output channel):
  computed once, from the original ``W``, before the loop (as the reference's
  ``find_params(W)``);
* groups of ``g`` input channels (``QuantSpec(axis=<last in-axis>, group_size=g)``):
  a group's scales are computed when its first row is reached, from the rows of the
  group as they are then (error feedback of every earlier row included).  The block
  size is adjusted so that groups never straddle a block (``B`` a multiple of ``g``,
  or ``g`` a multiple of ``B``).  The reference computes them from ``W`` with only
  the updates of earlier *blocks*, which differs from the sequential algorithm when
  ``g < B``; here lazy batching changes nothing.
* ``act_order`` with groups: groups stay the consecutive input channels of the
  original order (the served grid is contiguous), and their scales are computed up
  front from ``W`` (after zeroing dead inputs), as the reference's
  ``static_groups=True``.  (The reference without ``static_groups`` forms groups in
  the permuted order, which needs a per-channel group index when serving.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg
from jax import lax

from ...core import numerics
from ...core.spec import QuantSpec
from ...core.state import QuantState
from ...transform.methods import MethodResult, QuantMethod
from .layout import KernelLayout

__all__ = ["GPTQ", "gptq", "block_size_for"]


@dataclasses.dataclass(frozen=True)
class GPTQ(QuantMethod):
    """GPTQ settings for ``QuantRule(method=...)`` (see the module docstring).

    Args:
      damp: dampening, a fraction of ``mean(diag(H))`` added to ``H``'s diagonal
        (the reference's ``percdamp``).
      act_order: quantize input channels by descending ``diag(H)``.
      block_size: rows per lazy batch update (128 in the paper).
    """

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128

    name = "GPTQ"
    statistics = frozenset({"hessian"})

    def __post_init__(self):
        if not (isinstance(self.damp, (int, float)) and self.damp >= 0):
            raise ValueError(f"GPTQ.damp must be a number >= 0; got {self.damp!r}.")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"GPTQ.block_size must be an int >= 1; got {self.block_size!r}.")

    def apply(self, kernel, layout: KernelLayout, spec: QuantSpec, stats, path: str = ""):
        """``(MethodResult, details)`` for one layer from its input ``stats``."""
        group = layout.plan(spec)
        w = layout.matrix(kernel.astype(jnp.float32))
        hessian = 2.0 * stats.hessian / jnp.maximum(stats.count, 1.0)
        if group is None:
            state = QuantState(*numerics.calibrate(jnp, kernel.astype(jnp.float32), spec), spec)
            values, _, loss = gptq(w, hessian, layout.matrix_spec(spec, None), damp=self.damp,
                                   act_order=self.act_order, block_size=self.block_size,
                                   qparams=layout.column_qparams(state), path=path)
        else:
            values, m_state, loss = gptq(w, hessian, layout.matrix_spec(spec, group),
                                         damp=self.damp, act_order=self.act_order,
                                         block_size=self.block_size, path=path)
            state = layout.state_from_matrix(m_state.scale, m_state.zero_point, spec)
        return MethodResult(layout.kernel(values), state), {"gptq_loss": float(loss)}


def block_size_for(block_size: int, group: int | None, k: int) -> int:
    """The block actually used: ``block_size`` (at most ``K``), adjusted so that groups
    of ``group`` rows never straddle two blocks."""
    if group is None:
        return min(block_size, k)
    if group <= block_size:
        return group * min(block_size // group, k // group)
    return block_size if group % block_size == 0 else group


def gptq(w, hessian, spec: QuantSpec, *, damp: float = 0.01, act_order: bool = False,
         block_size: int = 128, qparams=None, path: str = ""):
    """GPTQ of a matrix ``w (K, N)`` given ``H (K, K)`` (see the module docstring).

    Args:
      w: the kernel matrix, one row per input channel.
      hessian: ``H`` (any positive multiple works the same: damping is relative).
      spec: ``w``'s grid: per column (``axis=1``) or per tensor (``axis=None``), or
        groups of rows (``axis=0, group_size=g``).
      qparams: per-column ``(scale, zero_point)``, ``(1, N)`` each, for a per-column
        / per-tensor grid (default: calibrated on ``w``).

    Returns:
      ``(values, state, loss)``: the quantized matrix as floats (every row on the
      grid), its ``QuantState`` on ``w``'s shape, and the sum of the paper's losses.

    Raises:
      ValueError: ``H`` is not positive definite after damping (raise ``damp``).
    """
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"gptq: H has shape {hessian.shape}; expected ({k}, {k}).")
    axis = spec.resolve_axis(2)
    group = spec.group_size if axis == 0 else None
    if (axis == 0 and group is None) or (axis == 1 and spec.group_size is not None):
        raise ValueError(f"gptq: {spec} on a ({k}, {n}) matrix; use axis=1 (per column), "
                         "axis=None, or axis=0 with group_size.")
    if group is not None and k % group:
        raise ValueError(f"gptq: K={k} is not a multiple of group_size={group}.")
    col_spec = QuantSpec(bits=spec.bits, symmetric=spec.symmetric,
                         narrow_range=spec.narrow_range, axis=1,
                         # float16 / bfloat16 scales: the columns use the rounded grid
                         scale_dtype=spec.scale_dtype if spec.rounded_scale_format else None)
    if group is None:
        if qparams is None:
            s, z = numerics.calibrate(jnp, w, spec)
            qparams = (jnp.broadcast_to(s, (1, n)), jnp.broadcast_to(z, (1, n)))
        qparams = tuple(jnp.asarray(a).reshape(1, n) for a in qparams)
    else:
        qparams = (jnp.ones((1, n), w.dtype), jnp.zeros((1, n), jnp.int32))
    block = block_size_for(block_size, group, k)
    values, scale, zero_point, loss, ok = _gptq(
        w, hessian.astype(w.dtype), qparams[0].astype(w.dtype), qparams[1],
        jnp.asarray(damp, w.dtype), col_spec=col_spec, group=group, block=block,
        act_order=bool(act_order))
    if not bool(ok):
        raise ValueError(f"gptq{' ' + repr(path) if path else ''}: the damped Hessian is not "
                         f"positive definite (Cholesky failed); raise damp (now {damp}) or "
                         "calibrate on more data.")
    if group is None:
        cols = spec.scale_shape((k, n))[1]  # n per column, 1 per tensor
        state = QuantState(qparams[0][:, :cols].astype(scale.dtype), qparams[1][:, :cols], spec)
    else:
        state = QuantState(scale, zero_point, spec)
    return values, state, loss


@functools.partial(jax.jit, static_argnames=("col_spec", "group", "block", "act_order"))
def _gptq(w, h, col_scale, col_zp, damp, *, col_spec, group, block, act_order):
    k, n = w.shape
    F = w.dtype
    eye = jnp.eye(k, dtype=F)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(F))
    w = jnp.where(dead[:, None], jnp.zeros((), F), w)
    if group is not None and act_order:  # static groups, original order
        gview = w.reshape(k // group, group, n)
        static = jax.vmap(lambda r: numerics.calibrate(jnp, r, col_spec))(gview)
        static_s, static_z = static[0][:, 0], static[1][:, 0]
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
    w = w[perm]
    h = h[perm][:, perm]
    h = h + damp * jnp.mean(jnp.diag(h)) * eye
    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), eye)
    u = jnp.linalg.cholesky(hinv).T
    ok = jnp.all(jnp.isfinite(u))
    kp = -(-k // block) * block
    pad = kp - k
    w = jnp.pad(w, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(kp) >= k).astype(F)
    perm_p = jnp.pad(perm, (0, pad))
    n_groups = 1 if group is None else kp // group
    gs = jnp.ones((n_groups, n), F)
    gz = jnp.zeros((n_groups, n), jnp.int32)

    def group_start(rows, gs, gz, index):
        s, z = numerics.calibrate(jnp, rows, col_spec)
        return gs.at[index].set(s[0]), gz.at[index].set(z[0])

    def block_body(b, carry):
        w, gs, gz, loss = carry
        i1 = b * block
        if group is not None and not act_order and group > block:
            gs, gz = lax.cond(
                i1 % group == 0,
                lambda gs, gz: group_start(lax.dynamic_slice(w, (i1, 0), (group, n)), gs, gz,
                                           i1 // group),
                lambda gs, gz: (gs, gz), gs, gz)
        w1 = lax.dynamic_slice(w, (i1, 0), (block, n))
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))

        def column(i, c, s, z):
            w1, e1, loss = c
            wk = w1[i]
            q = numerics.fake_quant(jnp, wk[None], s, z, col_spec)[0]
            d = u1[i, i]
            err = (wk - q) / d
            w1 = w1 - u1[i][:, None] * err[None, :]
            w1 = w1.at[i].set(q)
            e1 = e1.at[i].set(err)
            return w1, e1, loss + jnp.sum((wk - q) ** 2) / (2 * d * d)

        e1 = jnp.zeros((block, n), F)
        if group is not None and not act_order and group <= block:
            # groups inside the block: scales at the top of each group, from its rows now
            def group_body(j, c):
                w1, e1, gs, gz, loss = c
                first = j * group
                s, z = numerics.calibrate(jnp, lax.dynamic_slice(w1, (first, 0), (group, n)),
                                          col_spec)
                gs = gs.at[(i1 + first) // group].set(s[0])
                gz = gz.at[(i1 + first) // group].set(z[0])
                w1, e1, loss = lax.fori_loop(
                    first, first + group, lambda i, c: column(i, c, s, z), (w1, e1, loss))
                return w1, e1, gs, gz, loss

            w1, e1, gs, gz, loss = lax.fori_loop(0, block // group, group_body,
                                                 (w1, e1, gs, gz, loss))
        else:
            def scaled_column(i, c):
                if group is None:
                    s, z = col_scale, col_zp
                elif act_order:
                    gi = jnp.minimum(perm_p[i1 + i], k - 1) // group
                    s, z = static_s[gi][None], static_z[gi][None]
                else:  # group > block: set at the block's start
                    s, z = gs[(i1 + i) // group][None], gz[(i1 + i) // group][None]
                return column(i, c, s, z)

            w1, e1, loss = lax.fori_loop(0, block, scaled_column, (w1, e1, loss))
        w = lax.dynamic_update_slice(w, w1, (i1, 0))
        u_rows = lax.dynamic_slice(u, (i1, 0), (block, kp))
        later = jnp.arange(kp) >= i1 + block
        u_rows = jnp.where(later[None, :], u_rows, jnp.zeros((), F))
        w = w - lax.dot_general(u_rows, e1, (((0,), (0,)), ((), ())),
                                precision=lax.Precision.HIGHEST)
        return w, gs, gz, loss

    w, gs, gz, loss = lax.fori_loop(0, kp // block, block_body,
                                    (w, gs, gz, jnp.zeros((), F)))
    values = jnp.zeros((k, n), F).at[perm].set(w[:k])
    if group is not None and act_order:
        gs, gz = static_s, static_z
    elif group is not None:
        gs, gz = gs[: k // group], gz[: k // group]
    return values, gs, gz, loss, ok
