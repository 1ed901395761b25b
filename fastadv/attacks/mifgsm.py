"""MI-FGSM: iterative sign steps on an accumulated, L1-normalized gradient (Dong et al., 2018). Linf."""
from typing import Optional

import torch

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.momentum import momentum_iterations
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def mifgsm_loop(forward, x, y, *, eps, alpha, steps, decay=1.0, targeted=False, backend=None, engine=EXACT):
    """The MI-FGSM iteration on inputs the caller owns; returns the last iterate."""
    fmt = validation.memory_format(x)
    x = engine.layout(x)
    grad = CrossEntropyGradient(forward, y, targeted, engine.precision)
    adv = momentum_iterations(
        grad, x.clone(), x, torch.zeros_like(x), eps=eps, alpha=alpha, steps=steps, decay=decay, backend=backend,
        engine=engine, model=forward,
    )
    return adv.contiguous(memory_format=fmt)


def mifgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
           steps: int = 10, decay: float = 1.0, targeted: bool = False, backend: Optional[str] = None,
           **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Momentum iterative FGSM.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps: iterations. decay: momentum decay factor (float >= 0).
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. The 'torch' backend is
    bit-exact with torchattacks.MIFGSM (float eps and alpha); the Triton kernel sums
    |grad| in another order (bound in the MIFGSM class docstring).
    """
    return run_functional(
        mifgsm_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), decay=validation.check_budget(decay, "decay"),
        targeted=targeted, backend=backend,
    )


class DecayedMomentumAttack(Attack):
    """MIFGSM's constructor and call, shared by the attacks with its signature (MIFGSM, NIFGSM);
    a subclass names itself and its loop (name, loop)."""

    name = None
    loop = None

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, decay=1.0, *, backend=None, **engine):
        super().__init__(self.name, model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.steps = validation.check_steps(steps)
        self.decay = validation.check_budget(decay, "decay")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return type(self).loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            decay=self.decay, targeted=self.targeted, backend=self.backend, engine=self.engine,
        )


class MIFGSM(DecayedMomentumAttack):
    r"""MI-FGSM from 'Boosting Adversarial Attacks with Momentum' [https://arxiv.org/abs/1710.06081].

    Distance measure: Linf. Each step: g = grad / mean(|grad|) per sample,
    momentum = g + decay * momentum, adv += alpha * sign(momentum), then projection
    onto the eps-ball and [0, 1]. No random start.

    Equivalence: bit-exact with torchattacks 3.5.1 MIFGSM on the 'torch' backend
    (the CPU default), every targeted mode. The Triton kernel sums |grad| in fp32 in
    another order than torch.mean: per step its momentum is within
    rtol * (|grad / mean| + |momentum|) of the reference's, rtol = 2**-20 (fp32),
    2**-8 (fp16), 2**-5 (bf16), and the iterate is bit-equal wherever that does not
    flip sign(momentum) (tests/test_zoo_linf.py).

    Reference behaviour kept: an all-zero gradient gives mean 0 and NaN momentum;
    sign(NaN) = 0, so that sample stops moving for the remaining steps. The output
    never holds NaN.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps. (Default: 10)
        decay (float): momentum factor. (Default: 1.0)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.MIFGSM(model, eps=8/255, steps=10, decay=1.0)
        >>> adv_images = attack(images, labels)
    """

    name = "MIFGSM"
    loop = staticmethod(mifgsm_loop)
