"""Attacks on a torch.compile'd model (Inductor, the CPU backend here): they run, and equal
torchattacks on the same compiled model bit for bit."""
import pytest
import torch

import fastadv

torchattacks = pytest.importorskip("torchattacks")


@pytest.mark.slow
def test_attacks_on_a_compiled_model_equal_torchattacks(trained_models, digits):
    _, (x, y) = digits
    x, y = x[:32], y[:32]
    model = trained_models["cnn"]
    compiled = torch.compile(model)  # Inductor: compiles C++ for this CPU on first use
    for name, kw in (("PGD", dict(eps=0.1, alpha=0.02, steps=3)), ("FGSM", dict(eps=0.1))):
        torch.manual_seed(0)
        ours = getattr(fastadv, name)(compiled, **kw)(x, y)
        torch.manual_seed(0)
        ref = getattr(torchattacks, name)(compiled, **kw)(x, y)
        assert torch.equal(ours, ref), name
        assert not torch.equal(ours, x), name  # it attacked
    assert not compiled.training and all(p.requires_grad for p in model.parameters())
