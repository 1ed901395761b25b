"""Property tests (hypothesis): for random shapes, budgets, dtypes and seeds on small
random models, every attack returns finite images inside its threat model and [0, 1],
leaves its inputs and the model untouched, and repeats itself for the same seed."""
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastadv

BACKENDS = ["torch", pytest.param("interpret", marks=pytest.mark.interpreter)]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


class TinyNet(nn.Module):
    def __init__(self, channels, classes, dtype, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)
        self.to(dtype)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


CASES = st.fixed_dictionaries({
    "n": st.integers(1, 6),
    "c": st.integers(1, 3),
    "h": st.integers(1, 9),
    "w": st.integers(1, 9),
    "classes": st.integers(2, 7),
    "dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    "seed": st.integers(0, 2**16),
    "eps": st.floats(0.0, 0.5),
    "alpha": st.floats(1e-3, 0.3),
    "steps": st.integers(0, 4),
})

LINF = {
    "FGSM": lambda m, p: fastadv.FGSM(m, eps=p["eps"]),
    "PGD": lambda m, p: fastadv.PGD(m, eps=p["eps"], alpha=p["alpha"], steps=p["steps"]),
}
L2 = {
    "PGDL2": lambda m, p: fastadv.PGDL2(m, eps=p["eps"] * 4, alpha=p["alpha"] * 4, steps=p["steps"]),
}


def check_attack(make, norm, scale, p, backend):
    model = TinyNet(p["c"], p["classes"], p["dtype"], p["seed"]).eval()
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.rand(p["n"], p["c"], p["h"], p["w"], generator=g).to(p["dtype"])
    y = torch.randint(0, p["classes"], (p["n"],), generator=g)
    x0, y0 = x.clone(), y.clone()
    flags = [q.requires_grad for q in model.parameters()]
    outs = []
    for _ in range(2):
        torch.manual_seed(p["seed"])
        atk = make(model, p)
        atk.set_backend(backend)
        outs.append(atk(x, y))
    adv = outs[0]
    assert torch.equal(outs[0], outs[1]), "same seed, different output"
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    d = (adv.double() - x.double()).flatten(1)
    dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    eps = p["eps"] * scale
    slack = 2e-6 if p["dtype"] == torch.float32 else 2e-2  # rounding of x + delta in the image dtype
    assert (dist <= eps + slack * (1 if norm == "linf" else x[0].numel() ** 0.5)).all(), (dist.max(), eps)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert not model.training and [q.requires_grad for q in model.parameters()] == flags
    assert all(q.grad is None for q in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(LINF))
@SETTINGS
@given(p=CASES)
def test_linf_attack_properties(name, backend, p):
    check_attack(LINF[name], "linf", 1, p, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(L2))
@SETTINGS
@given(p=CASES)
def test_l2_attack_properties(name, backend, p):
    check_attack(L2[name], "l2", 4, p, backend)


ZOO_SETTINGS = settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# name -> (constructor, norm, budget scale); norm None: unbounded (CW, DeepFool: range only)
ZOO = {
    "MIFGSM": (lambda m, p: fastadv.MIFGSM(m, eps=p["eps"], alpha=p["alpha"], steps=p["steps"]), "linf", 1),
    # steps >= 1: with steps=0 TPGD and RFGSM return their random start, as torchattacks does
    "TPGD": (lambda m, p: fastadv.TPGD(m, eps=p["eps"], alpha=p["alpha"], steps=max(1, p["steps"])), "linf", 1),
    "EOTPGD": (lambda m, p: fastadv.EOTPGD(m, eps=p["eps"], alpha=p["alpha"], steps=p["steps"]), "linf", 1),
    "FFGSM": (lambda m, p: fastadv.FFGSM(m, eps=p["eps"], alpha=p["alpha"]), "linf", 1),
    "RFGSM": (lambda m, p: fastadv.RFGSM(m, eps=p["eps"], alpha=p["alpha"], steps=max(1, p["steps"])), "linf", 1),
    "APGD-Linf": (lambda m, p: fastadv.APGD(m, eps=p["eps"], steps=p["steps"], loss="ce"), "linf", 1),
    "APGD-L2": (lambda m, p: fastadv.APGD(m, norm="L2", eps=p["eps"] * 4, steps=p["steps"], loss="dlr" if p["classes"] >= 3 else "ce"), "l2", 4),
    "APGDT": (lambda m, p: fastadv.APGDT(m, eps=p["eps"], steps=p["steps"], n_classes=max(4, p["classes"])), "linf", 1),
    "FAB": (lambda m, p: fastadv.FAB(m, eps=p["eps"], steps=p["steps"], n_classes=p["classes"]), "linf", 1),
    "Square": (lambda m, p: fastadv.Square(m, eps=p["eps"], n_queries=max(1, 5 * p["steps"])), "linf", 1),
    "CW": (lambda m, p: fastadv.CW(m, steps=max(1, p["steps"])), None, 0),
    "DeepFool": (lambda m, p: fastadv.DeepFool(m, steps=max(1, p["steps"])), None, 0),
}


@pytest.mark.parametrize("name", sorted(ZOO))
@ZOO_SETTINGS
@given(p=CASES)
def test_zoo_attack_properties(name, p):
    make, norm, scale = ZOO[name]
    p = {**p, "dtype": torch.float32}
    if name == "APGDT":  # its targeted DLR loss needs at least 4 classes (a ValueError otherwise)
        p["classes"] = max(4, p["classes"])
    if norm is None:
        check_unbounded(make, p)
    else:
        check_attack(make, norm, scale, p, "torch")


def check_unbounded(make, p):
    """Attacks with no budget (CW, DeepFool): finite, in [0, 1], inputs and model untouched, repeatable."""
    model = TinyNet(p["c"], p["classes"], p["dtype"], p["seed"]).eval()
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.rand(p["n"], p["c"], p["h"], p["w"], generator=g)
    y = torch.randint(0, p["classes"], (p["n"],), generator=g)
    x0 = x.clone()
    outs = []
    for _ in range(2):
        torch.manual_seed(p["seed"])
        outs.append(make(model, p)(x, y))
    assert torch.equal(*outs)
    assert torch.isfinite(outs[0]).all() and outs[0].min() >= 0 and outs[0].max() <= 1
    assert torch.equal(x, x0) and not model.training
    assert all(q.grad is None and q.requires_grad for q in model.parameters())


class DeadNet(nn.Module):
    """Zero gradients everywhere (a dead ReLU), or inf logits: degenerate gradients."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.lin = nn.Linear(12, 4)

    def forward(self, x):
        z = self.lin(x.flatten(1))
        if self.mode == "dead":
            return torch.relu(z - 1e6)
        return z * float("inf")


@pytest.mark.parametrize("mode", ["dead", "inf"])
@pytest.mark.parametrize("name", sorted(set(ZOO) | {"FGSM", "PGD", "PGDL2"}))
def test_degenerate_gradients_never_give_nan(name, mode):
    """Zero or NaN gradients: every attack returns finite images in [0, 1] (where the
    reference arithmetic gives NaN, the sample comes back as its clean image)."""
    torch.manual_seed(0)
    model = DeadNet(mode).eval()
    x = torch.rand(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    p = {"eps": 0.1, "alpha": 0.05, "steps": 3, "classes": 4}
    if name in ZOO:
        make = ZOO[name][0]
    else:
        make = {**LINF, **L2}[name]
    adv = make(model, p)(x, y)
    assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1, name


KERNEL_BACKED = ["MIFGSM", "TPGD", "EOTPGD", "FFGSM", "RFGSM", "APGD-Linf", "APGD-L2", "APGDT"]


@pytest.mark.interpreter
@pytest.mark.parametrize("name", KERNEL_BACKED)
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(p=CASES)
def test_zoo_attack_properties_through_the_kernels(name, p):
    """The same properties with the Triton kernels run by the interpreter."""
    make, norm, scale = ZOO[name]
    p = {**p, "dtype": torch.float32, "classes": max(4, p["classes"]) if name == "APGDT" else p["classes"]}
    check_attack(make, norm, scale, p, "interpret")
