"""How the JAX kernels are scheduled on XLA:CPU: speed only, never values.

Everything here was measured on XLA's CPU backend (``docs/performance.md`` has the
figures), so each choice applies on CPU only: ``lax.platform_dependent`` gives every
other platform the plain formulation until it is measured there.  Every function
returns the same bits on every path (the tests run each path and compare):

* ``minmax`` / ``max_abs``: which XLA reductions compute a range (min and max are
  exact, so any reduction tree gives the same values);
* ``inside_step``: whether the range is part of a larger traced program (a user's
  training step), which changes the best reduction;
* ``cond``: a ``lax.cond`` between the exact formulation and a cheaper one that is
  only valid when a predicate holds (the pre-scale of ``numerics`` rule 4);
* ``jit_by_size``: kernels that run in one XLA task below ``ONE_TASK_MAX`` elements.

``numerics`` calls the first three; the adapters' engine (``pychop_jax.interop``)
the last.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "SEPARATE_REDUCE_MAX",
    "SPLIT_REDUCE_MIN",
    "SPLIT_ROWS",
    "ONE_TASK_MAX",
    "inside_step",
    "minmax",
    "max_abs",
    "cond",
    "jit_by_size",
]

#: inside a traced step, whole-array reductions below this size are two reductions
SEPARATE_REDUCE_MAX = 1 << 17
#: whole-array reductions from this size on are done in two stages (rows first)
SPLIT_REDUCE_MIN = 1 << 20
#: rows a 1-D array is viewed as for a two-stage reduction
SPLIT_ROWS = 64
#: kernels of ``jit_by_size`` below this many elements run in one XLA task
ONE_TASK_MAX = 1 << 20

_in_step = contextvars.ContextVar("pychop_jax_in_step", default=False)


@contextlib.contextmanager
def inside_step(flag: bool = True):
    """While tracing under this context, ranges are reduced as parts of a larger
    program (a user's jitted training step) rather than as kernels of their own.

    The kernels that trace ``numerics`` take the flag as a static argument (so it is
    part of their compilation cache key) and enter this context around the trace.
    """
    token = _in_step.set(bool(flag))
    try:
        yield
    finally:
        _in_step.reset(token)


def _on_cpu(tuned, plain, *args):
    """``tuned(*args)`` on XLA:CPU, ``plain(*args)`` on every other platform."""
    return lax.platform_dependent(*args, cpu=tuned, default=plain)


# -- reductions -----------------------------------------------------------------------
def minmax(x, axes):
    """``(min, max)`` of ``x`` over ``axes`` with keepdims (``x`` has no NaN).

    On XLA:CPU:

    * only major axes reduced (per column): two single-output reductions;
    * inside a traced step (``inside_step``) and the whole array under
      ``SEPARATE_REDUCE_MAX`` elements: two reductions (XLA's YNNPACK kernels, faster
      inside a larger fusion; slower as a kernel of their own);
    * the whole array from ``SPLIT_REDUCE_MIN`` elements: row reductions, then one
      over the rows (``_split``);
    * otherwise one variadic reduction, which reads ``x`` once.
    """
    plain = lambda x: (jnp.min(x, axis=axes, keepdims=True),  # noqa: E731
                       jnp.max(x, axis=axes, keepdims=True))
    whole = len(axes) == x.ndim
    separate = _in_step.get() and whole and x.size < SEPARATE_REDUCE_MAX
    if x.ndim - 1 not in axes or separate:
        return plain(x)

    def tuned(x):
        keep = tuple(1 if d in axes else n for d, n in enumerate(x.shape))
        if _splits(x, axes):
            rows, first = _rows(x)
            row_lo, row_hi = _variadic_minmax(rows, first)
            lo, hi = jnp.min(row_lo), jnp.max(row_hi)
        else:
            lo, hi = _variadic_minmax(x, axes)
        return jnp.reshape(lo, keep), jnp.reshape(hi, keep)

    return _on_cpu(tuned, plain, x)


def max_abs(a, axes):
    """``max(a)`` over ``axes`` with keepdims, for ``a = |x|``: in two stages for
    large whole arrays on XLA:CPU, like ``minmax``."""
    plain = lambda a: jnp.max(a, axis=axes, keepdims=True)  # noqa: E731
    if not _splits(a, axes):
        return plain(a)

    def tuned(a):
        rows, first = _rows(a)
        return jnp.reshape(jnp.max(jnp.max(rows, axis=first)), (1,) * a.ndim)

    return _on_cpu(tuned, plain, a)


def _variadic_minmax(x, axes):
    """One XLA reduction computing ``(min, max)`` over ``axes`` (keepdims=False)."""
    big = jnp.asarray(np.inf, dtype=x.dtype)
    return lax.reduce(
        (x, x), (big, -big), lambda a, b: (lax.min(a[0], b[0]), lax.max(a[1], b[1])), axes
    )


def _splits(x, axes) -> bool:
    """Whether a reduction over ``axes`` is done in two stages: the whole array,
    ``SPLIT_REDUCE_MIN`` elements or more, and ``_rows`` applies."""
    return (len(axes) == x.ndim and x.size >= SPLIT_REDUCE_MIN
            and (x.ndim > 1 or x.size % SPLIT_ROWS == 0))


def _rows(x):
    """``x`` and the axes to reduce first, leaving one value per row: the leading
    axis for 2-D and higher inputs, ``SPLIT_ROWS`` rows for a 1-D one.

    No slicing: inside a larger program a sliced-and-reshaped view of a fused
    producer made XLA:CPU's reduction several times slower.
    """
    if x.ndim == 1:
        x = jnp.reshape(x, (SPLIT_ROWS, -1))
    return x, tuple(range(1, x.ndim))


# -- branches -------------------------------------------------------------------------
def cond(pred, exact, cheap):
    """``exact()``, or on XLA:CPU ``lax.cond(pred, exact, cheap)``.

    ``cheap()`` must give the bits of ``exact()`` whenever ``pred`` is false; the
    branch saves its extra work in the common case.
    """
    return _on_cpu(lambda: lax.cond(pred, exact, cheap), exact)


# -- kernels --------------------------------------------------------------------------
#: XLA:CPU splits a loop over more than 256 KB of output into tasks for its own thread
#: pool; ``jit_by_size``'s small kernels are compiled without that split
_ONE_TASK = {"xla_disable_hlo_passes": "cpu-parallel-task-assigner"}


def jit_by_size(fun, static_argnames):
    """``fun`` jitted twice: ``kernel_for(arrays)`` picks the one-task compilation
    when every array has fewer than ``ONE_TASK_MAX`` elements, XLA's default (a
    parallel task split) otherwise.

    For kernels that run inside another framework's program (a Torch training step),
    whose thread pool still spins on the other cores: there XLA's second task waits
    for a core, and for small arrays the split costs more than it saves.  The
    compiler option names an XLA:CPU pass, so these kernels are for CPU arrays.
    """
    default = jax.jit(fun, static_argnames=static_argnames)
    one_task = jax.jit(fun, static_argnames=static_argnames, compiler_options=_ONE_TASK)

    def kernel_for(arrays):
        small = max(math.prod(a.shape) for a in arrays) < ONE_TASK_MAX
        return one_task if small else default

    return kernel_for
