import os
from contextlib import contextmanager

# One torch thread for every test and every process a test starts (set before torch is imported): the
# tests' tensors are small, and on a shared machine two threads that wait for each other make them 5 to
# 10 times slower. A test about threads sets its own (torch_threads below).
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from gapbench.models import LinearGaussian


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def make_linear_gaussian(data_size: int = 12, latent_size: int = 3, *, sigma: float = 0.7,
                         scale: float = 1.5, num_datapoints: int = 6, seed: int = 0):
    """A linear-Gaussian model (float64) with a correlated posterior, and data drawn from it."""
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.random(data_size, latent_size, sigma=sigma, scale=scale, generator=g)
    x, _ = model.sample(num_datapoints, generator=g)
    return model, x


@pytest.fixture
def linear_gaussian():
    return make_linear_gaussian()


@contextmanager
def torch_threads(num_threads: int):
    """Run the block with ``num_threads`` torch threads, then restore the number."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread_again():
    """Back to one thread after a test that changed it (a run with --threads N sets it per stage)."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its tensors are small, and on a shared 2-core machine two threads that wait for each other make
    tiny models 5 to 10 times slower; module-wide, so every run in the module agrees."""
    with torch_threads(1):
        yield

