"""SPSA: a gradient-free attack that estimates the margin loss's gradient from
random +-1 perturbations and descends it with Adam (Uesato et al., 2018). Linf."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.arg_checks import check_count, check_number
from fastadv.attacks.cw import engine_forward
from fastadv.engine import EXACT, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack
from fastadv.validation import check_logits


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: the largest logit of another class minus the label's logit."""
    top_logits, top_classes = torch.topk(logits, 2, dim=-1)
    own = logits[torch.arange(logits.shape[0], device=logits.device), labels]
    other = torch.where(top_classes[..., 0] == labels, top_logits[..., 1], top_logits[..., 0])
    return other - own


class MarginalLoss(torch.nn.modules.loss._Loss):
    """The margin as a loss module (the reference's SPSA.loss_fn): per sample, or summed
    or averaged by reduction."""

    def forward(self, logits, targets):
        m = margin(logits, targets)
        if self.reduction == "none":
            return m
        if self.reduction in ("sum", "mean"):
            return getattr(m, self.reduction)()
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {self.reduction!r}")


def batch_sizes(n: int, max_batch_size: int):
    """nb_sample split into full batches of max_batch_size and the remainder."""
    return [max_batch_size] * (n // max_batch_size) + ([n % max_batch_size] if n % max_batch_size else [])


@torch.no_grad()
def spsa_gradient(loss, x, y, *, delta, nb_sample, max_batch_size):
    """The SPSA estimate of grad loss(x, y), as the reference draws and sums it.

    Each of the nb_sample directions is one +-1 tensor of one image's shape, shared by
    every image of the batch (Bernoulli(0.5) draws on the device's generator, one draw
    per batch of at most max_batch_size directions, of max_batch_size directions' size
    buffer); each direction costs two forward passes of the whole batch.
    """
    grad = torch.zeros_like(x)
    copies = x.unsqueeze(0).expand(max_batch_size, *x.shape).contiguous()
    labels = y.unsqueeze(0).expand(max_batch_size, *y.shape).contiguous()
    v = torch.empty_like(copies[:, :1])
    for size in batch_sizes(nb_sample, max_batch_size):
        xs = copies[:size]
        vb = v[:size].bernoulli_().mul_(2.0).sub_(1.0)
        vs = vb.expand_as(xs).contiguous()
        shape = xs.shape
        xs = xs.view(-1, *x.shape[1:])
        ys = labels[:size].view(-1)
        vs = vs.view(-1, *x.shape[1:])
        df = loss(xs + delta * vs, ys) - loss(xs - delta * vs, ys)
        df = df.view(-1, *[1] * (vs.dim() - 1))
        estimate = (df / (2.0 * delta * vs)).view(shape).sum(dim=0)
        grad += estimate
    grad /= nb_sample
    return grad


def spsa_loop(forward, x, y, *, eps, delta, lr, nb_iter, nb_sample, max_batch_size, targeted=False, engine=EXACT,
              loss_fn=margin):
    """SPSA on inputs the caller owns; returns x + dx.

    Adam (torch.optim.Adam, lr) descends the estimated gradient of loss_fn(logits, y)
    (per sample; the margin by default), towards y when targeted, away from it otherwise;
    after each step dx is clipped to the eps-ball and to [0, 1] around x, in place, as
    the reference does.
    engine: precision and channels_last apply to the model; early_stop does not apply.
    """
    model = engine_forward(forward, engine)
    checked = []

    def loss(images, labels):
        logits = model(images)
        if not checked:
            check_logits(logits, labels, n_classes_min=2)
            checked.append(True)
        m = loss_fn(logits, labels)
        return m if targeted else -m

    dx = torch.zeros_like(x)
    dx.grad = torch.zeros_like(dx)
    optimizer = torch.optim.Adam([dx], lr=lr)
    for _ in range(nb_iter):
        optimizer.zero_grad()
        dx.grad = spsa_gradient(loss, x + dx, y, delta=delta, nb_sample=nb_sample, max_batch_size=max_batch_size)
        optimizer.step()
        with torch.no_grad():
            clipped = torch.clamp(x + torch.clamp(dx, min=-eps, max=eps), min=0, max=1)
            dx += clipped - x - dx
    return x + dx


def check_spsa_args(eps, delta, lr, nb_iter, nb_sample, max_batch_size):
    return (
        validation.check_budget(eps, "eps"), check_number(delta, "delta", positive=True),
        check_number(lr, "lr", positive=True), validation.check_steps(nb_iter, "nb_iter"),
        check_count(nb_sample, "nb_sample"), check_count(max_batch_size, "max_batch_size"),
    )


def spsa(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 0.3, delta: float = 0.01,
         lr: float = 0.01, nb_iter: int = 1, nb_sample: int = 128, max_batch_size: int = 64, targeted: bool = False,
         backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """SPSA attack (Linf).

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C] (C >= 2).
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps: Linf budget. delta: the finite-difference step (> 0). lr: Adam's learning rate (> 0).
        nb_iter: Adam steps. nb_sample: random directions per gradient estimate (>= 1).
        max_batch_size: directions evaluated per pair of forward passes (>= 1).
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.SPSA.
    """
    eps, delta, lr, nb_iter, nb_sample, max_batch_size = check_spsa_args(eps, delta, lr, nb_iter, nb_sample,
                                                                         max_batch_size)
    return run_functional(spsa_loop, model, images, labels, engine=engine, eps=eps, delta=delta, lr=lr,
                          nb_iter=nb_iter, nb_sample=nb_sample, max_batch_size=max_batch_size, targeted=targeted)


class SPSA(Attack):
    r"""SPSA from 'Adversarial Risk and the Dangers of Evaluating Against Weak Attacks'
    [https://arxiv.org/abs/1802.05666].

    Distance measure: Linf. Gradient-free: each of nb_iter Adam steps uses the
    estimate mean_v (L(x + delta v) - L(x - delta v)) / (2 delta v) over nb_sample
    random +-1 directions v (each shared by the whole batch), L the margin loss; dx
    is then clipped to the eps-ball and [0, 1]. Output: x + dx. Each step costs
    2 * ceil(nb_sample / max_batch_size) forward passes of up to max_batch_size
    copies of the batch.

    Targeted mode follows the reference exactly: it never computes target labels;
    it descends the margin towards the labels passed to the call. Those are the
    targets with ``set_mode_targeted_by_label``; with the random, least-likely or
    function modes the reference (and so fastadv) pushes towards the true labels, and
    draws no random targets.

    Equivalence: bit-exact with torchattacks 3.5.1 SPSA (same seed, same device),
    default and targeted modes. No host sync per step. engine: precision and
    channels_last apply to the model; early_stop does not apply. The loss is the
    attribute ``loss_fn`` (MarginalLoss(reduction='none')), which, as in the reference,
    may be replaced by another per-sample loss(logits, labels).

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 0.3)
        delta (float): scaling parameter of SPSA. (Default: 0.01)
        lr (float): the learning rate of the Adam optimizer. (Default: 0.01)
        nb_iter (int): number of iterations of the attack. (Default: 1)
        nb_sample (int): number of samples for the SPSA gradient approximation. (Default: 128)
        max_batch_size (int): maximum number of samples evaluated at once. (Default: 64)
        backend, **engine: see fastadv.Attack.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.SPSA(model, eps=0.3)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 0.3, delta: float = 0.01, lr: float = 0.01, nb_iter: int = 1,
                 nb_sample: int = 128, max_batch_size: int = 64, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("SPSA", model, backend=backend, **engine)
        (self.eps, self.delta, self.lr, self.nb_iter, self.nb_sample,
         self.max_batch_size) = check_spsa_args(eps, delta, lr, nb_iter, nb_sample, max_batch_size)
        self.loss_fn = MarginalLoss(reduction="none")  # per sample; may be replaced, as the reference's
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        # The reference's targeted mode uses the given labels (see the class docstring).
        return spsa_loop(
            self.get_logits, x, y, eps=self.eps, delta=self.delta, lr=self.lr, nb_iter=self.nb_iter,
            nb_sample=self.nb_sample, max_batch_size=self.max_batch_size, targeted=self.targeted, engine=self.engine,
            loss_fn=self.loss_fn,
        )
