"""The attack loop's machinery: model state handling and input-only gradients."""
import contextlib

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.validation import check_logits


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer, else fallback."""
    for t in (*model.parameters(), *model.buffers()) if isinstance(model, nn.Module) else ():
        return t.device
    return fallback


@contextlib.contextmanager
def model_guard(model, *, model_training=False, batchnorm_training=False, dropout_training=False):
    """Put the model in attack mode; restore every module's mode and requires_grad after.

    Attack mode follows torchattacks: eval(), or with model_training train() with
    BatchNorm and Dropout kept in eval unless their flags say otherwise. Parameters
    stop requiring grad meanwhile, so autograd never records or computes parameter
    gradients and `.grad` is left untouched.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if model_training:
            model.train()
            for m in model.modules():
                name = type(m).__name__
                if ("BatchNorm" in name and not batchnorm_training) or ("Dropout" in name and not dropout_training):
                    m.eval()
        else:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


class CrossEntropyGradient:
    """grad of CE(forward(adv), labels) w.r.t. adv; of -CE towards the labels when targeted.

    Mirrors the reference: mean-reduced cross-entropy, `torch.autograd.grad` on the
    input only. The first call checks the model's output shape and the label range.
    """

    def __init__(self, forward, labels: torch.Tensor, targeted: bool = False):
        self.forward = forward
        self.labels = labels
        self.targeted = targeted
        self._checked = False
        self.loss = nn.CrossEntropyLoss()

    def logits(self, adv: torch.Tensor) -> torch.Tensor:
        out = self.forward(adv)
        if not self._checked:
            check_logits(out, self.labels)
            self._checked = True
        return out

    def __call__(self, adv: torch.Tensor) -> torch.Tensor:
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            cost = self.loss(self.logits(adv), self.labels)
            if self.targeted:
                cost = -cost
            return torch.autograd.grad(cost, adv)[0]


def run_functional(core, model, images, labels, *, budgets=(), **kwargs):
    """Validate, copy the inputs to the model's device, guard the model, run core.

    core(model, x, y, **kwargs) is an attack loop on inputs it may own. budgets
    names the kwargs that may be per-sample [N] tensors (validated, moved to the
    device as fp32); the rest pass through unchanged.
    """
    validation.check_images(images)
    validation.check_labels(labels, images.shape[0])
    n = images.shape[0]
    device = model_device(model, images.device)
    for name in budgets:
        value = validation.check_budget(kwargs[name], name, positive=(name == "alpha"), n=n)
        kwargs[name] = value.to(device, torch.float32) if isinstance(value, torch.Tensor) else value
    x = images.detach().clone().to(device)
    if n == 0:
        return x
    with model_guard(model):
        return core(model, x, labels.detach().clone().to(device), **kwargs)
