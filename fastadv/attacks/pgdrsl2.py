"""PGDRSL2: PGD in the L2 ball against a randomized-smoothing classifier (Salman et al., 2019)."""
from typing import Literal, Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attacks.arg_checks import check_number
from fastadv.attacks.pgdrs import PGDRS, Noise, check_smoothing_args, chunk_sizes, run_chunks, smoothing_loop
from fastadv.engine import run_functional
from fastadv.hints import EngineKwargs, Model, Unpack
from fastadv.reference import l2_norm, per_sample


def l2_delta_update(delta, g, *, eps, alpha, eps_for_division):
    """The reference's L2 step on delta: g / (||g|| + eps_for_division), delta + alpha * g,
    then delta * min(eps / ||delta||, 1), with its exact expressions (eps / n is PyTorch's
    reciprocal-then-multiply), computed in g's buffer."""
    g = g.div_(per_sample(l2_norm(g) + eps_for_division, g))
    delta = g.mul_(alpha).add_(delta)  # delta + alpha * g, bit for bit
    norms = l2_norm(delta)
    factor = torch.min(eps / norms, torch.ones_like(norms))
    return delta.mul_(per_sample(factor, delta))


def pgdrsl2(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 1.0, alpha: float = 0.2,
            steps: int = 10, noise_type: Literal["guassian", "gaussian", "uniform"] = "guassian", noise_sd: float = 0.5,
            noise_batch_size: int = 5, batch_max: int = 2048, eps_for_division: float = 1e-10, targeted: bool = False,
            backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """PGD (L2) against the randomized-smoothing classifier of model.

    Arguments: as fastadv.functional.pgdrs, with eps and alpha in L2 and
    eps_for_division (>= 0) added to the gradient's norm before dividing.
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.PGDRSL2.
    """
    steps, nb, batch_max = check_smoothing_args(steps, noise_batch_size, batch_max)
    noise = Noise(noise_type, noise_sd)
    eps = validation.check_budget(eps, "eps")
    alpha = validation.check_budget(alpha, "alpha", positive=True)
    div = check_number(eps_for_division, "eps_for_division")

    def core(forward, x, y, engine):
        def chunk(xc, yc):
            return smoothing_loop(forward, xc, yc, eps=eps, alpha=alpha, steps=steps, noise=noise, noise_batch_size=nb,
                                  targets=yc if targeted else None, update=l2_delta_update, eps_for_division=div,
                                  engine=engine)

        return run_chunks(x, y, chunk_sizes(x.shape[0], nb, batch_max), chunk)

    return run_functional(core, model, images, labels, engine=engine)


class PGDRSL2(PGDRS):
    r"""PGD (L2) for randomized smoothing, from 'Provably Robust Deep Learning via
    Adversarially Trained Smoothed Classifiers' [https://arxiv.org/abs/1906.04584].

    Distance measure: L2. As PGDRS, with the step g / (||g||_2 + eps_for_division)
    * alpha and delta scaled back onto the eps-ball (delta * min(eps / ||delta||, 1)).
    A zero delta with eps = 0 gives NaN there; such a sample comes back clean.

    Equivalence: bit-exact with torchattacks 3.5.1 PGDRSL2 (same seed, same device),
    both noise types, every targeted mode. engine: precision and channels_last apply
    to the model; early_stop does not apply.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 1.0)
        alpha (float): step size. (Default: 0.2)
        steps (int): number of steps. (Default: 10)
        noise_type (str): 'guassian' (sic; 'gaussian' is accepted too) or 'uniform'. (Default: 'guassian')
        noise_sd (float): standard deviation of the noise (half-width for uniform). (Default: 0.5)
        noise_batch_size (int): noisy copies per image. (Default: 5)
        batch_max (int): most noisy copies per forward pass. (Default: 2048)
        eps_for_division (float): added to the gradient's norm. (Default: 1e-10)
        backend, **engine: see fastadv.Attack.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.PGDRSL2(model, eps=1.0, alpha=0.2, steps=10, noise_sd=0.5, noise_batch_size=5)
        >>> adv_images = attack(images, labels)
    """

    update = staticmethod(l2_delta_update)

    def __init__(self, model: nn.Module, eps: float = 1.0, alpha: float = 0.2, steps: int = 10,
                 noise_type: Literal["guassian", "gaussian", "uniform"] = "guassian", noise_sd: float = 0.5,
                 noise_batch_size: int = 5, batch_max: int = 2048, eps_for_division: float = 1e-10, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super(PGDRS, self).__init__("PGDRSL2", model, backend=backend, **engine)
        self._init_smoothing(eps, alpha, steps, noise_type, noise_sd, noise_batch_size, batch_max, eps_for_division)
