import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The image tests run tiny networks: intra-op threads only add synchronisation, and on
    a busy shared CPU (more runnable threads than cores) they made the suite ~25x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
