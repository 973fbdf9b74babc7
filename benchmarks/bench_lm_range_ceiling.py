"""How much of round-to-nearest's loss can a per-group range choice recover on the example LM?

    python benchmarks/bench_lm_range_ceiling.py [--grids int4g128 int3g128 int2g32]
                                                [--factors 201] [--gptq] [--quick]

The fp32 model of ``examples/transformer_lm.py`` is trained exactly as the example trains
it (its ``parse_args`` defaults, ``setup``), then quantized as its ``--rows algorithms``
suite does (``algorithm_rules`` / ``algorithm_row``: weight-only asymmetric integer
grids, groups along each kernel's input axis, on every Dense / attention kernel and the
head; embeddings float; float32 scales; ``--calib-batches`` (16) training batches for
``pj.calibrate_model``).  Per grid, held-out bits/byte of:

* RTN: round to nearest on each group's min / max range;
* the **weight-l2 ceiling** (calibration-free): ``RangeSearch("l2")``, each group's
  (scale, integer zero point) of least weight error ``||w - Q(w)||^2`` found by
  exhaustive search (to the resolution of its scale factors).  No method that picks a
  group's range from its weights by that error does better on it; HQQ's
  ``init="l2"`` start is a coarser version of it;
* the **output-error ceiling** (data-aware): ``RangeSearch("output")``, each group's
  (scale, integer zero point) of least ``e^T H_gg e``, ``e = w - Q(w)`` the group's
  error and ``H_gg`` its block of the layer's ``H = X^T X / R`` (the calibration rows
  ``X`` reaching the layer, earlier layers already quantized): the squared error of the
  group's partial sum of the layer's output, averaged over the rows.  On that
  objective it is at least as good as any per-group range choice from the same data
  (to the resolution of its scale factors) -- AWQ's clipping family (shrinking /
  widening the two ends of a range) included, though not AWQ's per-input-channel
  scaling, which changes the weights being quantized.  It is a ceiling on a proxy: the
  per-group errors' cross terms and the later layers are ignored, so another range
  choice can still come out (slightly) lower on bits/byte;
* ``pj.AWQ()`` and ``pj.HQQ()`` with their defaults (and ``pj.GPTQ(act_order=True)``
  with ``--gptq``: error feedback, which changes the codes, not only the ranges).

Columns: bits/byte; "gap recovered" = ``(bpb_RTN - bpb) / (bpb_RTN - bpb_fp32)``; the
layer error the method minimizes (its own objective, summed over the layers) as a
ratio to round-to-nearest's on the same objective: weight l2 and ``e^T H e`` for the
two searches, the layer's whole output MSE for AWQ (its ``error / rtn_error``), the
weight ``l_0.7`` error for HQQ (``lp / lp_rtn``); GPTQ reports no RTN reference.  Then
``calibrate_model``'s wall time (compilation included; it varies with the machine's
load and is no result of this benchmark).

Issue 13 asked AWQ and HQQ for >= 50 % of the gap: the ceilings say how much any
range choice can give on this model.  ``--quick``: the example's tiny model (a smoke
test of the script, about two minutes, mostly compilation; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import transformer_lm as ex  # noqa: E402
from _timing import cpu_info  # noqa: E402

import pychop_jax as pj  # noqa: E402
from pychop_jax.core import numerics  # noqa: E402
from pychop_jax.core.spec import QuantSpec  # noqa: E402
from pychop_jax.serving.algorithms.layout import KernelLayout  # noqa: E402
from pychop_jax.transform.methods import MethodResult, QuantMethod  # noqa: E402

OBJECTIVES = ("l2", "output")
DEFAULT_GRIDS = ("int4g128", "int3g128", "int2g32")


@dataclasses.dataclass(frozen=True)
class RangeSearch(QuantMethod):
    """Exhaustive search of each group's ``(scale, integer zero point)``.

    The layer's kernel as ``W (K, N)`` (``KernelLayout.matrix``), cut into the rule's
    groups: ``g`` consecutive rows of one column (``g = K`` for a per-output-channel
    grid).  For a group ``w`` (``g`` values) with round-to-nearest's qparams
    ``(s_0, z_0)`` (its min / max range), the candidates are::

        s = f s_0,   f in linspace(lo, hi, factors)
        z in {qmin, ..., qmax}       (every integer zero point; z = 0 on a symmetric grid)

    and ``Q(w) = (clip(round(w / s) + z, qmin, qmax) - z) s`` (``numerics.grid_steps``,
    the library's rounding).  The group keeps the candidate of least objective,
    round-to-nearest's ``(s_0, z_0)`` to begin with (a candidate replaces the best only
    if strictly lower, so the result is never worse than round to nearest on it)::

        "l2":     ||e||^2             e = w - Q(w)     (weights only)
        "output": e^T H_gg e          H = X^T X / R    (the calibration rows X, R of them)

    ``H_gg`` is the ``g x g`` diagonal block of ``H`` on the group's rows: ``e^T H_gg e``
    is the mean over the rows of the squared error of the group's partial sum
    ``X[:, g] w``.  The objectives are summed per layer in the details
    (``objective_rtn``, ``objective``).  Integer grids with float32 scales only.
    """

    objective: str = "l2"
    factors: int = 201
    lo: float = 0.25
    hi: float = 1.25

    name = "RangeSearch"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"RangeSearch.objective must be one of {OBJECTIVES}; "
                             f"got {self.objective!r}.")
        if not (isinstance(self.factors, int) and self.factors >= 1):
            raise ValueError(f"RangeSearch.factors must be an int >= 1; got {self.factors!r}.")
        if not 0 < self.lo <= self.hi:
            raise ValueError(f"RangeSearch needs 0 < lo <= hi; got lo={self.lo}, hi={self.hi}.")

    @property
    def statistics(self) -> frozenset:  # what calibrate_model collects for the layer
        return frozenset({"hessian"}) if self.objective == "output" else frozenset()

    def check_rule(self, rule) -> None:
        super().check_rule(rule)
        spec = rule.weight_template()
        if spec.is_float or spec.block_scaled or spec.scale_dtype is not None:
            raise ValueError(
                f"QuantRule({rule.module_path!r}, method=RangeSearch): the search is over "
                f"integer grids with float32 scales; got {spec}. Use an integer QuantSpec "
                "with scale_dtype=None.")

    def grid(self) -> tuple[float, ...]:
        """The scale factors ``f``, ``linspace(lo, hi, factors)``."""
        return tuple(float(f) for f in np.linspace(self.lo, self.hi, self.factors))

    def apply(self, kernel, layout: KernelLayout, spec: QuantSpec, stats=None, path: str = ""):
        """``(MethodResult, {"objective_rtn", "objective"})`` for one layer."""
        kernel = kernel.astype(jnp.float32)
        group = layout.plan(spec)
        g = layout.k if group is None else group
        hessian = None
        if self.objective == "output":
            hessian = stats.hessian / jnp.maximum(stats.count, 1.0)
        row_spec = QuantSpec(bits=spec.bits, symmetric=spec.symmetric,
                             narrow_range=spec.narrow_range, axis=0)
        scale, zp, before, after = search(layout.matrix(kernel), hessian, row_spec, g,
                                          self.grid())
        state = layout.state_from_matrix(scale, zp, spec)
        values = numerics.fake_quant(jnp, kernel, state.scale, state.zero_point, spec)
        return MethodResult(values, state), {"objective_rtn": float(before),
                                             "objective": float(after)}


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def search(w, hessian, row_spec: QuantSpec, g: int, factors: tuple[float, ...]):
    """``RangeSearch``'s search on ``W (K, N)`` in groups of ``g`` rows.

    ``hessian``: ``H (K, K)`` for the output objective, ``None`` for weight l2.
    Returns ``(scale, zero_point, objective_rtn, objective)``: ``(K / g, N)`` qparams
    and the two objectives summed over the groups.
    """
    k, n = w.shape
    G = k // g
    blocks = jnp.transpose(jnp.reshape(w, (G, g, n)), (0, 2, 1))  # (G, N, g)
    rows = jnp.reshape(blocks, (G * n, g))  # one group per row
    s0, z0 = numerics.calibrate(jnp, rows, row_spec)  # (G N, 1): round to nearest
    if hessian is not None:
        h = jnp.reshape(hessian, (G, g, G, g))
        h_gg = jnp.transpose(jnp.diagonal(h, axis1=0, axis2=2), (2, 0, 1))  # (G, g, g)

    def objective(s, z):
        e = rows - numerics.steps_to_values(jnp, numerics.grid_steps(jnp, rows, s, z, row_spec),
                                            s)
        if hessian is None:
            return jnp.sum(e * e, axis=1)
        e = jnp.reshape(e, (G, n, g))
        he = jnp.matmul(e, h_gg, precision=lax.Precision.HIGHEST)  # H_gg symmetric
        return jnp.reshape(jnp.sum(e * he, axis=2), (G * n,))

    def over_factors(z, best, f):
        err, s_best, z_best = best
        s = s0 * f
        e = objective(s, z)
        better = e < err
        return (jnp.where(better, e, err), jnp.where(better, s[:, 0], s_best),
                jnp.where(better, z[:, 0], z_best)), None

    def over_zero_points(best, z):
        z = jnp.full(z0.shape, z, jnp.int32)
        return lax.scan(functools.partial(over_factors, z), best,
                        jnp.asarray(factors, jnp.float32))[0], None

    rtn = objective(s0, z0)
    zs = ([0] if row_spec.symmetric
          else list(range(row_spec.qmin, row_spec.qmax + 1)))
    (err, s, z), _ = lax.scan(over_zero_points, (rtn, s0[:, 0], z0[:, 0]),
                              jnp.asarray(zs, jnp.int32))
    return (jnp.reshape(s, (G, n)), jnp.reshape(z, (G, n)).astype(jnp.int32),
            jnp.sum(rtn), jnp.sum(err))


# -- the benchmark ----------------------------------------------------------------------------
def parse_grid(text: str) -> tuple[str, int, int]:
    """``"int4g128"`` -> ``("int4 g128", 4, 128)``."""
    m = re.fullmatch(r"int(\d+)\s*g(\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"grid {text!r}: expected int<bits>g<group>, "
                                         "e.g. int4g128")
    bits, group = int(m[1]), int(m[2])
    return f"int{bits} g{group}", bits, group


def layer_ratio(report, before: str, after: str) -> float:
    """``sum after / sum before`` over the report's layers."""
    den = sum(e.details[before] for e in report.layers)
    return sum(e.details[after] for e in report.layers) / den if den > 0 else float("nan")


#: method name -> (objective label, details keys (before, after)) for the ratio column
RATIOS = {"weight-l2 ceiling": ("weight l2", ("objective_rtn", "objective")),
          "output-error ceiling": ("e^T H_gg e", ("objective_rtn", "objective")),
          "AWQ": ("layer output MSE", ("rtn_error", "error")),
          "HQQ": ("weight l_0.7", ("lp_rtn", "lp"))}


def methods(factors: int, gptq: bool) -> list[tuple[str, QuantMethod | None]]:
    out = [("RTN", None),
           ("weight-l2 ceiling", RangeSearch("l2", factors)),
           ("output-error ceiling", RangeSearch("output", factors)),
           ("AWQ", pj.AWQ()),
           ("HQQ", pj.HQQ())]
    return out + [("GPTQ act_order", pj.GPTQ(act_order=True))] if gptq else out


def table(ctx, grids) -> str:
    log = ctx.algorithm_log
    fp32 = log["fp32"]
    lines = [f"fp32: {fp32:.4f} bits/byte",
             f"| {'grid':<9} | {'method':<20} | bits/byte | gap recovered "
             f"| {'layer error (objective)':<31} | calibrate_model s |",
             f"|{'-' * 11}|{'-' * 22}|-----------|---------------|{'-' * 33}|-------------------|"]
    for grid, _, _ in grids:
        rtn = log[grid]["RTN"][0]
        for name, (bpb, (seconds, _), report) in log[grid].items():
            gap = f"{100 * (rtn - bpb) / (rtn - fp32):.1f} %" if name != "RTN" else ""
            ratio = ""
            if name in RATIOS:
                label, keys = RATIOS[name]
                ratio = f"{layer_ratio(report, *keys):.3f} x RTN ({label})"
            lines.append(f"| {grid:<9} | {name:<20} | {bpb:9.4f} | {gap:>13} | {ratio:<31} "
                         f"| {seconds:17.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", nargs="+", type=parse_grid,
                   default=[parse_grid(g) for g in DEFAULT_GRIDS],
                   help="int<bits>g<group> (default: %(default)s)")
    p.add_argument("--factors", type=int, default=201,
                   help="scale factors of the searches, linspace(0.25, 1.25, N)")
    p.add_argument("--gptq", action="store_true", help="also GPTQ (act_order) per grid")
    p.add_argument("--quick", action="store_true",
                   help="the example's tiny model (a smoke test of the script)")
    args = p.parse_args(argv)
    if args.factors < 1:
        p.error("--factors must be >= 1")
    start, cpu_start = time.perf_counter(), time.process_time()
    print(cpu_info())
    print(f"jax {jax.__version__} ({jax.default_backend()})")
    ctx = ex.setup(ex.parse_args(["--out", ""] + (["--quick"] if args.quick else [])))
    todo = methods(args.factors, args.gptq)
    for grid, bits, group in args.grids:
        rules = functools.partial(ex.algorithm_rules, bits=bits, group=group)
        for name, method in todo:
            ex.algorithm_row(grid, name, rules, method)(ctx)
            bpb, (seconds, _), _ = ctx.algorithm_log[grid][name]
            print(f"  {grid} {name}: {bpb:.4f} bits/byte ({seconds:.1f} s)", flush=True)
    print(f"\nheld-out bits/byte ({ctx.args.eval_windows} windows of {ctx.args.seq_len + 1} "
          f"bytes); weight-only asymmetric grids, float32 scales, embeddings float; "
          f"{ctx.args.calib_batches} calibration batches of {ctx.args.batch}x"
          f"{ctx.args.seq_len} tokens; searches: {args.factors} scale factors in "
          "[0.25, 1.25] x RTN's, every integer zero point")
    print(table(ctx, args.grids))
    print(f"total {time.perf_counter() - start:.0f} s wall, process CPU "
          f"{time.process_time() - cpu_start:.0f} s")
    return ctx


if __name__ == "__main__":
    main()
