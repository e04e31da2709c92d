"""Builds the optional compiled extension fastgmmdiff._C from csrc/ with ninja.

* CUDAExtension when the installed torch was built with CUDA (torch.version.cuda) and a CUDA
  toolkit is found (CUDA_HOME / nvcc); otherwise CppExtension (CPU kernels only).  Decided from
  the toolchain, never from a GPU being present.
* The extension must be built against the torch it will run with, so torch is not a build
  requirement: a build that cannot import torch (pip's default build isolation) stops with a
  message naming the fix (``--no-build-isolation``) instead of producing a wheel without kernels.
* Writes fastgmmdiff/_build_info.py (what was built, against which torch), which the package
  reads at import to warn, once, when the kernels are missing or were built for another torch.
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


NO_TORCH = """fastgmmdiff: torch is not importable in this build environment, so the compiled kernels cannot
be built (pip builds in an isolated environment by default, without the torch you will run).
Install torch first, then build against it:
    pip install torch
    pip install --no-build-isolation .        (or: pip install --no-build-isolation fastgmmdiff)
For a pure-Python install without the compiled kernels (the slower "torch" backend only), set
FASTGMMDIFF_SKIP_BUILD=1."""


def write_build_info(extension, torch_version):
    """fastgmmdiff/_build_info.py: read at import by fastgmmdiff._ext."""
    with open(os.path.join(ROOT, "fastgmmdiff", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time; read by fastgmmdiff._ext.\n"
                f"EXTENSION = {extension!r}  # 'cpu', 'cpu+cuda' or 'none' (FASTGMMDIFF_SKIP_BUILD)\n"
                f"TORCH_VERSION = {torch_version!r}  # the torch the extension was built against\n")


def extensions():
    if _flag("FASTGMMDIFF_SKIP_BUILD"):
        print("fastgmmdiff: FASTGMMDIFF_SKIP_BUILD set, building no extension", file=sys.stderr)
        write_build_info("none", None)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        sys.exit(NO_TORCH)
    cpu_src = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpu_src:
        write_build_info("none", None)
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
        write_build_info("cpu+cuda", torch.__version__)
    else:
        why = ("FASTGMMDIFF_SKIP_CUDA_BUILD set" if _flag("FASTGMMDIFF_SKIP_CUDA_BUILD") else
               "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found")
        print(f"fastgmmdiff: building CPU kernels only ({why})", file=sys.stderr)
        write_build_info("cpu", torch.__version__)
        ext = ce.CppExtension("fastgmmdiff._C", cpu_src,
                              include_dirs=[os.path.join(ROOT, "csrc")],
                              extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
