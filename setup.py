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
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _build_tools_problem(commands: list[str], find_spec=None) -> str | None:
    """What this environment lacks to run setup.py `commands`, as a message saying how to get
    it, or None. `pip install --no-build-isolation` builds with the environment's own tools,
    where an old setuptools without the wheel package fails with a bare "invalid command
    'bdist_wheel'" (setuptools ships the command itself from 70.1 on)."""
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec

    def has(name: str) -> bool:
        try:
            return find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package that is not there
            return False

    # pip install runs dist_info (which calls bdist_wheel in old setuptools) and bdist_wheel;
    # pip install -e runs editable_wheel
    wheel_commands = ("dist_info", "bdist_wheel", "editable_wheel")
    problems = []
    if not has("torch"):
        problems.append("torch is not installed here; the extension is compiled against the "
                        "torch it will run with, so install that first (e.g. pip install "
                        "torch==2.13.0 for the CPU build)")
    if any(c in wheel_commands for c in commands) and not (
            has("setuptools.command.bdist_wheel") or has("wheel")):
        import setuptools

        problems.append(f"setuptools {setuptools.__version__} has no bdist_wheel command and "
                        "the wheel package is not installed: pip install \"setuptools>=70\" "
                        "wheel")
    if not problems:
        return None
    return ("vidconv: cannot build in this environment (pip's --no-build-isolation uses its "
            "packages as the build tools):\n  - " + "\n  - ".join(problems))


def _cxx_standard() -> str:
    """C++20 where the installed torch's headers demand it (torch 2.14 and later), else C++17,
    which older torch builds are compiled and tested with."""
    from torch.utils.cpp_extension import include_paths

    for folder in include_paths():
        aten = os.path.join(folder, "ATen", "ATen.h")
        if os.path.exists(aten):
            with open(aten, encoding="utf-8", errors="replace") as f:
                return "c++20" if "C++20 or later" in f.read() else "c++17"
    return "c++17"


def _resolve_cuda_home() -> str | None:
    """torch finds CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script outside
    the toolkit (e.g. /usr/local/bin/nvcc) the guess has no headers. Fall back to the toolkit
    the real nvcc lives in, or /usr/local/cuda, and tell torch's builder."""
    import shutil
    import subprocess

    from torch.utils import cpp_extension

    def has_headers(home: str | None) -> bool:
        return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))

    home = cpp_extension.CUDA_HOME
    if has_headers(home):
        return home
    candidates = [os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        import tempfile

        try:  # a dry run prints the real toolkit's bin folder as _HERE_, wrapper or not
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "probe.cu")
                open(src, "w").close()
                out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", src + ".o"],
                                     capture_output=True, text=True, timeout=60)
            candidates += [os.path.dirname(line.split("=", 1)[1].strip())
                           for line in (out.stdout + out.stderr).splitlines()
                           if line.startswith("#$ _HERE_=")]
        except (OSError, subprocess.SubprocessError):
            pass
    for cand in candidates:
        if has_headers(cand):
            print(f"vidconv: CUDA_HOME {home!r} has no cuda_runtime.h; using {cand}")
            cpp_extension.CUDA_HOME = cand
            os.environ["CUDA_HOME"] = cand
            return cand
    return home


def _cuda_decision() -> tuple[bool, str]:
    import torch

    if os.environ.get("VIDCONV_CPU_ONLY", "0") == "1":
        return False, "VIDCONV_CPU_ONLY=1"
    if os.environ.get("VIDCONV_FORCE_CUDA", "0") == "1":
        _resolve_cuda_home()
        return True, "VIDCONV_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    cuda_home = _resolve_cuda_home()
    if cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {cuda_home}"


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
    std = f"-std={_cxx_standard()}"
    cxx = [*opt, std, "-fopenmp"]
    macros = [("VIDCONV_ARCHS", f'"{archs if with_cuda else ""}"')]
    extra_link = ["-fopenmp"]
    if not with_cuda:
        return [CppExtension("vidconv._C", sources, extra_compile_args={"cxx": cxx},
                             define_macros=macros, extra_link_args=extra_link,
                             include_dirs=[os.path.join(ROOT, "csrc")])]

    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = [*opt, std, "-lineinfo", "--expt-relaxed-constexpr",
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


_problem = _build_tools_problem(sys.argv[1:])
if _problem is not None:
    raise SystemExit(_problem)
setup(ext_modules=_extensions(), cmdclass=_cmdclass())
