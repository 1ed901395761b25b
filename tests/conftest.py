"""Shared fixtures: real models trained on real digits, once per test session."""
import pytest
import torch

from fastadv.data import load_digits
from fastadv.models import MLP, SmallCNN, train_plain


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    """((x_train, y_train), (x_test, y_test)) of scikit-learn's digits in [0, 1]."""
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def trained_models(digits):
    """{'cnn': SmallCNN with BatchNorm (eval), 'mlp': MLP}, both trained on digits."""
    (x, y), _ = digits
    torch.manual_seed(0)
    cnn = train_plain(SmallCNN(), x, y, epochs=8, seed=0)
    mlp = train_plain(MLP(), x, y, epochs=15, seed=1)
    return {"cnn": cnn, "mlp": mlp}


@pytest.fixture(params=["cnn", "mlp"])
def model(request, trained_models):
    return trained_models[request.param]


@pytest.fixture
def batch(digits):
    """64 test digits and their labels."""
    _, (x, y) = digits
    return x[:64].clone(), y[:64].clone()


def pytest_configure(config):
    # The test models are tiny: one thread avoids OpenMP oversubscription on small
    # machines and in the multi-process (torchrun) tests. Both sides of every
    # comparison run in the same process, so the thread count never biases one.
    torch.set_num_threads(1)
