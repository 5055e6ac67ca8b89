"""Build the optional C accelerator qtool.core._kernels (everything else is in pyproject.toml).

``optional=True``: if no C compiler is available the install still succeeds, and qtool
computes the same results with numpy alone (more slowly).
"""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-add, so every float operation rounds exactly as numpy's
# does (the results must be bit-identical to the numpy path). Never -ffast-math.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-trapping-math"]

SOURCES = ["qtool/core/_kernels.c", "qtool/core/_fit.c", "qtool/core/_fit_long.c"]
HEADERS = ["qtool/core/_kernels.h", "qtool/core/_fit.h"]
setup(ext_modules=[Extension("qtool.core._kernels", SOURCES, depends=HEADERS, optional=True,
                             extra_compile_args=FLAGS)])
