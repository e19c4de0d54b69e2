"""Build the Cython core ``sparselab._fast``.

OpenMP is used when the compiler accepts ``-fopenmp``; otherwise the kernels are built
single-threaded (the ``prange`` loops degrade to plain loops).
"""

import os
import shutil
import subprocess
import sys
import tempfile
from glob import glob

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _compiler_has_openmp() -> bool:
    if os.environ.get("SPARSELAB_NO_OPENMP"):
        return False
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        result = subprocess.run(
            [cc, "-fopenmp", src, "-o", os.path.join(tmp, "t")], capture_output=True
        )
        return result.returncode == 0


OPENMP = sys.platform.startswith("linux") and _compiler_has_openmp()
COMPILE_ARGS = ["-O3", "-ffast-math", "-fno-finite-math-only"]
# No -march=native: the built .so must run on other CPUs than the build machine. The
# kernels' vector versions carry per-function target attributes and are chosen at run
# time (sparselab/_fast/csrc/sl_kernels.h, sparselab._fast.isa).
LINK_ARGS = []
if OPENMP:
    COMPILE_ARGS.append("-fopenmp")
    LINK_ARGS.append("-fopenmp")

extensions = [
    Extension(
        f"sparselab._fast.{os.path.splitext(os.path.basename(path))[0]}",
        [path],
        include_dirs=[np.get_include(), "sparselab/_fast"],
        depends=glob("sparselab/_fast/csrc/*.h"),
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for path in sorted(glob("sparselab/_fast/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        compile_time_env={"HAVE_OPENMP": OPENMP},
    )
)
