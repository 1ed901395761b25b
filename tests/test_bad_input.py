"""Bad input gets a ValueError or TypeError naming the argument; nothing is mutated."""
import pytest
import torch
import torch.nn as nn

import fastadv
from fastadv import functional as F
from fastadv.models import SmallCNN


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    return model, x, y


IMAGE_CASES = [
    (lambda x: (x * 255).to(torch.uint8), TypeError, "images"),
    (lambda x: x > 0.5, TypeError, "images"),
    (lambda x: x * 2, ValueError, r"\[0, 1\]"),
    (lambda x: x - 0.5, ValueError, r"\[0, 1\]"),
    (lambda x: x.index_put((torch.tensor([0]),), torch.tensor(float("nan"))), ValueError, "NaN"),
    (lambda x: x.index_put((torch.tensor([1]),), torch.tensor(float("inf"))), ValueError, "NaN or inf"),
    (lambda x: x.flatten()[0], ValueError, "shape"),
    (lambda x: [1.0, 2.0], TypeError, "images"),
]

LABEL_CASES = [
    (lambda y: y[:3], ValueError, "labels"),
    (lambda y: y.float(), TypeError, "labels"),
    (lambda y: y.view(2, 2), ValueError, "labels"),
    (lambda y: y + 10, ValueError, r"labels must lie in \[0, 9\]"),
    (lambda y: y - 1, ValueError, "labels must lie"),
    (lambda y: None, ValueError, "labels are required"),
    (lambda y: y.bool(), TypeError, "labels"),
]

CALLS = [
    lambda m, x, y: fastadv.FGSM(m)(x, y),
    lambda m, x, y: fastadv.PGD(m, steps=2)(x, y),
    lambda m, x, y: fastadv.PGDL2(m, steps=2)(x, y),
    lambda m, x, y: F.pgd(m, x, y, steps=2),
    lambda m, x, y: F.fgsm(m, x, y),
    lambda m, x, y: F.pgdl2(m, x, y, steps=2),
    lambda m, x, y: fastadv.BIM(m, steps=1)(x, y),
    lambda m, x, y: fastadv.UPGD(m, steps=1, loss="margin")(x, y),
    lambda m, x, y: fastadv.DIFGSM(m, steps=1)(x, y),
    lambda m, x, y: fastadv.TIFGSM(m, steps=1, len_kernel=5)(x, y),
    lambda m, x, y: fastadv.NIFGSM(m, steps=1)(x, y),
    lambda m, x, y: fastadv.SINIFGSM(m, steps=1, m=2)(x, y),
    lambda m, x, y: fastadv.VMIFGSM(m, steps=1, N=1)(x, y),
    lambda m, x, y: fastadv.VNIFGSM(m, steps=1, N=1)(x, y),
    lambda m, x, y: fastadv.Jitter(m, steps=2)(x, y),
    lambda m, x, y: F.pifgsm(m, x, y, num_iter_set=2),
    lambda m, x, y: fastadv.PGDRS(m, steps=2)(x, y),
    lambda m, x, y: F.spsa(m, x, y, nb_sample=4),
    lambda m, x, y: fastadv.EADL1(m, binary_search_steps=1, max_iterations=2)(x, y),
    lambda m, x, y: F.eaden(m, x, y, binary_search_steps=1, max_iterations=2),
    lambda m, x, y: fastadv.JSMA(m, gamma=0.05)(x, y),
    lambda m, x, y: F.sparsefool(m, x, y, steps=1),
    lambda m, x, y: fastadv.OnePixel(m, steps=1)(x, y),
    lambda m, x, y: fastadv.Pixle(m, restarts=1, max_iterations=1)(x, y),
    lambda m, x, y: F.onepixel(m, x, y, steps=1),
    lambda m, x, y: F.pixle(m, x, y, restarts=1, max_iterations=1),
]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("bad,exc,match", IMAGE_CASES)
def test_bad_images(setup, call, bad, exc, match):
    model, x, y = setup
    xb = bad(x)
    before = xb.clone() if isinstance(xb, torch.Tensor) else None
    with pytest.raises(exc, match=match):
        call(model, xb, y)
    if before is not None:
        assert torch.equal(xb, before) or torch.isnan(before).any()


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("bad,exc,match", LABEL_CASES)
def test_bad_labels(setup, call, bad, exc, match):
    model, x, y = setup
    with pytest.raises(exc, match=match):
        call(model, x, bad(y))


BUDGETS = [
    (lambda m: fastadv.PGD(m, eps=-0.1), ValueError, "eps"),
    (lambda m: fastadv.PGD(m, alpha=0), ValueError, "alpha"),
    (lambda m: fastadv.PGD(m, alpha=-1), ValueError, "alpha"),
    (lambda m: fastadv.PGD(m, steps=-1), ValueError, "steps"),
    (lambda m: fastadv.PGD(m, steps=2.5), TypeError, "steps"),
    (lambda m: fastadv.PGD(m, eps=float("nan")), ValueError, "eps"),
    (lambda m: fastadv.PGD(m, eps="0.1"), TypeError, "eps"),
    (lambda m: fastadv.FGSM(m, eps=-1), ValueError, "eps"),
    (lambda m: fastadv.PGDL2(m, eps=-1), ValueError, "eps"),
    (lambda m: fastadv.PGDL2(m, alpha=0), ValueError, "alpha"),
    (lambda m: fastadv.PGD(m, backend="cuda-magic"), ValueError, "backend"),
]


@pytest.mark.parametrize("make,exc,match", BUDGETS)
def test_bad_budgets(setup, make, exc, match):
    model, x, y = setup
    with pytest.raises(exc, match=match):
        make(model)(x, y)


def test_bad_per_sample_eps(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="eps"):
        F.pgd(model, x, y, eps=torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="eps"):
        F.pgd(model, x, y, eps=torch.tensor([0.1, -0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="eps"):
        F.pgd(model, x, y, eps=torch.tensor([0.1, float("nan"), 0.1, 0.1]))


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)), None


class VectorModel(TupleModel):
    def forward(self, x):
        return self.lin(x.flatten(1)).sum(1)


class DictModel(TupleModel):
    def forward(self, x):
        return {"logits": self.lin(x.flatten(1))}


@pytest.mark.parametrize("model_cls,exc", [(TupleModel, TypeError), (VectorModel, ValueError), (DictModel, TypeError)])
def test_bad_model_output(setup, model_cls, exc):
    _, x, y = setup
    with pytest.raises(exc, match="model must return"):
        fastadv.PGD(model_cls(), steps=1)(x, y)


def test_targeted_mode_unsupported_names_attack(setup):
    model, _, _ = setup

    class Untargeted(fastadv.Attack):
        def forward(self, images, labels):
            return images

    with pytest.raises(ValueError, match="Untargeted does not support targeted mode"):
        Untargeted("Untargeted", model).set_mode_targeted_random()


def test_backend_env_var(monkeypatch, setup):
    model, x, y = setup
    monkeypatch.setenv("FASTADV_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTADV_BACKEND"):
        fastadv.PGD(model, steps=1)(x, y)
    monkeypatch.setenv("FASTADV_BACKEND", "triton")
    with pytest.raises(ValueError, match="needs CUDA"):
        fastadv.PGD(model, steps=1)(x, y)
