"""VMI-FGSM and VNI-FGSM (Wang & He, 2021): MI-FGSM (NI-FGSM) whose gradient is tuned by
the variance of gradients at N random neighbours of the previous iterate. Linf."""
from typing import Optional

import torch

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.momentum import Lookahead, VarianceTuned, check_count, momentum_iterations, refuse_early_stop
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack


def vmifgsm_loop(forward, x, y, *, eps, alpha, steps, decay=1.0, N=5, beta=3 / 2, nesterov=False, targeted=False,
                 backend=None, engine=EXACT, name="VMIFGSM"):
    """The VMI-FGSM iteration (VNI-FGSM when nesterov) on inputs the caller owns; returns the last iterate."""
    refuse_early_stop(engine, name, "its last logits are a random neighbour's, not the iterate's")
    fmt = validation.memory_format(x)
    like = x  # the neighbours' noise is drawn in the caller's layout, as the reference draws it
    x = engine.layout(x)
    ce = CrossEntropyGradient(forward, y, targeted, engine.precision)
    momentum = torch.zeros_like(x)
    at_iterate = Lookahead(ce, momentum, decay * alpha) if nesterov else ce
    adv = momentum_iterations(
        VarianceTuned(at_iterate, ce, like, N, eps * beta), x.clone(), x, momentum, eps=eps, alpha=alpha, steps=steps,
        decay=decay, backend=backend, engine=engine, model=forward,
        cuda_graph=False,  # the neighbours' draws: eager keeps the reference's random stream
    )
    return adv.contiguous(memory_format=fmt)


def _run(model, images, labels, *, eps, alpha, steps, decay, N, beta, nesterov, targeted, backend, engine, name):
    return run_functional(
        vmifgsm_loop, model, images, labels, engine=engine, eps=validation.check_budget(eps, "eps"),
        alpha=validation.check_budget(alpha, "alpha", positive=True), steps=validation.check_steps(steps),
        decay=validation.check_budget(decay, "decay"), N=check_count(N, "N"),
        beta=validation.check_budget(beta, "beta"),
        nesterov=nesterov, targeted=targeted, backend=backend, name=name,
    )


def vmifgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255, alpha: float = 2 / 255,
            steps: int = 10, decay: float = 1.0, N: int = 5, beta: float = 3 / 2, targeted: bool = False,
            backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Variance-tuned MI-FGSM.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size (floats). steps: iterations. decay: momentum factor.
        N: neighbours a step. beta: the neighbourhood's half-width in units of eps.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size; no early_stop).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.VMIFGSM
    on the 'torch' backend with the same torch seed.
    """
    return _run(model, images, labels, eps=eps, alpha=alpha, steps=steps, decay=decay, N=N, beta=beta, nesterov=False,
                targeted=targeted, backend=backend, engine=engine, name="VMIFGSM")


def vnifgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255, alpha: float = 2 / 255,
            steps: int = 10, decay: float = 1.0, N: int = 5, beta: float = 3 / 2, targeted: bool = False,
            backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Variance-tuned NI-FGSM: as vmifgsm, the gradient taken at the Nesterov look-ahead
    point (the neighbours stay around the iterate). Bit-exact with torchattacks.VNIFGSM
    on the 'torch' backend with the same torch seed."""
    return _run(model, images, labels, eps=eps, alpha=alpha, steps=steps, decay=decay, N=N, beta=beta, nesterov=True,
                targeted=targeted, backend=backend, engine=engine, name="VNIFGSM")


_DOC = r"""
    Distance measure: Linf. Each step takes the gradient g {where}, normalizes g + v by
    its mean absolute value and adds decay * momentum (MI-FGSM's update: sign step,
    projection, clip), then sets v to the mean gradient at N neighbours
    adv + U(-beta * eps, beta * eps) of the iterate before the step, minus g. The
    noise is drawn as the reference draws it (randn_like, then uniform_, in the
    images' layout, on their device's generator). No random start.

    Equivalence: bit-exact with torchattacks 3.5.1 {name} on the 'torch' backend (the
    CPU default) with the same seed, every targeted mode; on Triton the momentum step
    sums |grad| in another order (bound in the MIFGSM docstring). early_stop is
    refused (the last logits are a neighbour's); no CUDA graph (the draws stay eager).

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of iterations. (Default: 10)
        decay (float): momentum factor. (Default: 1.0)
        N (int): number of neighbours sampled a step. (Default: 5)
        beta (float): the neighbourhood's half-width in units of eps. (Default: 3/2)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Example::
        >>> attack = fastadv.{name}(model, eps=8/255, alpha=2/255, steps=10, decay=1.0, N=5, beta=3/2)
        >>> adv_images = attack(images, labels)
"""


class _VarianceTunedAttack(Attack):
    """VMIFGSM and VNIFGSM: the same attack with or without the look-ahead."""

    nesterov = False

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, decay=1.0, N=5, beta=3 / 2, *, backend=None,
                 **engine):
        super().__init__(type(self).__name__, model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.steps = validation.check_steps(steps)
        self.decay = validation.check_budget(decay, "decay")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.N = check_count(N, "N")
        self.beta = validation.check_budget(beta, "beta")
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return vmifgsm_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            decay=self.decay, N=self.N, beta=self.beta, nesterov=self.nesterov, targeted=self.targeted,
            backend=self.backend, engine=self.engine, name=self.attack,
        )


class VMIFGSM(_VarianceTunedAttack):
    __doc__ = r"""VMI-FGSM from 'Enhancing the Transferability of Adversarial Attacks through
    Variance Tuning' [https://arxiv.org/abs/2103.15571].
""" + _DOC.format(where="at the iterate", name="VMIFGSM")
    nesterov = False


class VNIFGSM(_VarianceTunedAttack):
    __doc__ = r"""VNI-FGSM from 'Enhancing the Transferability of Adversarial Attacks through
    Variance Tuning' [https://arxiv.org/abs/2103.15571].
""" + _DOC.format(where="at the Nesterov look-ahead point adv + decay * alpha * momentum", name="VNIFGSM")
    nesterov = True
