"""What every attack call guarantees: the threat model, [0, 1], untouched inputs, restored model."""
import pytest
import torch
import torch.nn as nn

import fastadv
from fastadv.models import SmallCNN

ATTACKS = [
    ("FGSM", {"eps": 0.1}, "linf", 0.1),
    ("PGD", {"eps": 0.1, "alpha": 0.03, "steps": 4}, "linf", 0.1),
    ("PGDL2", {"eps": 0.7, "alpha": 0.3, "steps": 4}, "l2", 0.7),
    ("BIM", {"eps": 0.1, "alpha": 0.03, "steps": 2}, "linf", 0.1),
    ("UPGD", {"eps": 0.1, "alpha": 0.03, "steps": 2, "random_start": True}, "linf", 0.1),
    ("DIFGSM", {"eps": 0.1, "alpha": 0.03, "steps": 2}, "linf", 0.1),
    ("TIFGSM", {"eps": 0.1, "alpha": 0.03, "steps": 2, "len_kernel": 5}, "linf", 0.1),
    ("NIFGSM", {"eps": 0.1, "alpha": 0.03, "steps": 2}, "linf", 0.1),
    ("SINIFGSM", {"eps": 0.1, "alpha": 0.03, "steps": 2, "m": 2}, "linf", 0.1),
    ("VMIFGSM", {"eps": 0.1, "alpha": 0.03, "steps": 2, "N": 2}, "linf", 0.1),
    ("VNIFGSM", {"eps": 0.1, "alpha": 0.03, "steps": 2, "N": 2}, "linf", 0.1),
    ("PIFGSM", {"max_epsilon": 0.1, "num_iter_set": 3}, "linf", 0.1),
    ("PIFGSMPP", {"max_epsilon": 0.1, "num_iter_set": 3}, "linf", 0.1),
    ("Jitter", {"eps": 0.1, "alpha": 0.03, "steps": 3}, "linf", 0.1),
    ("PGDRS", {"eps": 0.1, "alpha": 0.03, "steps": 2}, "linf", 0.1),
    ("PGDRSL2", {"eps": 0.7, "alpha": 0.3, "steps": 2}, "l2", 0.7),
    ("SPSA", {"eps": 0.1, "nb_iter": 2, "nb_sample": 8, "max_batch_size": 4}, "linf", 0.1),
]


def distance(adv, x, norm):
    d = (adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


@pytest.mark.parametrize("name,kwargs,norm,eps", ATTACKS)
@pytest.mark.parametrize("backend", ["torch", pytest.param("interpret", marks=pytest.mark.interpreter)])
def test_output_in_ball_and_range(name, kwargs, norm, eps, backend, model, batch):
    x, y = batch
    adv = getattr(fastadv, name)(model, backend=backend, **kwargs)(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert (distance(adv, x, norm) <= eps + 1e-5).all()


@pytest.mark.parametrize("name,kwargs,norm,eps", ATTACKS)
def test_inputs_and_model_state_untouched(name, kwargs, norm, eps, batch):
    x, y = batch
    model = SmallCNN()
    model.train()
    model.features[1].eval()  # a mixed mode must come back exactly
    model.head.weight.requires_grad_(False)
    model.head.bias.grad = torch.ones_like(model.head.bias)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x0, y0 = x.clone(), y.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    getattr(fastadv, name)(model, **kwargs)(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.head.bias.grad, torch.ones_like(model.head.bias))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.bias")
    for k, v in model.state_dict().items():  # BatchNorm running stats untouched (eval while attacking)
        assert torch.equal(v, state[k]), k


def test_model_state_restored_after_error(batch):
    x, y = batch

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, inp):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        fastadv.PGD(model)(x, y)
    assert model.training and model.lin.weight.requires_grad


def test_same_seed_same_output(model, batch):
    x, y = batch
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(fastadv.PGDL2(model)(x, y))
    assert torch.equal(*outs)


def test_empty_batch_returns_empty(model):
    x, y = torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long)
    for name in ("FGSM", "PGD", "PGDL2"):
        assert getattr(fastadv, name)(model)(x, y).shape == (0, 1, 8, 8)
    assert fastadv.functional.pgd(model, x, y).shape == (0, 1, 8, 8)


def test_channels_last_and_batch_one(trained_models, batch):
    x, y = batch
    model = trained_models["cnn"]
    xc = x.contiguous(memory_format=torch.channels_last)
    for name in ("FGSM", "PGD", "PGDL2"):
        torch.manual_seed(0)
        adv = getattr(fastadv, name)(model, steps=3)(xc, y) if name != "FGSM" else fastadv.FGSM(model)(xc, y)
        assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
        adv1 = getattr(fastadv, name)(model)(x[:1], y[:1])
        assert adv1.shape == (1, 1, 8, 8)


def test_low_precision_models(trained_models, batch):
    """fp16 and bf16 images with a model of the same dtype: kernels and twin agree."""
    x, y = batch
    for dtype in (torch.bfloat16, torch.float16):
        model = SmallCNN().to(dtype).eval()
        model.load_state_dict(trained_models["cnn"].state_dict())
        xd = x.to(dtype)
        outs = []
        for backend in ("torch", "interpret"):
            torch.manual_seed(0)
            outs.append(fastadv.PGD(model, steps=3, backend=backend)(xd, y))
        assert outs[0].dtype == dtype
        assert torch.equal(*outs)


@pytest.mark.parametrize("name", ["FGSM", "FFGSM", "RFGSM", "PGD"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("backend", ["torch", pytest.param("interpret", marks=pytest.mark.interpreter)])
def test_uncopied_images_are_only_read(name, layout, backend, trained_models, batch):
    """These attacks skip the private copy of the images (their loops only read them): the
    caller's tensor keeps its values and flags, and no output shares its storage."""
    x, y = batch
    model = trained_models["cnn"]
    x = x.contiguous(memory_format=layout).requires_grad_(True)
    x0 = x.detach().clone()
    kwargs = {"steps": 2} if name in ("RFGSM", "PGD") else {}
    runs = {
        "class": lambda: getattr(fastadv, name)(model, backend=backend, **kwargs)(x, y),
        "chunked": lambda: getattr(fastadv, name)(model, backend=backend, batch_size=7, **kwargs)(x, y),
        "functional": lambda: getattr(fastadv.functional, name.lower())(model, x, y, backend=backend, **kwargs),
    }
    outs = {}
    for how, run in runs.items():
        torch.manual_seed(0)
        outs[how] = run()
        assert torch.equal(x.detach(), x0) and x.requires_grad and x.grad is None, how
        assert outs[how].untyped_storage().data_ptr() != x.untyped_storage().data_ptr(), how
        outs[how].add_(1)  # writing the result leaves the images alone
        assert torch.equal(x.detach(), x0), how
    assert torch.equal(outs["class"], outs["functional"])
    if name == "FGSM":  # no random draws: chunks give the same bits
        assert torch.equal(outs["class"], outs["chunked"])
