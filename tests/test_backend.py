"""The backend switch: global setting, context manager, environment variable, errors."""

import pytest
import torch

import fieldkern
import fieldkern.backend as backend
import fieldkern.kernels


def test_default_is_auto_and_auto_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(backend._SETTING, "current", None)
    monkeypatch.delenv("FIELDKERN_BACKEND", raising=False)
    assert fieldkern.get_backend() == "auto"
    assert backend.resolve("mfn_stack", torch.zeros(1)) == "torch"


def test_set_backend_globally_and_as_context_manager():
    fieldkern.set_backend("torch")
    assert fieldkern.get_backend() == "torch"
    with fieldkern.set_backend("auto"):
        assert fieldkern.get_backend() == "auto"
        with pytest.raises(RuntimeError):
            with fieldkern.set_backend("TORCH"):  # case-insensitive
                assert fieldkern.get_backend() == "torch"
                raise RuntimeError("restored even on error")
        assert fieldkern.get_backend() == "auto"
    assert fieldkern.get_backend() == "torch"


def test_environment_variable(monkeypatch):
    monkeypatch.setattr(backend._SETTING, "current", None)
    monkeypatch.setenv("FIELDKERN_BACKEND", "torch")
    assert fieldkern.get_backend() == "torch"
    monkeypatch.setenv("FIELDKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FIELDKERN_BACKEND"):
        fieldkern.get_backend()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        fieldkern.set_backend("jax")


def test_triton_request_that_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = fieldkern.ResidualMFN(2, 8, 1, 2, 16)
    with fieldkern.set_backend("triton"):
        with pytest.raises(RuntimeError, match="backend 'triton' was requested for mfn_stack"):
            model(torch.zeros(3, 2))
    monkeypatch.setattr(fieldkern.kernels, "AVAILABLE", False)
    monkeypatch.setattr(fieldkern.kernels, "UNAVAILABLE_REASON", "triton is not installed")
    with fieldkern.set_backend("triton"):
        with pytest.raises(RuntimeError, match="triton is not installed"):
            model(torch.zeros(3, 2))


def test_torch_backend_always_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fieldkern.set_backend("torch"):
        assert backend.resolve("mfn_stack", torch.zeros(1)) == "torch"


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, fieldkern; "
        "heavy = [m for m in ('matplotlib', 'gemmi', 'mrcfile', 'starfile', 'skimage', 'PIL', 'triton') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_auto_keeps_the_measured_slower_mfn_stack_calls_on_the_reference():
    """The rule of ``AUTO_REFERENCE_POINTS``: float32, a recorded gradient, at most 2^18
    points and hidden 128; any other call, or an explicit "triton", is left to Triton."""
    from fieldkern.ops.mfn_stack import AUTO_REFERENCE_HIDDEN, AUTO_REFERENCE_POINTS, _auto_takes_reference

    def call(points, hidden=AUTO_REFERENCE_HIDDEN, grad=True):
        x = torch.zeros(points, 3)
        w = [torch.zeros(hidden, 3, requires_grad=grad)]
        return _auto_takes_reference(x, w, [None, [torch.zeros(hidden, hidden)]])

    assert call(AUTO_REFERENCE_POINTS)
    assert call(64)
    assert not call(AUTO_REFERENCE_POINTS + 1)
    assert not call(64, hidden=AUTO_REFERENCE_HIDDEN + 1)
    assert not call(64, grad=False)
    with torch.no_grad():
        assert not call(64)
    with fieldkern.ops.set_precision("mixed"):
        assert not call(64)
    with fieldkern.set_backend("triton"):
        assert not call(64)
    x = torch.zeros(64, 3, requires_grad=True)  # a gradient for the coordinates alone counts too
    assert _auto_takes_reference(x, [torch.zeros(32, 3)], [])
