"""Builds the optional compiled extension fastgmmdiff._C from csrc/ with ninja.

* CUDAExtension when the installed torch was built with CUDA (torch.version.cuda) and a CUDA
  toolkit is found (CUDA_HOME / nvcc); otherwise CppExtension (CPU kernels only).  Decided from
  the toolchain, never from a GPU being present.
* FASTGMMDIFF_SKIP_CUDA_BUILD=1: CPU kernels only.  FASTGMMDIFF_SKIP_BUILD=1: no extension
  (the package still works on its "torch" backend).  FASTGMMDIFF_CUDA_ARCHS="90;80": target
  architectures (default 90).  FASTGMMDIFF_NATIVE=1: -march=native for the CPU kernels.
  MAX_JOBS: parallel compile jobs (torch.utils.cpp_extension honours it).
  FASTGMMDIFF_SANITIZE=address: build the CPU kernels under AddressSanitizer (testing only).
Install with: pip install --no-build-isolation .
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def extensions():
    if _flag("FASTGMMDIFF_SKIP_BUILD"):
        print("fastgmmdiff: FASTGMMDIFF_SKIP_BUILD set, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        print("fastgmmdiff: torch is not importable at build time (install torch first and use "
              "pip install --no-build-isolation); building no extension", file=sys.stderr)
        return [], {}
    cpu_src = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpu_src:
        return [], {}
    # -fopenmp: ATen's at::parallel_for is an inline OpenMP region compiled into this extension.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast"]
    if _flag("FASTGMMDIFF_NATIVE"):
        cxx.append("-march=native")
    link = ["-fopenmp"]
    if os.environ.get("FASTGMMDIFF_SANITIZE"):  # e.g. address: run python with libasan preloaded
        san = f"-fsanitize={os.environ['FASTGMMDIFF_SANITIZE']}"
        cxx += [san, "-fno-omit-frame-pointer", "-g"]
        link.append(san)
    use_cuda = (torch.version.cuda is not None and ce.CUDA_HOME is not None
                and not _flag("FASTGMMDIFF_SKIP_CUDA_BUILD") and glob.glob("csrc/cuda/*.cu"))
    if use_cuda:
        archs = os.environ.get("FASTGMMDIFF_CUDA_ARCHS", "90").replace(",", ";").split(";")
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]  # no --use_fast_math: accuracy is the contract
        for a in archs:
            a = a.strip().replace(".", "")
            nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        ext = ce.CUDAExtension(
            "fastgmmdiff._C", cpu_src + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DFASTGMMDIFF_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link)
        print(f"fastgmmdiff: building CPU + CUDA kernels for sm_{archs}", file=sys.stderr)
    else:
        why = ("FASTGMMDIFF_SKIP_CUDA_BUILD set" if _flag("FASTGMMDIFF_SKIP_CUDA_BUILD") else
               "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found")
        print(f"fastgmmdiff: building CPU kernels only ({why})", file=sys.stderr)
        ext = ce.CppExtension("fastgmmdiff._C", cpu_src,
                              include_dirs=[os.path.join(ROOT, "csrc")],
                              extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
