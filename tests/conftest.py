import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from a fixed RNG state and the default backend setting."""
    import fieldkern.backend as backend

    torch.manual_seed(0)
    previous = backend._SETTING.current
    yield
    backend._SETTING.current = previous
