"""UPGD: torchattacks' "ultimate" PGD (ce, margin or DLR loss, EOT, momentum, random start). Linf."""
import contextlib
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.eotpgd import check_eot_iter
from fastadv.attacks.momentum import MeanGradient, momentum_iterations
from fastadv.attacks.pgd import uniform_start
from fastadv.engine import EXACT, CrossEntropyGradient, autocast_dtype, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack

LOSSES = ("ce", "margin", "dlr")


def check_loss(loss):
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)} or a callable (images, labels, target_labels) -> cost, "
                         f"got {loss!r}")
    return loss


def margin_cost(outputs, labels, targets=None):
    """The reference's margin (CW f-function, kappa 0), summed, op for op. Its runner-up
    is the max of the logits with the true class's zeroed (not removed), as there."""
    cls = labels if targets is None else targets
    one_hot = torch.eye(outputs.shape[1], device=outputs.device)[cls]
    other, _ = torch.max((1 - one_hot) * outputs, dim=1)
    own = torch.masked_select(outputs, one_hot.bool())
    return -torch.clamp(own - other if targets is None else other - own, min=0).sum()


def dlr_cost(outputs, labels, targets=None):
    """The reference's DLR loss (untargeted, or its targeted form), summed, op for op."""
    rows = torch.arange(outputs.shape[0], device=outputs.device)
    ranked, order = outputs.sort(dim=1)
    if targets is None:
        top = (order[:, -1] == labels).float()
        num = outputs[rows, labels] - ranked[:, -2] * top - ranked[:, -1] * (1.0 - top)
        return (-num / (ranked[:, -1] - ranked[:, -3] + 1e-12)).sum()
    num = outputs[rows, labels] - outputs[rows, targets]
    return (-num / (ranked[:, -1] - 0.5 * ranked[:, -3] - 0.5 * ranked[:, -4] + 1e-12)).sum()


class LossGradient:
    """grad of UPGD's margin, DLR or user loss w.r.t. adv (labels, and targets when targeted).

    The named losses are sums over the batch: a sample's gradient never depends on
    the others, so early stopping just drops rows. A callable loss gets
    (adv, labels, targets or None) and calls the model itself, as in the reference.
    """

    def __init__(self, forward, loss, labels, targets=None, precision=None):
        self.forward = forward
        self.loss = loss
        self.labels = labels
        self.targets = targets
        self.autocast = autocast_dtype(precision)
        self.last_logits = None
        self._checked = False

    def __call__(self, adv):
        adv = adv.detach().requires_grad_(True)
        autocast = self.autocast is not None
        mixed = torch.autocast(adv.device.type, self.autocast) if autocast else contextlib.nullcontext()
        with torch.enable_grad(), mixed:
            if callable(self.loss):
                cost = self.loss(adv, self.labels, self.targets)
            else:
                logits = self.forward(adv)
                if not self._checked:
                    for labels, dlr_min in ((self.labels, 3), (self.targets, 4)):
                        if labels is not None:
                            validation.check_logits(logits, labels, n_classes_min=dlr_min if self.loss == "dlr" else 1)
                    self._checked = True
                self.last_logits = logits.detach()
                logits = logits.float() if self.autocast is not None else logits
                cost = (margin_cost if self.loss == "margin" else dlr_cost)(logits, self.labels, self.targets)
            return torch.autograd.grad(cost, adv)[0]

    def succeeded(self):
        if self.last_logits is None:
            raise ValueError("early_stop needs a named loss ('ce', 'margin', 'dlr'): a callable loss hides the logits")
        pred = self.last_logits.argmax(1)
        return pred != self.labels if self.targets is None else pred == self.targets

    def keep(self, mask):
        self.labels = self.labels[mask] if self.labels is not None else None
        self.targets = self.targets[mask] if self.targets is not None else None


def upgd_loop(forward, x, y, *, eps, alpha, steps, random_start=False, loss="ce", decay=1.0, eot_iter=1,
              targeted=False, true_labels=None, backend=None, engine=EXACT):
    """The UPGD iteration on inputs the caller owns; returns the last iterate.

    y: the true labels, or the targets when targeted (true_labels then holds the
    true ones, which only the targeted DLR loss reads).
    """
    fmt = validation.memory_format(x)
    adv = uniform_start(x, eps, backend) if random_start else x.clone()  # noise in the caller's layout
    adv, x = engine.layout(adv), engine.layout(x)
    if loss == "ce":
        gradient = CrossEntropyGradient(forward, y, targeted, engine.precision)
    elif targeted:
        gradient = LossGradient(forward, loss, true_labels, y, engine.precision)
    else:
        gradient = LossGradient(forward, loss, y, None, engine.precision)
    adv = momentum_iterations(
        MeanGradient(gradient, eot_iter), adv, x, torch.zeros_like(x), eps=eps, alpha=alpha, steps=steps, decay=decay,
        backend=backend, engine=engine, model=forward,
    )
    return adv.contiguous(memory_format=fmt)


def upgd(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
         steps: int = 10, random_start: bool = False,
         loss: Union[Literal["ce", "margin", "dlr"], Callable[..., torch.Tensor]] = "ce", decay: float = 1.0,
         eot_iter: int = 1, targeted: bool = False, backend: Optional[str] = None,
         **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """UPGD: momentum sign steps on the mean of eot_iter gradients of a ce, margin or DLR loss.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps, random_start, loss ('ce', 'margin', 'dlr'), decay, eot_iter: as UPGD.
        Targeted 'dlr' also reads the true labels: use the UPGD class for it.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with
    torchattacks.UPGD for float eps and alpha (a per-sample eps draws its start as U(-1, 1) * eps).
    """
    if callable(loss):
        raise TypeError("the plain function takes loss 'ce', 'margin' or 'dlr'; use the UPGD class for a callable")
    if targeted and loss == "dlr":
        raise ValueError("targeted loss='dlr' needs the true labels as well as the targets: use the UPGD class")
    return run_functional(
        upgd_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), random_start=random_start, loss=check_loss(loss),
        decay=validation.check_budget(decay, "decay"), eot_iter=check_eot_iter(eot_iter), targeted=targeted,
        backend=backend,
    )


class UPGD(Attack):
    r"""Ultimate PGD: torchattacks' PGD with the options of the gradient attacks.

    Distance measure: Linf. Optional uniform start in the eps-ball; each step takes
    the mean of eot_iter gradients (zeros, then += g / eot_iter), then MI-FGSM's
    update: g / mean(|g|) + decay * momentum, sign step, projection and clip.
    Losses: 'ce' (mean cross-entropy, negated when targeted), 'margin' (the CW
    f-function with kappa 0, summed; its runner-up is the max of the logits with the
    true class's zeroed, as in the reference), 'dlr' (untargeted needs 3 classes,
    targeted 4), or a callable (images, labels, target_labels) -> cost.

    Equivalence: bit-exact with torchattacks 3.5.1 UPGD on the 'torch' backend (the
    CPU default), every loss and targeted mode; on Triton the momentum step sums
    |grad| in another order (bound in the MIFGSM docstring). early_stop is supported
    for the named losses.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps. (Default: 10)
        random_start (bool): start from a uniform point in the eps-ball. (Default: False)
        loss (str or callable): 'ce', 'margin' or 'dlr'. (Default: 'ce')
        decay (float): momentum factor. (Default: 1.0)
        eot_iter (int): gradients averaged per step. (Default: 1)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.UPGD(model, eps=8/255, alpha=2/255, steps=10, random_start=False)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = False,
                 loss: Union[Literal["ce", "margin", "dlr"], Callable[..., torch.Tensor]] = "ce", decay: float = 1.0,
                 eot_iter: int = 1, *, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("UPGD", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps = validation.check_steps(steps)
        self.random_start = random_start
        self.loss = check_loss(loss)
        self.decay = validation.check_budget(decay, "decay")
        self.eot_iter = check_eot_iter(eot_iter)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return upgd_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            random_start=self.random_start, loss=self.loss, decay=self.decay, eot_iter=self.eot_iter,
            targeted=self.targeted, true_labels=y, backend=self.backend, engine=self.engine,
        )
