import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_settings():
    """Every test starts from a fixed RNG state, and the backend, precision and variant
    settings it found are restored after it (a test that fails inside a ``set_*`` call
    cannot leak its setting into the next test)."""
    import fieldkern.backend as backend
    from fieldkern.ops import _precision, _variants

    torch.manual_seed(0)
    previous = backend._SETTING.current, _precision._SETTING.current, dict(_variants._current)
    yield
    backend._SETTING.current, _precision._SETTING.current = previous[:2]
    _variants._current.clear()
    _variants._current.update(previous[2])
