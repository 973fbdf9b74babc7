"""Build hook of pychop-jax: the metadata lives in pyproject.toml; this file only adds the
optional XLA:CPU kernels of ``pychop_jax.core.xla_cpu`` (``weight_only_matmul`` /
``int8_matmul`` at few rows), one C++ file against the XLA FFI headers vendored next to
it (``pychop_jax/core/csrc``), so a fresh ``pip install`` compiles it without jaxlib in
the build environment.

The extension is optional: without a C++17 compiler (or on a platform where it does not
build) the install goes on without it and those functions use their pure-XLA
formulations.  It is loaded with ctypes (no Python C API); x86-64 gets AVX2 + FMA
kernels chosen at run time, never ``-march=native``.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "pychop_jax/core/csrc"


class OptionalBuildExt(build_ext):
    """``build_ext`` that warns instead of failing when the kernels do not compile."""

    def build_extension(self, ext):
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/O2", "/std:c++17"]
        else:
            ext.extra_compile_args = ["-O3", "-std=c++17", "-Wno-return-type",
                                      "-Wno-attributes", "-Wno-sign-compare"]
        try:
            super().build_extension(ext)
        except Exception as exc:  # no compiler, unsupported platform, ...
            self.warn(f"pychop_jax: the optional XLA:CPU kernels were not built ({exc}); "
                      "the pure-XLA formulations are used instead.")

    def get_export_symbols(self, ext):
        return []  # a ctypes library, not a Python module: no PyInit_ symbol


setup(
    ext_modules=[Extension("pychop_jax.core._decode_matmul",
                           sources=[f"{CSRC}/decode_matmul.cc"], include_dirs=[CSRC],
                           language="c++", optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
