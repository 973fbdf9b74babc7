"""A weight as the 2-D matrix the algorithms work on.

A weight's matmul contracts some of its axes (``in_axes``) with some axes of the
other operand, its input (``x_axes``), and keeps the others (``out_axes``).  The
algorithms see

* ``W = matrix(kernel)``: shape ``(K, N)``, ``K = prod(in dims)`` rows (one per input
  channel, in the order of ``in_axes``, row-major), ``N = prod(out dims)``;
* ``X = rows(x)``: shape ``(M, K)``, the input's contracted axes moved last in the
  same order and flattened, every other axis flattened into ``M``;

so that the matmul computes ``X @ W`` (up to the output's layout).  ``kernel(W)``
undoes ``matrix``.  A per-input-channel vector (AWQ / SmoothQuant scales) goes back to
the weight's layout with ``weight_vector`` (its rank, size 1 along ``out_axes``) or to
the input's with ``input_vector`` (broadcasting from the input's trailing axes).

``calibrate_model`` reads a weight's layout off its matmul (``calibration.site_layout``:
the dimension numbers, seen through the weight's views): a Dense kernel ``(K, N)``,
GPT-2's transposed ``(N, K)``, an einsum kernel ``(D, H, Dh)``, one layer of a scanned
stack.

Grids (``plan``): the algorithms handle kernels whose scales are constant along the
contracted axes (per tensor, per output channel: ``"fixed"``) or grouped along the
*last* in-axis (``"grouped"``: groups of ``g`` consecutive rows of ``W``, one scale
per group and output column, which is how ``QuantSpec(axis=<in axis>,
group_size=g)`` lays them out).  Other grids (per input channel, groups along an
output axis) raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from ...core.spec import QuantSpec
from ...core.state import QuantState

__all__ = ["KernelLayout"]


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a kernel of ``shape`` and its layer's input map to ``W (K, N)`` and ``X (M, K)``.

    Attributes:
      shape: the kernel's shape.
      in_axes: kernel axes contracted with the input, in flattening order.
      out_axes: the other kernel axes, in flattening order.
      x_axes: the input axes contracted with ``in_axes`` (same order), negative.
    """

    shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    x_axes: tuple[int, ...]

    def __post_init__(self):
        if sorted(self.in_axes + self.out_axes) != list(range(len(self.shape))):
            raise ValueError(f"KernelLayout: in_axes {self.in_axes} and out_axes "
                             f"{self.out_axes} must split the kernel's {len(self.shape)} axes.")
        if len(self.x_axes) != len(self.in_axes) or any(a >= 0 for a in self.x_axes):
            raise ValueError(f"KernelLayout: x_axes {self.x_axes} must be negative, one per "
                             f"in-axis {self.in_axes}.")

    @classmethod
    def dense(cls, k: int, n: int) -> KernelLayout:
        """A ``(K, N)`` kernel applied to the input's last axis."""
        return cls((int(k), int(n)), (0,), (1,), (-1,))

    @property
    def in_dims(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.in_axes)

    @property
    def out_dims(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.out_axes)

    @property
    def k(self) -> int:
        return math.prod(self.in_dims)

    @property
    def n(self) -> int:
        return math.prod(self.out_dims)

    # -- kernel <-> matrix ---------------------------------------------------------------
    def matrix(self, kernel):
        """``(K, N)`` view of ``kernel``."""
        return jnp.reshape(jnp.transpose(kernel, self.in_axes + self.out_axes), (self.k, self.n))

    def kernel(self, matrix):
        """Inverse of ``matrix``."""
        perm = self.in_axes + self.out_axes
        t = jnp.reshape(matrix, self.in_dims + self.out_dims)
        return jnp.transpose(t, np.argsort(perm))

    # -- input ----------------------------------------------------------------------------
    def rows(self, x):
        """``(M, K)``: the input's contracted axes last (kernel order), flattened."""
        nd = x.ndim
        axes = tuple(a % nd for a in self.x_axes)
        if tuple(x.shape[a] for a in axes) != self.in_dims:
            raise ValueError(f"KernelLayout: the input's axes {self.x_axes} have sizes "
                             f"{tuple(x.shape[a] for a in axes)}, the kernel's in-axes "
                             f"{self.in_dims}.")
        rest = tuple(d for d in range(nd) if d not in axes)
        return jnp.reshape(jnp.transpose(x, rest + axes), (-1, self.k))

    def input_vector(self, v):
        """A per-input-channel vector ``(K,)`` shaped to multiply the input: the
        contracted axes in the input's order, ``1`` on the others, trailing-aligned."""
        depth = max(-a for a in self.x_axes)
        t = jnp.reshape(v, self.in_dims)
        order = np.argsort(self.x_axes)  # in-axis positions by increasing input axis
        t = jnp.transpose(t, order)
        shape = [1] * depth
        for a, d in zip(self.x_axes, self.in_dims, strict=True):
            shape[depth + a] = d
        return jnp.reshape(t, shape)

    def weight_vector(self, v):
        """A per-input-channel vector ``(K,)`` in the kernel's own layout: its rank, the
        contracted axes full, size 1 along the output axes (``MethodResult.input_scale``)."""
        t = jnp.reshape(v, self.in_dims + (1,) * len(self.out_axes))
        return jnp.transpose(t, tuple(int(i) for i in np.argsort(self.in_axes + self.out_axes)))

    # -- grids ------------------------------------------------------------------------------
    def plan(self, spec: QuantSpec) -> int | None:
        """``None`` for a grid constant along the contracted axes; ``g`` for groups of
        ``g`` rows of ``W``.

        Raises:
          ValueError: any other grid (see the module docstring).
        """
        scale_shape = spec.scale_shape(self.shape)
        axis = None if spec.group_size is None else spec.resolve_axis(len(self.shape))
        if axis is not None and axis == self.in_axes[-1]:
            # one scale per (other in-axes, group, outputs): groups of g consecutive rows
            return spec.group_size
        if axis not in self.in_axes and all(scale_shape[a] == 1 for a in self.in_axes):
            return None
        raise ValueError(
            f"{spec} on a kernel of shape {self.shape} (contracted axes {self.in_axes}): the "
            "algorithms take scales per tensor, per output channel or per group along the "
            f"last contracted axis (axis={self.in_axes[-1]}, group_size=g); choose one of "
            "those weight specs.")

    def matrix_spec(self, spec: QuantSpec, group: int | None) -> QuantSpec:
        """The spec of ``W``'s grid: per output column (``axis=1``) for a fixed grid,
        groups of ``group`` rows (``axis=0``) otherwise."""
        fields = dict(bits=spec.bits, symmetric=spec.symmetric, narrow_range=spec.narrow_range,
                      # float16 / bfloat16 scales: the algorithms work on the rounded grid
                      scale_dtype=spec.scale_dtype if spec.rounded_scale_format else None)
        if group is None:
            return QuantSpec(**fields, axis=1)
        return QuantSpec(**fields, axis=0, group_size=group)

    def state_from_matrix(self, scale, zero_point, spec: QuantSpec) -> QuantState:
        """The kernel's ``QuantState`` from the qparams of ``W``'s grid
        (``matrix_spec(spec, plan(spec))``): ``(K / g, N)`` for groups of ``g`` rows,
        ``(1, N)`` for a grid without groups (``state_from_columns``)."""
        if self.plan(spec) is None:
            return self.state_from_columns(scale, zero_point, spec)
        g = spec.group_size
        dims = self.in_dims[:-1] + (self.in_dims[-1] // g,) + self.out_dims
        inverse = np.argsort(self.in_axes + self.out_axes)
        back = lambda a: jnp.transpose(jnp.reshape(a, dims), inverse)  # noqa: E731
        return QuantState(back(scale), back(zero_point), spec)

    def state_from_columns(self, scale, zero_point, spec: QuantSpec) -> QuantState:
        """The kernel's ``QuantState`` (``spec``'s scale shape, size 1 on the contracted
        axes) from per-output-column ``(1, N)`` qparams: ``column_qparams``' inverse."""
        order = tuple(int(i) for i in np.argsort(self.out_axes))
        ones = [1 if a in self.in_axes else self.shape[a] for a in range(len(self.shape))]

        def back(a):
            t = jnp.transpose(jnp.reshape(a, self.out_dims), order)
            return jnp.reshape(jnp.reshape(t, ones), spec.scale_shape(self.shape))

        return QuantState(back(scale), back(zero_point), spec)

    def column_qparams(self, state: QuantState):
        """``(scale, zero_point)`` per output column, ``(1, N)`` each, of a state whose
        scales are constant along the contracted axes."""
        full = lambda a: self.matrix(jnp.broadcast_to(a, self.shape))[:1]  # noqa: E731
        return full(state.scale), full(state.zero_point)
