"""DI-FGSM (input diversity, Xie et al., 2019) and TI-FGSM (translation invariance, Dong
et al., 2019): MI-FGSM whose gradient is taken through a random resize-and-pad of the
input, smoothed by a fixed kernel for TI-FGSM. Linf."""
import numbers
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.momentum import momentum_iterations, refuse_early_stop
from fastadv.attacks.pgd import uniform_start
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack

KERNELS = ("gaussian", "linear", "uniform")


def check_resize_rate(resize_rate):
    rate = validation.check_budget(resize_rate, "resize_rate", positive=True)
    if rate == 1:
        raise ValueError("resize_rate must differ from 1 (input diversity draws a size between W and W * resize_rate)")
    return rate


def check_probability(p, name):
    p = validation.check_budget(p, name)
    if p > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {p}")
    return p


def diversity_sizes(width: int, resize_rate: float):
    """(low, high): the resized side is drawn in [low, high) and the image padded to high."""
    resized = int(width * resize_rate)
    low, high = (resized, width) if resize_rate < 1 else (width, resized)
    if low < 1 or low >= high:
        raise ValueError(
            f"resize_rate={resize_rate} leaves no size to draw for {width}-pixel images (the side is drawn in "
            f"[{low}, {high})): choose a rate further from 1"
        )
    return low, high


class InputDiversity:
    """The reference's input_diversity, drawing from the CPU generator as it does (a side in
    [low, high), the top then the left padding, then one uniform against diversity_prob).
    The draws are CPU tensors: no device sync. Callable on the attack's iterate."""

    def __init__(self, forward, resize_rate: float, diversity_prob: float):
        self.forward = forward
        self.resize_rate = resize_rate
        self.diversity_prob = diversity_prob

    def transform(self, x):
        low, high = diversity_sizes(x.shape[-1], self.resize_rate)
        side = int(torch.randint(low=low, high=high, size=(1,), dtype=torch.int32))
        rem = high - side
        top = int(torch.randint(low=0, high=rem, size=(1,), dtype=torch.int32))
        left = int(torch.randint(low=0, high=rem, size=(1,), dtype=torch.int32))
        if torch.rand(1) < self.diversity_prob:
            resized = F.interpolate(x, size=[side, side], mode="bilinear", align_corners=False)
            return F.pad(resized, [left, rem - left, top, rem - top], value=0)
        return x

    def __call__(self, x):
        diverse = self.transform(x)
        if diverse.shape == x.shape:
            return self.forward(diverse)
        try:
            return self.forward(diverse)
        except RuntimeError as exc:
            h, w = x.shape[-2:]
            advice = ("use resize_rate < 1 for a model with a fixed input size" if h == w else
                      "input diversity (as torchattacks') resizes non-square images to squares of their width, "
                      "so the model must accept other input sizes")
            raise ValueError(
                f"input diversity with resize_rate={self.resize_rate} feeds the model {diverse.shape[-2]}x"
                f"{diverse.shape[-1]} images (from {h}x{w}), which it does not accept; {advice} "
                f"({type(exc).__name__}: {exc})"
            ) from exc


def check_image_shape(x, name):
    if x.dim() != 4:
        raise ValueError(f"{name} needs images of shape [N, C, H, W], got shape {tuple(x.shape)}")


# -- TI-FGSM's smoothing kernels ------------------------------------------------------------------


def check_kernel(kernel_name, len_kernel, nsig):
    if kernel_name not in KERNELS:
        raise ValueError(f"kernel_name must be one of {list(KERNELS)}, got {kernel_name!r}")
    if isinstance(len_kernel, bool) or not isinstance(len_kernel, numbers.Integral):
        raise TypeError(f"len_kernel must be an int, got {type(len_kernel).__name__}")
    if len_kernel < 1 or len_kernel % 2 == 0:
        raise ValueError(f"len_kernel must be a positive odd int (a centred kernel), got {len_kernel}")
    nsig = validation.check_budget(nsig, "nsig", positive=True)
    return kernel_name, int(len_kernel), nsig


def smoothing_kernel(kernel_name: str, length: int, nsig: float) -> torch.Tensor:
    """The [1, 1, length, length] fp32 kernel, computed in float64 as the reference does
    (its Gaussian is scipy's norm.pdf: exp(-x**2 / 2) / sqrt(2 pi)), normalized to sum 1."""
    if kernel_name == "uniform":
        kernel = np.ones((length, length)) * 1.0 / (length * length)
    else:
        if kernel_name == "gaussian":
            t = np.linspace(-nsig, nsig, length)
            k1 = np.exp(-(t**2) / 2.0) / np.sqrt(2 * np.pi)
        else:
            k1 = 1 - np.abs(np.linspace((-length + 1) / 2, (length - 1) / 2, length) / (length + 1) * 2)
        raw = np.outer(k1, k1)
        kernel = raw / raw.sum()
    return torch.from_numpy(kernel.astype(np.float32)).reshape(1, 1, length, length)


class SmoothedGradient:
    """The gradient convolved per channel with the kernel ('same' padding), as the
    reference's F.conv2d(grad, kernel, padding='same', groups=3), for any channel count."""

    def __init__(self, gradient, kernel: torch.Tensor):
        self.gradient = gradient
        self.kernel = kernel.reshape(1, 1, *kernel.shape[-2:])

    def __call__(self, adv):
        g = self.gradient(adv)
        c = g.shape[1]
        weight = self.kernel.to(g.device, g.dtype).repeat(c, 1, 1, 1)
        return F.conv2d(g, weight, stride=1, padding="same", groups=c)


# -- the loop -------------------------------------------------------------------------------------


def difgsm_loop(forward, x, y, *, eps, alpha, steps, decay=0.0, resize_rate=0.9, diversity_prob=0.5,
                random_start=False, kernel=None, targeted=False, backend=None, engine=EXACT, name="DIFGSM"):
    """The DI-FGSM iteration (TI-FGSM with a kernel) on inputs the caller owns; returns the last iterate."""
    check_image_shape(x, name)
    refuse_early_stop(engine, name, "its gradients are taken at randomly resized inputs, not at the iterate")
    diversity_sizes(x.shape[-1], resize_rate)  # a bad rate fails before the first step
    fmt = validation.memory_format(x)
    adv = uniform_start(x, eps, backend) if random_start else x.clone()  # noise in the caller's layout
    adv, x = engine.layout(adv), engine.layout(x)
    grad = CrossEntropyGradient(InputDiversity(forward, resize_rate, diversity_prob), y, targeted, engine.precision)
    if kernel is not None:
        grad = SmoothedGradient(grad, kernel)
    adv = momentum_iterations(
        grad, adv, x, torch.zeros_like(x), eps=eps, alpha=alpha, steps=steps, decay=decay, backend=backend,
        engine=engine, model=forward, cuda_graph=False,  # host-drawn sizes change the graph every step
    )
    return adv.contiguous(memory_format=fmt)


def difgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
           steps: int = 10, decay: float = 0.0, resize_rate: float = 0.9, diversity_prob: float = 0.5,
           random_start: bool = False, targeted: bool = False, backend: Optional[str] = None,
           **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """DI-FGSM: momentum sign steps on gradients through a random resize-and-pad.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, C, H, W] floats in [0, 1] (any H and W). labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps, decay, resize_rate, diversity_prob, random_start: as DIFGSM.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size; no early_stop).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.DIFGSM
    for float eps and alpha (seed torch's CPU generator: the diversity draws from it).
    """
    return run_functional(
        difgsm_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), decay=validation.check_budget(decay, "decay"),
        resize_rate=check_resize_rate(resize_rate), diversity_prob=check_probability(diversity_prob, "diversity_prob"),
        random_start=random_start, targeted=targeted, backend=backend,
    )


def tifgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
           steps: int = 10, decay: float = 0.0, kernel_name: Literal["gaussian", "linear", "uniform"] = "gaussian",
           len_kernel: int = 15, nsig: float = 3, resize_rate: float = 0.9, diversity_prob: float = 0.5,
           random_start: bool = False, targeted: bool = False, backend: Optional[str] = None,
           **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """TI-FGSM: DI-FGSM whose gradient is smoothed per channel by a gaussian, linear or uniform kernel.

    Arguments: as difgsm, plus kernel_name, len_kernel (odd) and nsig.
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.TIFGSM
    on 3-channel images (any channel count works here; the reference's needs 3).
    """
    kernel = smoothing_kernel(*check_kernel(kernel_name, len_kernel, nsig))
    return run_functional(
        difgsm_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), decay=validation.check_budget(decay, "decay"),
        resize_rate=check_resize_rate(resize_rate), diversity_prob=check_probability(diversity_prob, "diversity_prob"),
        random_start=random_start, kernel=kernel, targeted=targeted, backend=backend, name="TIFGSM",
    )


_SHARED_DOC = """
    Randomness: each step draws, from torch's CPU generator as the reference does, a
    side in [int(W * resize_rate), W) (or [W, int(W * resize_rate)) for a rate above
    1), the top and left padding, and one uniform: below diversity_prob the model
    sees the image bilinearly resized to that side and zero-padded back to the upper
    bound, else the image itself. The draws are CPU tensors, so no device sync; the
    shapes change per step, so no CUDA graph.

    Images are [N, C, H, W] of any size. As in the reference, the sizes come from the
    width W alone: a diverse input is a square of side W (rate below 1) or
    int(W * resize_rate) (above 1), so a non-square image reaches the model as a
    square whenever the diversity applies (a model that pools adaptively takes both).

    Limitations, where the reference crashes or misbehaves: resize_rate must leave
    at least one size to draw (a rate of 1 raises); a model with a fixed input size
    that the diverse input does not fit (a rate above 1, or non-square images)
    raises a ValueError that says so. early_stop is refused (the logits are those of
    the diverse input).
"""


class _DiversityAttack(Attack):
    """DIFGSM and TIFGSM: the attributes they share (in the reference's order) and the forward."""

    def _set_common(self, eps, alpha, steps, decay, resize_rate, diversity_prob, random_start):
        self.eps = validation.check_budget(eps, "eps")
        self.steps = validation.check_steps(steps)
        self.decay = validation.check_budget(decay, "decay")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.resize_rate = check_resize_rate(resize_rate)
        self.diversity_prob = check_probability(diversity_prob, "diversity_prob")
        self.random_start = random_start

    def _kernel(self):
        return None

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return difgsm_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            decay=self.decay, resize_rate=self.resize_rate, diversity_prob=self.diversity_prob,
            random_start=self.random_start, kernel=self._kernel(), targeted=self.targeted, backend=self.backend,
            engine=self.engine, name=self.attack,
        )


class DIFGSM(_DiversityAttack):
    __doc__ = r"""DI2-FGSM from 'Improving Transferability of Adversarial Examples with Input
    Diversity' [https://arxiv.org/abs/1803.06978].

    Distance measure: Linf. MI-FGSM (decay 0 by default: plain iterative FGSM) whose
    gradient is taken through a random resize-and-pad of the iterate; optional
    uniform start. Equivalence: bit-exact with torchattacks 3.5.1 DIFGSM on the
    'torch' backend (the CPU default) with the same torch seed, every targeted mode;
    on Triton the momentum step sums |grad| in another order (bound in the MIFGSM
    docstring).
""" + _SHARED_DOC + r"""
    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of iterations. (Default: 10)
        decay (float): momentum factor. (Default: 0.0)
        resize_rate (float): resize factor of the input diversity. (Default: 0.9)
        diversity_prob (float): probability of applying the input diversity. (Default: 0.5)
        random_start (bool): start from a uniform point in the eps-ball. (Default: False)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Example::
        >>> attack = fastadv.DIFGSM(model, eps=8/255, alpha=2/255, steps=10, decay=0.0, resize_rate=0.9)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 decay: float = 0.0, resize_rate: float = 0.9, diversity_prob: float = 0.5, random_start: bool = False,
                 *, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("DIFGSM", model, backend=backend, **engine)
        self._set_common(eps, alpha, steps, decay, resize_rate, diversity_prob, random_start)
        self.supported_mode = ["default", "targeted"]


class TIFGSM(_DiversityAttack):
    __doc__ = r"""TI-FGSM from 'Evading Defenses to Transferable Adversarial Examples by
    Translation-Invariant Attacks' [https://arxiv.org/abs/1904.02884].

    Distance measure: Linf. DI-FGSM whose gradient is convolved, per channel, with a
    gaussian (nsig standard deviations across len_kernel taps), linear or uniform
    kernel ('same' zero padding) before the momentum step.

    Equivalence: bit-exact with torchattacks 3.5.1 TIFGSM on 3-channel images, the
    'torch' backend (the CPU default) and the same torch seed, every targeted mode.
    The reference convolves with groups=3 and crashes on other channel counts; here
    the kernel is applied to each channel, whatever their number. Its fp32 kernel
    also crashes on fp16/bf16 gradients; here the kernel is cast to their dtype.
    len_kernel must be odd (a centred kernel); a kernel larger than the image is
    applied with the same zero padding as the reference's.
""" + _SHARED_DOC + r"""
    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of iterations. (Default: 10)
        decay (float): momentum factor. (Default: 0.0)
        kernel_name (str): 'gaussian', 'linear' or 'uniform'. (Default: 'gaussian')
        len_kernel (int): kernel side, odd. (Default: 15)
        nsig (float): the gaussian's half-width in standard deviations. (Default: 3)
        resize_rate (float): resize factor of the input diversity. (Default: 0.9)
        diversity_prob (float): probability of applying the input diversity. (Default: 0.5)
        random_start (bool): start from a uniform point in the eps-ball. (Default: False)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Example::
        >>> attack = fastadv.TIFGSM(model, eps=8/255, alpha=2/255, steps=10, decay=1.0, diversity_prob=0.7)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 decay: float = 0.0, kernel_name: Literal["gaussian", "linear", "uniform"] = "gaussian",
                 len_kernel: int = 15, nsig: float = 3, resize_rate: float = 0.9, diversity_prob: float = 0.5,
                 random_start: bool = False, *, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("TIFGSM", model, backend=backend, **engine)
        self._set_common(eps, alpha, steps, decay, resize_rate, diversity_prob, random_start)
        self.kernel_name, self.len_kernel, checked_nsig = check_kernel(kernel_name, len_kernel, nsig)
        self.nsig = nsig  # as given, as the reference stores it (its repr shows 3, not 3.0)
        # [3, 1, L, L] as the reference stores it (here applied to every channel, whatever their number)
        self.stacked_kernel = smoothing_kernel(self.kernel_name, self.len_kernel, checked_nsig).repeat(3, 1, 1, 1)
        self.supported_mode = ["default", "targeted"]

    def _kernel(self):
        return self.stacked_kernel[0, 0]
