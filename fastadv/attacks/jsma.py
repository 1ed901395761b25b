"""JSMA: the Jacobian-based saliency map attack (Papernot et al., 2016), L0."""
import math
import numbers
from typing import Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.cw import engine_forward
from fastadv.engine import EXACT, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack
from fastadv.retained import SharedForward
from fastadv.validation import check_logits

SALIENCY_BLOCK = 1 << 22  # saliency entries computed at once (16 MiB per fp32 temporary)


def check_jsma_args(theta, gamma):
    """theta: a nonzero number in [-1, 1]; gamma: a fraction in (0, 1]. Errors name the argument."""
    for name, value in (("theta", theta), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
    if theta == 0 or abs(theta) > 1:
        raise ValueError(f"theta must be a nonzero number in [-1, 1] (the change per chosen pixel), got {theta}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1] (the largest fraction of pixels changed), got {gamma}")
    return theta, gamma


def jacobian(shared):
    """[C, F] float32: row i is the gradient of logits[0, i] with respect to x (one image,
    a SharedForward), one backward per class as the reference."""
    n_classes = shared.output.shape[1]
    rows = [shared.grad(lambda z: z[0, i], retain=i + 1 < n_classes).flatten() for i in range(n_classes)]
    return torch.stack(rows).float()


def saliency_pair(jac, target, increasing, domain):
    """The two features (p, q) of largest saliency, as the reference picks them.

    Features outside the search domain are pushed out of reach by 2 * max|gradient|;
    entry (p, q) is alpha * |beta| where alpha = t_p + t_q (target class) and beta =
    o_p + o_q (sum of the other classes), kept where alpha > 0 and beta < 0 (alpha < 0
    and beta > 0 when decreasing) and p != q, else 0. The argmax is the first maximum in
    row-major order, found block by block so memory stays bounded for large images.
    As in the reference, a decreasing attack (theta < 0) scores its candidates
    alpha * |beta| < 0, below the zeros, so it picks (0, 0) (the first zero) every time.
    """
    n = jac.shape[1]
    others = jac.sum(0) - jac[target]
    off = (2.0 if increasing else -2.0) * (domain.float() == 0).float()
    t = jac[target] - off * torch.max(torch.abs(jac[target]))
    o = others + off * torch.max(torch.abs(others))
    cols = torch.arange(n, device=jac.device)
    best, best_idx = None, None
    rows = max(1, SALIENCY_BLOCK // n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        alpha = t[start:stop, None] + t[None, :]
        beta = o[start:stop, None] + o[None, :]
        keep = (alpha > 0) & (beta < 0) if increasing else (alpha < 0) & (beta > 0)
        keep &= torch.arange(start, stop, device=jac.device)[:, None] != cols[None, :]
        score = (alpha * torch.abs(beta) * keep.float()).flatten()
        idx = torch.argmax(score)
        value = score[idx]
        idx = idx + start * n
        if best is None:
            best, best_idx = value, idx
        else:  # the first maximum wins; NaN beats numbers, as torch.argmax
            take = (value > best) | (value.isnan() & ~best.isnan())
            best, best_idx = torch.where(take, value, best), torch.where(take, idx, best_idx)
    p = torch.div(best_idx, n, rounding_mode="floor")
    return p, best_idx - p * n


def jsma_single(forward, image, target, theta, gamma):
    """JSMA on one image [1, ...] towards target (a 0-dim class index)."""
    n_features = image[0].numel()
    max_iters = math.ceil(n_features * gamma / 2.0)
    increasing = theta > 0
    domain = (image < 0.99 if increasing else image > 0.01).flatten()
    adv = image
    for it in range(max_iters + 1):
        xg = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            shared = SharedForward(forward, xg)
            logits = shared.output
        # The reference's loop test: one host sync per iteration.
        if it == max_iters or bool(torch.argmax(logits.detach(), 1)[0] == target) or not bool(domain.any()):
            break
        with torch.enable_grad():
            jac = jacobian(shared)
        p, q = saliency_pair(jac, target, increasing, domain)
        flat = adv.detach().flatten().clone()
        flat[p] += theta  # p == q (nothing salient) adds theta twice, as the reference
        flat[q] += theta
        adv = torch.clamp(flat, min=0.0, max=1.0).view_as(image)
        domain[p] = False
        domain[q] = False
        if it + 1 == max_iters:
            break
    return adv.detach()


def jsma_loop(forward, x, y, *, theta=1.0, gamma=0.1, targeted=False, engine=EXACT):
    """JSMA image by image on inputs the caller owns; y are the targets when targeted,
    else the true labels (each image then targets (label + 1) mod C).

    One image at a time, as the reference: the model's kernels round differently for a
    batch than for one image (~1e-6 on digits models), which can flip the saliency argmax,
    so batching would not keep the reference's bits. Per iteration one forward (the
    reference runs two) and C backwards, with respect to the image only.
    """
    fmt = validation.memory_format(x)
    x = x.contiguous()
    forward = engine_forward(forward, engine)
    with torch.no_grad():
        first = forward(x[:1])
    check_logits(first.expand(x.shape[0], -1), y, n_classes_min=2)
    targets = y if targeted else (y + 1) % first.shape[1]
    adv = torch.cat([jsma_single(forward, x[i:i + 1], targets[i], theta, gamma) for i in range(x.shape[0])])
    return torch.clamp(adv, min=0, max=1).contiguous(memory_format=fmt)


def jsma(model: Model, images: torch.Tensor, labels: torch.Tensor, *, theta: float = 1.0, gamma: float = 0.1,
         targeted: bool = False, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """JSMA, as torchattacks.JSMA: see fastadv.JSMA.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices: the targets when
            targeted, else the true labels (the target is then (label + 1) mod C).
        theta (nonzero, in [-1, 1]), gamma (in (0, 1]): see fastadv.JSMA.
        **engine: fastadv.engine.EngineOptions: precision, channels_last, batch_size.
    Returns the adversarial images [N, ...] on the model's device.
    """
    theta, gamma = check_jsma_args(theta, gamma)
    return run_functional(jsma_loop, model, images, labels, engine=engine, theta=theta, gamma=gamma, targeted=targeted)


class JSMA(Attack):
    r"""Jacobian Saliency Map Attack in the paper 'The Limitations of Deep Learning in
    Adversarial Settings' [https://arxiv.org/abs/1511.07528v1].

    Distance measure: L0. Each iteration changes the two pixels of largest saliency
    towards the target class by theta (then clips to [0, 1]), until the model predicts
    the target, ceil(gamma * F / 2) iterations have run (F: values per image), or no
    pixel is left to change.

    Equivalence: bit-exact with torchattacks 3.5.1 JSMA on CPU in fp32, default and
    targeted modes, for 10-class models. Runs one image at a time like the reference
    (batching would change the model's rounding, hence possibly the chosen pixels), but with
    one forward per iteration instead of two, no parameter gradients, and a saliency map
    built in bounded blocks (the reference's F x F map is issue #187). One host sync per
    iteration (the reference's stopping test).

    Differences from the reference:
      - default (untargeted) mode targets (label + 1) mod C, for any number of classes C;
        the reference uses mod 10 (an error for labels C - 1 when C < 10, never targets
        classes >= 10 when C > 10); the same for C = 10;
      - channels_last images work (the reference's .view fails on them);
      - the model parameters' .grad are never written.
    Reproduced: with theta < 0 the reference's saliency scores every candidate below zero,
    so it always picks pixel 0 (see saliency_pair).

    Arguments:
        model (nn.Module): model to attack.
        theta (float): change per chosen pixel, nonzero, in [-1, 1]; > 0 increases pixels. (Default: 1.0)
        gamma (float): largest fraction of pixels to change, in (0, 1]. (Default: 0.1)
        backend (str, keyword-only): accepted for API uniformity; JSMA has no kernels.
        **engine (keyword-only): see fastadv.Attack; precision and channels_last apply
            to the model, batch_size chunks the batch, early_stop does not apply.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.JSMA(model, theta=1.0, gamma=0.1)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, theta: float = 1.0, gamma: float = 0.1, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("JSMA", model, backend=backend, **engine)
        self.theta, self.gamma = check_jsma_args(theta, gamma)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return jsma_loop(
            self.get_logits, x, self._targets(x, y), theta=self.theta, gamma=self.gamma, targeted=self.targeted,
            engine=self.engine,
        )
