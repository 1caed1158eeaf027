"""How the extension was built: build_info, the registered op schemas, setup.py's CUDA decision."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch

import vidconv

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"

SCHEMAS = {
    "fovea_context": "vidconv::fovea_context(Tensor clips, SymInt size, Tensor offsets, "
                     "Tensor flip, float[] mean, float[] std, ScalarType dtype, "
                     "bool channels_last) -> (Tensor, Tensor)",
    "crop_normalize": "vidconv::crop_normalize(Tensor clips, SymInt size, Tensor offsets, "
                      "Tensor flip, float[] mean, float[] std, ScalarType dtype, "
                      "bool channels_last) -> Tensor",
}


def test_build_info_is_consistent() -> None:
    info = vidconv.build_info()
    assert info.torch_cuda == torch.version.cuda
    assert info.has_cuda_kernels == (info.cuda is not None)
    if info.cuda is None:
        assert info.archs == ()
    else:
        assert re.fullmatch(r"\d+\.\d+", info.cuda)
        assert info.archs and all(re.fullmatch(r"\d+\.\d+a?(\+PTX)?", a) for a in info.archs)
        # Same major CUDA version as torch, or importing vidconv would have failed.
        assert torch.version.cuda is not None
        assert info.cuda.split(".")[0] == torch.version.cuda.split(".")[0]
    assert isinstance(vidconv.__version__, str)


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_schema_registered(op: str) -> None:
    schema = str(getattr(torch.ops.vidconv, op).default._schema)
    # int arguments may print as SymInt depending on the torch version.
    assert schema.replace("SymInt", "int") == SCHEMAS[op].replace("SymInt", "int")


@pytest.mark.parametrize("op", sorted(SCHEMAS) + ["st_conv3d", "st_conv3d_backward"])
def test_kernels_registered_per_backend(op: str) -> None:
    name = f"vidconv::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    if op in SCHEMAS:
        assert has_cuda == vidconv.build_info().has_cuda_kernels


def _load_setup_functions() -> dict:
    """setup.py's functions, executed without running setup() (the last statement)."""
    tree = ast.parse(SETUP_PY.read_text())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    module = ast.Module(body=[ast.Import(names=[ast.alias(name="os")]), *fns], type_ignores=[])
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(module), str(SETUP_PY), "exec"), namespace)
    return namespace


def _load_cuda_decision():
    return _load_setup_functions()["_cuda_decision"]


def test_setup_cxx_standard_follows_the_torch_headers() -> None:
    from torch.utils.cpp_extension import include_paths

    aten = next(Path(d) / "ATen" / "ATen.h" for d in include_paths()
                if (Path(d) / "ATen" / "ATen.h").exists())
    expected = "c++20" if "C++20 or later" in aten.read_text() else "c++17"
    assert _load_setup_functions()["_cxx_standard"]() == expected


def test_setup_finds_the_toolkit_behind_a_headerless_cuda_home(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch.utils import cpp_extension

    wrapper_home = tmp_path / "usr_local"  # what torch guesses from a wrapper nvcc: no headers
    (wrapper_home / "bin").mkdir(parents=True)
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(wrapper_home))
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    monkeypatch.setenv("CUDA_HOME", str(wrapper_home))
    resolve = _load_setup_functions()["_resolve_cuda_home"]
    assert resolve() == str(toolkit)
    assert cpp_extension.CUDA_HOME == str(toolkit) and os.environ["CUDA_HOME"] == str(toolkit)
    # a CUDA_HOME that has the headers is kept as it is
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    monkeypatch.setenv("CUDA_PATH", str(wrapper_home))
    assert resolve() == str(toolkit)


@pytest.mark.parametrize("env,expected", [
    ({"VIDCONV_CPU_ONLY": "1"}, False),
    ({"VIDCONV_FORCE_CUDA": "1"}, True),
    ({"VIDCONV_CPU_ONLY": "1", "VIDCONV_FORCE_CUDA": "1"}, False),
    ({}, None),  # decided from torch and CUDA_HOME
])
def test_setup_cuda_decision(monkeypatch: pytest.MonkeyPatch, env: dict, expected) -> None:
    decide = _load_cuda_decision()
    for key in ("VIDCONV_CPU_ONLY", "VIDCONV_FORCE_CUDA"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with_cuda, why = decide()
    assert isinstance(why, str) and why
    if expected is not None:
        assert with_cuda is expected
        assert next(iter(env)) in why if len(env) == 1 else "VIDCONV_CPU_ONLY" in why
    else:
        from torch.utils.cpp_extension import CUDA_HOME

        assert with_cuda == (torch.version.cuda is not None and CUDA_HOME is not None)
        if torch.version.cuda is None:
            assert "no CUDA" in why


def test_setup_decision_never_looks_for_a_gpu() -> None:
    """Build boxes often have no GPU: the decision must not depend on one being visible."""
    source = ast.get_source_segment(SETUP_PY.read_text(), next(
        n for n in ast.parse(SETUP_PY.read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name == "_cuda_decision"))
    assert source is not None and "is_available" not in source and "device_count" not in source


def _hiding(*missing: str):
    """importlib.util.find_spec as if the `missing` packages were not installed."""
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args):
        if any(name == m or name.startswith(m + ".") for m in missing):
            return None
        return real(name, *args)

    return find_spec


@pytest.mark.parametrize("command", ["dist_info", "bdist_wheel", "editable_wheel"])
def test_setup_names_the_missing_wheel_tool(command: str) -> None:
    problem = _load_setup_functions()["_build_tools_problem"]
    old_setuptools = _hiding("wheel", "setuptools.command.bdist_wheel")
    message = problem([command, "--dist-dir", "x"], old_setuptools)
    assert message is not None and "no bdist_wheel command" in message
    assert 'pip install "setuptools>=70" wheel' in message
    # the same environment can still run commands that pack no wheel (e.g. build_ext)
    assert problem(["build_ext", "--inplace"], old_setuptools) is None
    # the wheel package alone, or a setuptools that ships the command, is enough
    assert problem([command], _hiding("setuptools.command.bdist_wheel")) is None
    assert problem([command], _hiding("wheel")) is None


def test_setup_names_a_missing_torch() -> None:
    problem = _load_setup_functions()["_build_tools_problem"]
    message = problem(["bdist_wheel"], _hiding("torch"))
    assert message is not None and "torch is not installed" in message
    assert "no bdist_wheel" not in message


def test_setup_py_stops_with_the_message_not_a_traceback() -> None:
    """What pip shows: setup.py run as pip runs it, with wheel and setuptools' own command
    hidden, exits with the one message before compiling anything."""
    import subprocess
    import sys

    script = ("import importlib.util as u, runpy, sys\n"
              "real = u.find_spec\n"
              "u.find_spec = lambda n, *a: None if n.split('.')[0] == 'wheel' "
              "or n == 'setuptools.command.bdist_wheel' else real(n, *a)\n"
              f"sys.argv = ['setup.py', 'bdist_wheel']\n"
              f"runpy.run_path({str(SETUP_PY)!r}, run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=SETUP_PY.parent)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "no bdist_wheel command" in res.stderr
    assert "vidconv: CUDA kernels" not in res.stdout  # stopped before the build decision


def test_install_commands_name_their_build_tools_and_a_decoder() -> None:
    """The README's commands install what a fresh environment lacks: the build tools that
    --no-build-isolation takes from the environment, and a video decoder for `vidconv`."""
    import tomllib

    readme = (SETUP_PY.parent / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "pip install --no-build-isolation" in line]
    assert len(commands) >= 2
    for line in commands:
        assert '"setuptools>=70"' in line and " wheel " in line, line
    project = tomllib.loads((SETUP_PY.parent / "pyproject.toml").read_text())
    assert any(d.replace(" ", "").startswith("av>=") for d in project["project"]["dependencies"])
    requires = project["build-system"]["requires"]
    assert "setuptools>=70" in requires and "wheel" in requires
