"""Post-training algorithms beyond round-to-nearest, for ``QuantRule(method=...)``.

Public as ``pychop_jax.algorithms`` (round-to-nearest PTQ, ``quantize_params``, is
``serving.ptq``):

* ``GPTQ`` (``gptq.py``): Hessian-based error feedback, sequential over layers;
* ``AWQ`` (``awq.py``): activation-aware per-input-channel scales;
* ``SmoothQuant`` (``smoothquant.py``): activation outliers moved into w8a8 weights;
* ``HQQ`` (``hqq.py``): calibration-free half-quadratic zero-point / scale search;
* ``calibrate_model`` (``calibration.py``): runs them on a ``quantize_model`` model
  of any framework from calibration batches (statistics: ``stats.py``; weights as
  matrices: ``layout.py``).

Each algorithm is also a function on arrays (``gptq``, ``awq_search``,
``smoothquant_scales``, ``hqq``) and each settings class has
``apply(kernel, layout, spec, stats) -> (MethodResult, details)`` for use without
``quantize_model``.
"""

from .awq import AWQ, awq_candidate, awq_clip_ratios, awq_scales, awq_search
from .calibration import CalibrationReport, LayerCalibration, calibrate_model, site_layout
from .gptq import GPTQ, gptq
from .hqq import HQQ, hqq, lp_objective
from .layout import KernelLayout
from .smoothquant import SmoothQuant, outlier_ratio, smoothquant_scales
from .stats import LayerStats, batch_stats

__all__ = ["GPTQ", "AWQ", "SmoothQuant", "HQQ", "calibrate_model", "CalibrationReport",
           "LayerCalibration", "KernelLayout", "site_layout", "LayerStats", "batch_stats", "gptq",
           "awq_search", "awq_scales", "awq_candidate", "awq_clip_ratios", "smoothquant_scales",
           "outlier_ratio", "hqq", "lp_objective"]
