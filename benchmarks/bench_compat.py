"""NumPy and Torch adapters vs NumPy's cast and PyTorch's fake-quantization kernels.

    python benchmarks/bench_compat.py [--n 4194304] [--repeats 40]

Every ratio is measured in this one process, baseline and candidates interleaved
(benchmarks/_timing.py); "vs base" = baseline time / our time, so > 1 means faster
than the baseline.  The training step is reported as our time / baseline time (lower
is better), with torch's default thread count and with one thread: on a small machine
shared with other jobs, torch's OpenMP threads wait for each other whenever one of
them is descheduled, and 2-thread runs jump between ~16 ms and ~250 ms a step.  Rows
marked "context" are references, not part of the library.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import jax
import numpy as np
import torch
from array_api_compat import numpy as xnp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import HEADER, cpu_info, interleaved_medians, row  # noqa: E402

import pychop  # noqa: E402
from pychop_jax import QuantSpec  # noqa: E402
from pychop_jax.core import numerics  # noqa: E402
from pychop_jax.interop import numpy as numpy_backend  # noqa: E402

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


def numpy_adapter(n: int, reps: int) -> None:
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    int8_buffer = np.empty(n, np.int8)
    spec = QuantSpec(bits=8)

    def functions():
        return numpy_backend.quantize(x, numpy_backend.calibrate(x, spec))

    def chopi():  # a fresh quantizer: quantize() calibrates on first use
        return pychop.NumpyChopi(num_bits=8).quantize(x)

    def array_api():
        scale, zero_point = numerics.calibrate(xnp, x, spec, nonfinite="flag")
        return numerics.quantize(xnp, x, scale, zero_point, spec)

    t = interleaved_medians({
        "cast": lambda: np.copyto(int8_buffer, x, casting="unsafe"),
        "functions": functions,
        "chopi": chopi,
        "array_api": array_api,
    }, repeats=reps)
    base = t["cast"]
    print(row("np.copyto(int8, x, casting='unsafe') (baseline)", base, n))
    print(row("numpy_backend.calibrate + quantize (checks)", t["functions"], n, base,
              ">= 0.065x"))
    print(row("NumpyChopi(8).quantize(x), auto-calibrating", t["chopi"], n, base, ">= 0.065x"))
    print(row("  context: numerics with the NumPy namespace, op by op", t["array_api"], n,
              base))


def torch_forward(n: int, reps: int) -> None:
    x = torch.randn(n)
    x_grad = x.clone().requires_grad_(True)
    layer = pychop.TorchChopi(num_bits=8)
    layer(x)
    scale, zero_point = float(layer.scale), int(layer.zero_point)
    frozen = pychop.TorchChopi(num_bits=8).eval()
    frozen.calibrate(x)
    t = interleaved_medians({
        "torch": lambda: torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255),
        "train": lambda: layer(x),
        "train_grad": lambda: layer(x_grad),
        "eval": lambda: frozen(x),
    }, repeats=reps)
    base = t["torch"]
    print(row("torch.fake_quantize_per_tensor_affine (baseline)", base, n))
    print(row("TorchChopi.forward, training (observer + fake quant)", t["train"], n, base,
              ">= 1.0x"))
    print(row("  same, input requires grad (STE mask too)", t["train_grad"], n, base,
              ">= 1.0x"))
    print(row("TorchChopi.forward, eval (frozen range, NaN/inf check)", t["eval"], n, base))


def _mlp(quant, width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), quant(), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def training_step(reps: int, threads: int, width: int = 1024, depth: int = 3,
                  batch: int = 256) -> None:
    """SGD step of an MLP with a fake-quantization layer after every hidden Linear,
    with ``threads`` torch threads."""
    from torch.ao.quantization import FakeQuantize

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    xb = torch.randn(batch, width)
    yb = torch.randint(0, 10, (batch,))
    models = {
        "fp32": _mlp(nn.Identity, width, depth),
        "torch": _mlp(FakeQuantize, width, depth),  # MovingAverageMinMaxObserver, quint8
        "ours": _mlp(lambda: pychop.IntQuantizedLayer(num_bits=8), width, depth),
    }
    steps = {}
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

        steps[name] = step
    t = interleaved_medians(steps, repeats=reps)
    torch.set_num_threads(default_threads)
    shape = f"{depth}x Linear({width}) b{batch}, {threads} thr"
    print(row(f"MLP {shape} step, FakeQuantize (baseline)", t["torch"]))
    print(row("same step, IntQuantizedLayer", t["ours"]))
    print(row("  context: same step without fake quantization", t["fp32"]))
    return t["ours"] / t["torch"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    print(cpu_info())
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"numpy {np.__version__}, {torch.get_num_threads()} torch threads, "
          f"n = {args.n} float32")
    print(HEADER)
    numpy_adapter(args.n, args.repeats)
    torch_forward(args.n, args.repeats)
    ratios = {n: training_step(args.repeats, n) for n in sorted({torch.get_num_threads(), 1})}
    print()
    for n, ratio in ratios.items():
        print(f"IntQuantizedLayer step time / FakeQuantize step time, {n} torch thread(s) = "
              f"{ratio:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
