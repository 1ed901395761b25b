"""Shared fixtures: real models trained on real digits, once per test session."""
import copy
import os

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


@pytest.fixture
def deterministic_cuda():
    """Deterministic algorithms, deterministic cuDNN and no TF32, for a CUDA test that compares
    bits; every global setting it changes is restored after, so no later test relies on it."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[2:]


@pytest.fixture(scope="session")
def digits():
    """((x_train, y_train), (x_test, y_test)) of scikit-learn's digits in [0, 1]."""
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def _trained_once(digits):
    (x, y), _ = digits
    torch.manual_seed(0)
    cnn = train_plain(SmallCNN(), x, y, epochs=8, seed=0)
    mlp = train_plain(MLP(), x, y, epochs=15, seed=1)
    return {"cnn": cnn, "mlp": mlp}


@pytest.fixture
def trained_models(_trained_once):
    """{'cnn': SmallCNN with BatchNorm (eval), 'mlp': MLP}, both trained on digits once per
    session; each test gets its own copies, so a test (or a reference library) that leaves
    a model in another mode cannot leak into the next test."""
    return {name: copy.deepcopy(m).eval() for name, m in _trained_once.items()}


@pytest.fixture(scope="session")
def _robust_once(digits):
    from fastadv.train import TrainConfig, fit

    (x, y), _ = digits
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the weights must not depend on the process's random initial seed
        model = SmallCNN()
        fit(model, x, y, TrainConfig(method="pgd", eps=0.2, steps=10), epochs=2, seed=0)
    return model.eval()


@pytest.fixture
def robust_cnn(_robust_once):
    """SmallCNN adversarially trained on digits (PGD-10 AT, eps 0.2, 2 epochs), once per session;
    each test gets its own copy. Its PGD iterates settle into cycles within a few dozen steps."""
    return copy.deepcopy(_robust_once).eval()


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
    # The CLI, torchrun and compile checks the tests start inherit one thread as well: with a
    # pytest worker on every core, more threads would only spin-wait for each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
