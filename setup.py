"""Build vidconv._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Decided from the installed torch and CUDA_HOME, never from a visible GPU (build boxes often
have none). Knobs:
  VIDCONV_CPU_ONLY=1    build the CPU kernels only
  VIDCONV_FORCE_CUDA=1  build the CUDA kernels even where the check says no
  TORCH_CUDA_ARCH_LIST  CUDA targets (default "8.0;9.0a": A100 and H100)
  MAX_JOBS              parallel compile jobs (ninja)
  DEBUG=1               -O0 -g, device line info
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _cuda_decision() -> tuple[bool, str]:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("VIDCONV_CPU_ONLY", "0") == "1":
        return False, "VIDCONV_CPU_ONLY=1"
    if os.environ.get("VIDCONV_FORCE_CUDA", "0") == "1":
        return True, "VIDCONV_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def _extensions() -> list:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda, why = _cuda_decision()
    debug = os.environ.get("DEBUG", "0") == "1"
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    print(f"vidconv: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})"
          + (f", archs {archs}" if with_cuda else ""))

    sources = [os.path.join("csrc", "ops.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*opt, "-std=c++17", "-fopenmp"]
    macros = [("VIDCONV_ARCHS", f'"{archs if with_cuda else ""}"')]
    extra_link = ["-fopenmp"]
    if not with_cuda:
        return [CppExtension("vidconv._C", sources, extra_compile_args={"cxx": cxx},
                             define_macros=macros, extra_link_args=extra_link,
                             include_dirs=[os.path.join(ROOT, "csrc")])]

    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = [*opt, "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    if debug:
        nvcc += ["-G"]
    macros.append(("VIDCONV_WITH_CUDA", "1"))
    return [CUDAExtension("vidconv._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                          define_macros=macros, extra_link_args=extra_link,
                          include_dirs=[os.path.join(ROOT, "csrc")])]


def _cmdclass() -> dict:
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
