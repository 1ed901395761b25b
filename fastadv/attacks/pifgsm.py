"""PI-FGSM: patch-wise iterative FGSM with an amplified step whose overflow is
projected onto the neighbouring pixels (Gao et al., 2020). Linf.

The loop here is shared with PI-FGSM++ (fastadv.attacks.pifgsmpp), which also
smooths the gradient with a 3x3 Gaussian and scales the projection.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import loop, validation
from fastadv.attack import Attack
from fastadv.attacks.arg_checks import check_count, check_image_batch, check_number
from fastadv.backend import resolve
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack


def project_kernel(channels: int, dtype, device) -> torch.Tensor:
    """The 3x3 projection kernel per channel: 1/8 on the eight neighbours, 0 in the centre."""
    k = torch.full((channels, 1, 3, 3), 1 / 8, dtype=dtype, device=device)
    k[:, :, 1, 1] = 0.0
    return k


def patch_update(adv, g, *, lo, hi, amplification, kernel, smooth, step_size, gamma, eps, accumulate_projection,
                 descend, out=None):
    """One patch-wise step, in the reference's order of operations.

    g is the cross-entropy gradient (of -CE when descend: targeted PI-FGSM++, whose
    reference moves against +CE's sign while accumulating it). amplification is
    updated in place. The sign step and the projection are exact multiples of the
    step sizes, so computing them in g's buffer changes no bit.
    """
    channels = adv.shape[1]
    if smooth is not None:
        g = F.conv2d(g, smooth, padding=1, groups=channels)
    step = g.sign_().mul_(step_size)  # step_size * sign(grad): exact
    if descend:
        amplification.sub_(step)  # the reference adds step_size * sign(+CE's gradient) = -step
    else:
        amplification.add_(step)
    cut = amplification.abs().sub_(eps).clamp_(0, 10000.0).mul_(amplification.sign())
    projection = F.conv2d(cut, kernel, padding=1, groups=channels).sign_().mul_(gamma)
    if accumulate_projection:
        amplification.add_(projection)
    nxt = step.add_(adv)  # adv + step == step + adv bit for bit
    nxt = nxt.sub_(projection) if descend else nxt.add_(projection)
    nxt = torch.clamp(nxt, min=lo, max=hi, out=nxt)
    return nxt if out is None else out.copy_(nxt)


def patch_loop(forward, x, y, *, max_epsilon, num_iter_set, amplification, project_factor=1.0, smooth=None,
               accumulate_projection=True, targeted=False, name="PIFGSM", backend=None, engine=EXACT):
    """The PI-FGSM(++) iteration on inputs the caller owns; returns the last iterate.

    smooth (PI-FGSM++): channels -> the gradient's smoothing kernels [C, 1, 3, 3].
    The state (iterate, amplification) stays in the caller's memory layout so the
    projection's convolution sums in the reference's order; channels_last applies
    to the model's input only.
    """
    check_image_batch(x, name)
    fmt = validation.memory_format(x)
    eps = max_epsilon
    alpha_beta = eps / num_iter_set * amplification
    lo = torch.clamp(x - eps, min=0, max=1)
    hi = torch.clamp(x + eps, min=0, max=1)
    model_forward = forward if not engine.channels_last else (lambda a: forward(engine.layout(a)))
    gradient = CrossEntropyGradient(model_forward, y, targeted, engine.precision)

    def grad(adv):
        return gradient(adv).contiguous(memory_format=fmt)

    grad.succeeded, grad.keep = gradient.succeeded, gradient.keep
    kernel = project_kernel(x.shape[1], x.dtype, x.device)
    smooth = None if smooth is None else smooth(x.shape[1]).to(x.device, x.dtype)

    def update(adv, g, lo, hi, amplification, out=None):
        return patch_update(
            adv, g, lo=lo, hi=hi, amplification=amplification, kernel=kernel, smooth=smooth, step_size=alpha_beta,
            gamma=alpha_beta * project_factor, eps=eps, accumulate_projection=accumulate_projection,
            descend=targeted, out=out,
        )

    state = {"lo": lo, "hi": hi, "amplification": torch.zeros_like(x)}
    return loop.run(
        update, grad, x.clone(), num_iter_set, state, early_stop=engine.early_stop,
        cuda_graph=engine.use_graph(x, resolve(backend, x.device)), model=forward,
    )


def check_patch_args(max_epsilon, num_iter_set, momentum, amplification, prob):
    return (
        check_number(max_epsilon, "max_epsilon"), check_count(num_iter_set, "num_iter_set"),
        check_number(momentum, "momentum"), check_number(amplification, "amplification"),
        check_number(prob, "prob", upper=1.0),
    )


def pifgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, max_epsilon: float = 16 / 255,
           num_iter_set: int = 10, momentum: float = 1.0, amplification: float = 10.0, prob: float = 0.7,
           backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Patch-wise iterative FGSM (untargeted).

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, C, H, W] floats in [0, 1] (any number of channels). labels: [N] class indices.
        max_epsilon: Linf budget. num_iter_set: iterations (>= 1); the step is
            max_epsilon / num_iter_set * amplification. momentum, prob: unused, as in
            the reference (validated: >= 0, prob <= 1).
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.PIFGSM (3 channels).
    """
    eps, n_iter, _, amp, _ = check_patch_args(max_epsilon, num_iter_set, momentum, amplification, prob)
    return run_functional(patch_loop, model, images, labels, engine=engine, max_epsilon=eps, num_iter_set=n_iter,
                          amplification=amp, backend=backend)


class PIFGSM(Attack):
    r"""PI-FGSM from 'Patch-wise Attack for Fooling Deep Neural Network' [https://arxiv.org/abs/2007.06765].

    Distance measure: Linf. Each step: amplification += beta * sign(grad) with
    beta = max_epsilon / num_iter_set * amplification; the part of |amplification|
    above max_epsilon is spread onto the 8 neighbours by a 3x3 convolution and
    projection = beta * sign(that); amplification += projection; adv += beta * sign(grad)
    + projection, clipped to the eps-ball and [0, 1]. No random start; default
    (untargeted) mode only, as the reference.

    Equivalence: bit-exact with torchattacks 3.5.1 PIFGSM (CPU, fp32, same model).
    The reference builds its convolution for exactly 3 channels and crashes on any
    other count; fastadv works for any channel count (one kernel per channel).
    Differences kept on purpose: no parameter ``.grad`` is filled (the reference
    calls ``loss.backward()`` on the model). ``momentum`` and ``prob`` are stored
    and unused, as in the reference. Images must be [N, C, H, W].

    Arguments:
        model (nn.Module): model to attack.
        max_epsilon (float): maximum perturbation. (Default: 16/255)
        num_iter_set (int): number of iterations. (Default: 10)
        momentum (float): unused (reference). (Default: 1.0)
        amplification (float): factor on the step size. (Default: 10.0)
        prob (float): unused (reference). (Default: 0.7)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.PIFGSM(model, max_epsilon=16/255, num_iter_set=10)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, max_epsilon: float = 16 / 255, num_iter_set: int = 10, momentum: float = 1.0,
                 amplification: float = 10.0, prob: float = 0.7, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("PIFGSM", model, backend=backend, **engine)
        (self.max_epsilon, self.num_iter_set, self.momentum, self.amplification,
         self.prob) = check_patch_args(max_epsilon, num_iter_set, momentum, amplification, prob)
        self.supported_mode = ["default"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return patch_loop(
            self.get_logits, x, y, max_epsilon=self.max_epsilon, num_iter_set=self.num_iter_set,
            amplification=self.amplification, backend=self.backend, engine=self.engine,
        )
