"""How the extension was built: build_info, the registered op schemas, setup.py's CUDA decision."""

from __future__ import annotations

import ast
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


def _load_cuda_decision():
    """setup.py's _cuda_decision, executed without running setup() (that is the whole file)."""
    tree = ast.parse(SETUP_PY.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_cuda_decision")
    module = ast.Module(body=[ast.Import(names=[ast.alias(name="os")]), fn], type_ignores=[])
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(module), str(SETUP_PY), "exec"), namespace)
    return namespace["_cuda_decision"]


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
