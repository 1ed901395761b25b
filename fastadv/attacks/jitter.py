"""Jitter: PGD on the squared error between a noisy, scaled softmax and the one-hot
label, divided by the perturbation's size once a sample is misclassified
(Schwinn et al., 2021). Linf."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.arg_checks import check_number
from fastadv.attacks.pgd import linf_iterations, uniform_start
from fastadv.engine import EXACT, autocast_dtype, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack
from fastadv.validation import check_logits


class JitterGradient:
    """grad w.r.t. adv of Jitter's loss, with the reference's arithmetic and RNG draws.

    Per sample: z = softmax(scale * logits / max|logits|) + std * N(0, 1) (one draw
    of the logits' shape per call when std != 0), cost = mean((z - onehot)^2), negated
    towards the targets when targeted; divided by r = ||adv - x||_inf where the true
    label is already misclassified and r != 0. The batch loss is the mean.

    Two changes of form, none of value: the division is a select, not the reference's
    boolean-mask indexing (no host sync), with a safe denominator elsewhere so no NaN
    enters the backward pass; and r's gradient is taken w.r.t. r alone, then spread
    onto the pixels with PyTorch's own rule for the inf-norm, sign(d) * g_r / (number
    of pixels at the max), in one select: only samples that were divided get a
    non-zero term, and image-sized autograd intermediates are avoided. The gradient
    is the reference's, bit for bit (tests/test_zoo_sign_b.py).
    """

    def __init__(self, forward, x, labels, targets=None, *, scale=10, std=0.1, precision=None):
        self.forward = forward
        self.x = x
        self.labels = labels
        self.targets = targets
        self.scale = scale
        self.std = std
        self.autocast = autocast_dtype(precision)
        self.last_logits = None
        self._checked = False
        self._batch = None  # the original batch size once early stopping drops samples
        self._scratch = None

    def __call__(self, adv: torch.Tensor) -> torch.Tensor:
        adv = adv.detach().requires_grad_(True)
        dims = list(range(1, adv.dim()))
        d, magnitude, at_max = self._buffers(adv)
        d = torch.sub(adv.detach(), self.x, out=d)
        magnitude = torch.abs(d, out=magnitude)
        radius = magnitude.amax(dim=dims, keepdim=True)  # ||d||_inf: a max is exact, as torch.norm's
        r = radius.flatten().requires_grad_(True)
        mixed = torch.autocast(adv.device.type, self.autocast, enabled=self.autocast is not None)
        with torch.enable_grad():
            with mixed:
                logits = self.forward(adv)
            if not self._checked:
                check_logits(logits, self.labels)
                self._checked = True
            logits = logits.float() if self.autocast is not None else logits
            wrong = torch.max(logits, dim=1)[1] != self.labels
            norm_z = torch.norm(logits, p=float("inf"), dim=1, keepdim=True)
            hat_z = F.softmax(self.scale * logits / norm_z, dim=1)
            if self.std != 0:
                hat_z = hat_z + self.std * torch.randn_like(hat_z)
            goal = self.targets if self.targets is not None else self.labels
            onehot = F.one_hot(goal, num_classes=logits.shape[-1]).float()
            cost = F.mse_loss(hat_z, onehot, reduction="none").mean(dim=1)
            if self.targets is not None:
                cost = -cost
            divide = wrong & (r != 0)
            safe = torch.where(divide, r, torch.ones_like(r))
            cost = torch.where(divide, cost / safe, cost)
            cost = cost.mean() if self._batch is None else cost.sum() / self._batch
            self.last_logits = logits.detach()
            grad, grad_r = torch.autograd.grad(cost, (adv, r))
        # PyTorch's inf-norm backward: sgn(d) * ((g_r / count) * (|d| == r)), in d's buffer. The count is
        # exact in fp32, as the reference's int64 count is once divided into g_r.
        at_max = torch.eq(magnitude, radius, out=at_max)
        share = grad_r.view_as(radius) / at_max.sum(dim=dims, keepdim=True, dtype=torch.float32)
        return grad.add_(d.sign_().mul_(share).mul_(at_max))

    def _buffers(self, adv):
        """Image-sized scratch buffers reused across steps (fresh ones cost page faults on the CPU)."""
        if self._scratch is None or self._scratch[0].shape != adv.shape or self._scratch[0].dtype != adv.dtype:
            self._scratch = (torch.empty_like(adv), torch.empty_like(adv), torch.empty_like(adv, dtype=torch.bool))
        return self._scratch

    def succeeded(self) -> torch.Tensor:
        pred = self.last_logits.argmax(1)
        return pred == self.targets if self.targets is not None else pred != self.labels

    def keep(self, mask: torch.Tensor) -> None:
        if self._batch is None:
            self._batch = float(self.labels.shape[0])
        self.x, self.labels = self.x[mask], self.labels[mask]
        if self.targets is not None:
            self.targets = self.targets[mask]


def jitter_loop(forward, x, y, *, eps, alpha, steps, scale=10, std=0.1, random_start=True, targets=None,
                backend=None, engine=EXACT):
    """The Jitter iteration on inputs the caller owns; returns the last iterate.

    y: the true labels (Jitter's misclassification test always uses them);
    targets: the target labels in targeted mode, else None.
    """
    fmt = validation.memory_format(x)
    adv = uniform_start(x, eps, backend) if random_start else x.clone()  # noise in the caller's layout
    adv, x = engine.layout(adv), engine.layout(x)
    grad = JitterGradient(forward, x, y, targets, scale=scale, std=std, precision=engine.precision)
    adv = linf_iterations(grad, adv, x, eps=eps, alpha=alpha, steps=steps, backend=backend, engine=engine, model=forward)
    return adv.contiguous(memory_format=fmt)


def check_jitter_args(scale, std):
    return check_number(scale, "scale", positive=True), check_number(std, "std")


def jitter(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
           steps: int = 10, scale: float = 10, std: float = 0.1, random_start: bool = True, targeted: bool = False,
           backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Jitter attack.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when
            targeted; the misclassification test then compares with them too, as the
            reference's set_mode_targeted_by_label does).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps: iterations. scale: softmax temperature factor (> 0). std: the softmax
            noise's standard deviation (>= 0; 0 draws nothing). random_start: start
            from a uniform point in the eps-ball.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.Jitter
    for float eps and alpha.
    """
    scale, std = check_jitter_args(scale, std)

    def core(model, x, y, **kw):
        return jitter_loop(model, x, y, targets=y if targeted else None, **kw)

    return run_functional(
        core, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), scale=scale, std=std, random_start=random_start, backend=backend,
    )


class Jitter(Attack):
    r"""Jitter from 'Exploring Misclassifications of Robust Neural Networks to Enhance
    Adversarial Attacks' [https://arxiv.org/abs/2105.10304].

    Distance measure: Linf. PGD (uniform random start, sign step, projection) on the
    loss mean((softmax(scale * z / ||z||_inf) + std * N(0, 1) - onehot)^2) per sample,
    negated towards the target when targeted, and divided by ||adv - x||_inf for
    samples already misclassified (against the true label, in every mode). The noise
    is drawn on the attack's device every step, after the random start.

    Equivalence: bit-exact with torchattacks 3.5.1 Jitter (same seed, same device),
    random start on or off, std 0 or not, every targeted mode. The reference's
    boolean-mask division is a select here (no host sync per step). Images of any
    shape [N, ...] (the reference needs [N, C, H, W]).

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps. (Default: 10)
        scale (float): factor on the max-normalized logits. (Default: 10)
        std (float): standard deviation of the noise on the softmax. (Default: 0.1)
        random_start (bool): start from a uniform point in the eps-ball. (Default: True)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.Jitter(model, eps=8/255, alpha=2/255, steps=10, scale=10, std=0.1)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 scale: float = 10, std: float = 0.1, random_start: bool = True, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("Jitter", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps = validation.check_steps(steps)
        self.random_start = random_start
        self.scale, self.std = check_jitter_args(scale, std)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        targets = self.get_target_label(x, y) if self.targeted else None
        return jitter_loop(
            self.get_logits, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, scale=self.scale, std=self.std,
            random_start=self.random_start, targets=targets, backend=self.backend, engine=self.engine,
        )
