"""PI-FGSM++: PI-FGSM with a Gaussian-smoothed gradient and a scaled projection, for
targeted transfer attacks (Gao et al., 2021). Linf."""
import math
from typing import Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.arg_checks import check_number
from fastadv.attacks.pifgsm import check_patch_args, patch_loop
from fastadv.engine import run_functional
from fastadv.hints import EngineKwargs, Model, Unpack


def gaussian_kernel(size=3, nsig=3.0) -> torch.Tensor:
    """The normalized 2-D Gaussian [size, size]: the outer product of the standard normal
    density at linspace(-nsig, nsig, size), divided by its sum, in float64, then fp32."""
    t = torch.linspace(-nsig, nsig, size, dtype=torch.float64)
    density = torch.exp(-t**2 / 2.0) / math.sqrt(2 * math.pi)
    raw = torch.outer(density, density)
    return (raw / raw.sum()).float()


def smoothing_kernels(channels: int) -> torch.Tensor:
    """The gradient's smoothing kernels [channels, 1, 3, 3].

    For 3 channels, the reference's: it stacks the Gaussian for 3 channels and swaps
    the first and last axes (a TensorFlow layout carried over), so channel c's kernel
    holds column c of the Gaussian in every column. For any other channel count (where
    the reference crashes), the Gaussian itself for every channel.
    """
    g = gaussian_kernel()
    if channels == 3:
        return torch.stack([g, g, g]).transpose(0, 2).unsqueeze(1).contiguous()
    return g.expand(channels, 1, 3, 3).contiguous()


def _args(max_epsilon, num_iter_set, momentum, amplification, prob, project_factor):
    return (*check_patch_args(max_epsilon, num_iter_set, momentum, amplification, prob),
            check_number(project_factor, "project_factor"))


def pifgsmpp(model: Model, images: torch.Tensor, labels: torch.Tensor, *, max_epsilon: float = 16 / 255,
             num_iter_set: int = 10, momentum: float = 1.0, amplification: float = 10.0, prob: float = 0.7,
             project_factor: float = 0.8, targeted: bool = False, backend: Optional[str] = None,
             **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Patch-wise++ iterative FGSM.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, C, H, W] floats in [0, 1] (any number of channels).
        labels: [N] class indices; with targeted=True the targets (the step descends their loss).
        max_epsilon, num_iter_set, momentum, amplification, prob: as fastadv.functional.pifgsm.
        project_factor: the projection's step is the main step times this (>= 0).
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.PIFGSMPP (3 channels).
    """
    eps, n_iter, _, amp, _, factor = _args(max_epsilon, num_iter_set, momentum, amplification, prob, project_factor)
    return run_functional(
        patch_loop, model, images, labels, engine=engine, max_epsilon=eps, num_iter_set=n_iter, amplification=amp,
        project_factor=factor, smooth=smoothing_kernels, accumulate_projection=False, targeted=targeted,
        name="PIFGSMPP", backend=backend,
    )


class PIFGSMPP(Attack):
    r"""PI-FGSM++ from 'Patch-wise++ Perturbation for Adversarial Targeted Attacks'
    [https://arxiv.org/abs/2012.15503].

    Distance measure: Linf. As PIFGSM, with the gradient first convolved with a
    3x3 Gaussian (3 samples over +-3 sigma), the projection's step scaled by
    project_factor, and the projection not added back into the amplification.
    For 3-channel images the smoothing kernels are the reference's, which are not the
    Gaussian: channel c's kernel repeats the Gaussian's column c across its columns
    (an axis swap in the reference); for other channel counts, where the reference
    crashes, every channel is smoothed with the Gaussian itself.

    Targeted mode follows the reference exactly: it never computes target labels;
    it descends the cross-entropy of the labels passed to the call. Those are the
    targets with ``set_mode_targeted_by_label``; with the random, least-likely or
    function modes the reference (and so fastadv) descends the loss of the true
    labels, and draws no random targets.

    Equivalence: bit-exact with torchattacks 3.5.1 PIFGSMPP (CPU, fp32), default
    and targeted modes. The reference's kernels assume 3 channels and crash on any
    other count; fastadv works for any channel count. No parameter ``.grad`` is
    filled (the reference calls ``loss.backward()``). ``momentum`` and ``prob`` are
    stored and unused, as in the reference. Images must be [N, C, H, W].

    Arguments:
        model (nn.Module): model to attack.
        max_epsilon (float): maximum perturbation. (Default: 16/255)
        num_iter_set (int): number of iterations. (Default: 10)
        momentum (float): unused (reference). (Default: 1.0)
        amplification (float): factor on the step size. (Default: 10.0)
        prob (float): unused (reference). (Default: 0.7)
        project_factor (float): weight of the projection term. (Default: 0.8)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.PIFGSMPP(model, max_epsilon=16/255, num_iter_set=10)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, max_epsilon: float = 16 / 255, num_iter_set: int = 10, momentum: float = 1.0,
                 amplification: float = 10.0, prob: float = 0.7, project_factor: float = 0.8, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("PIFGSMPP", model, backend=backend, **engine)
        (self.max_epsilon, self.num_iter_set, self.momentum, self.amplification, self.prob,
         self.project_factor) = _args(max_epsilon, num_iter_set, momentum, amplification, prob, project_factor)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        # The reference's targeted mode uses the given labels (see the class docstring).
        return patch_loop(
            self.get_logits, x, y, max_epsilon=self.max_epsilon, num_iter_set=self.num_iter_set,
            amplification=self.amplification, project_factor=self.project_factor, smooth=smoothing_kernels,
            accumulate_projection=False, targeted=self.targeted, name="PIFGSMPP", backend=self.backend,
            engine=self.engine,
        )
