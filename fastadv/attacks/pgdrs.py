"""PGD against a randomized-smoothing classifier (Salman et al., 2019): the loss is
the cross-entropy of the softmax averaged over noise_batch_size noisy copies of
each image; the perturbation is shared by the copies. Linf here; the L2 variant
(PGDRSL2) is in fastadv.attacks.pgdrsl2 and shares this loop.
"""
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.arg_checks import check_choice, check_count, check_number
from fastadv.engine import EXACT, autocast_dtype, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack
from fastadv.validation import check_logits

NOISE_TYPES = ("guassian", "gaussian", "uniform")  # the reference spells it "guassian"; both are accepted


class Noise:
    """The smoothing noise, drawn like the reference: in fp32, from the device's generator,
    N(0, 1) * noise_sd ('guassian') or (U[0, 1) - 0.5) * 2 * noise_sd ('uniform')."""

    def __init__(self, noise_type, noise_sd):
        self.noise_type = check_choice(noise_type, "noise_type", NOISE_TYPES)
        self.noise_sd = check_number(noise_sd, "noise_sd")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.sample(img.shape, img.device)

    def sample(self, shape, device) -> torch.Tensor:
        """Noise for a contiguous fp32 tensor of this shape (the draws of rand_like/randn_like on one)."""
        t = torch.empty(shape, dtype=torch.float32, device=device)
        if self.noise_type == "uniform":
            return t.uniform_().sub_(0.5).mul_(2).mul_(self.noise_sd)
        return t.normal_().mul_(self.noise_sd)


def check_smoothing_args(steps, noise_batch_size, batch_max):
    steps = validation.check_steps(steps)
    noise_batch_size = check_count(noise_batch_size, "noise_batch_size")
    batch_max = check_count(batch_max, "batch_max")
    if batch_max < noise_batch_size:
        raise ValueError(
            f"batch_max ({batch_max}) must be >= noise_batch_size ({noise_batch_size}): the reference splits the "
            f"batch into chunks of batch_max // noise_batch_size images"
        )
    return steps, noise_batch_size, batch_max


def chunk_sizes(n: int, noise_batch_size: int, batch_max: int):
    """The reference's split: chunks of int(batch_max / noise_batch_size) images when
    n * noise_batch_size exceeds batch_max, else one chunk."""
    if n * noise_batch_size <= batch_max:
        return [n]
    size = int(batch_max / noise_batch_size)
    return [min(size, n - i) for i in range(0, n, size)]


def linf_delta_update(delta, g, *, eps, alpha, **_):
    """clamp(delta + alpha * sign(g), -eps, eps), in g's buffer (alpha * sign is exact)."""
    return g.sign_().mul_(alpha).add_(delta).clamp_(min=-eps, max=eps)


def smoothing_loop(forward, x, y, *, eps, alpha, steps, noise, noise_batch_size, targets=None,
                   update=linf_delta_update, eps_for_division=1e-10, engine=EXACT):
    """One chunk of PGDRS / PGDRSL2 on inputs the caller owns; returns clamp(x + delta, 0, 1).

    y: the labels; targets: the target labels in targeted mode (the loss then descends
    their cross-entropy), else None. update(delta, grad, eps=, alpha=, eps_for_division=)
    returns the next delta. engine: precision and channels_last apply to the model's
    input; early_stop does not apply (the attacked classifier is the smoothed one).

    The reference clamps noise_batch_size repeated copies of x + delta and lets autograd
    take the clamp's and the repeat's backward on all of them. The copies are equal, so
    here clamp(x + delta) and its in-range mask are taken once per image, the noise is
    added in the noise's buffer, and delta's gradient is the select of the mask on the
    copies' gradients summed over the copies (the sum the repeat's backward takes; the
    masked-out terms are zeros either way): the same bits with a fifth of the
    image-sized passes outside the model.
    """
    forward = validation.explain_float32_inputs(forward, x.dtype, "PGDRS/PGDRSL2")
    n, nb, rest = x.shape[0], noise_batch_size, x.shape[1:]
    delta = torch.zeros((n, *rest), device=x.device)  # the default dtype, as the reference's
    dtype = autocast_dtype(engine.precision)
    labels = y if targets is None else targets
    for step in range(steps):
        moved = x + delta
        in_range = (moved >= 0).logical_and_(moved <= 1)  # where the clamp passes its gradient
        img = torch.clamp_(moved, min=0, max=1).unsqueeze(1)
        adv_noise = noise.sample((n * nb, img[0].numel()), x.device).view(n, nb, *rest)
        adv_noise = adv_noise.add_(img) if img.dtype == adv_noise.dtype else img + adv_noise  # fp64 images promote
        adv_noise = adv_noise.view(n * nb, *rest).requires_grad_(True)
        with torch.enable_grad():
            with torch.autocast(x.device.type, dtype, enabled=dtype is not None):
                logits = forward(engine.layout(adv_noise))
            if step == 0:
                check_logits(logits, labels.repeat_interleave(nb))
            logits = logits.float() if dtype is not None else logits
            average = F.softmax(logits, dim=1).reshape(-1, nb, logits.shape[-1]).mean(1, keepdim=True).squeeze(1)
            loss = F.nll_loss(torch.log(average.clamp(min=1e-20)), labels)
            if targets is not None:
                loss = -loss
            g = torch.autograd.grad(loss, adv_noise)[0]
        g = torch.where(in_range, g.view(n, nb, *rest).sum(1), 0.0)
        delta = update(delta, g, eps=eps, alpha=alpha, eps_for_division=eps_for_division)
    return torch.clamp(x + delta, min=0, max=1)


def run_chunks(x, y, sizes, attack_chunk):
    """attack_chunk(x_chunk, y_chunk) over the reference's chunks, in order, concatenated."""
    outs, start = [], 0
    for size in sizes:
        outs.append(attack_chunk(x[start:start + size], y[start:start + size]))
        start += size
    return torch.cat(outs)


def pgdrs(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255, alpha: float = 2 / 255,
          steps: int = 10, noise_type: Literal["guassian", "gaussian", "uniform"] = "guassian", noise_sd: float = 0.5,
          noise_batch_size: int = 5, batch_max: int = 2048, targeted: bool = False, backend: Optional[str] = None,
          **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """PGD (Linf) against the randomized-smoothing classifier of model.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size (floats). steps: iterations.
        noise_type: 'guassian' (the reference's spelling; 'gaussian' also accepted) or 'uniform'.
        noise_sd: the noise's standard deviation (half-width for 'uniform').
        noise_batch_size: noisy copies per image (>= 1). batch_max: at most this many noisy
            copies per forward pass (the batch is split as the reference splits it).
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.PGDRS.
    """
    steps, nb, batch_max = check_smoothing_args(steps, noise_batch_size, batch_max)
    noise = Noise(noise_type, noise_sd)
    eps = validation.check_budget(eps, "eps")
    alpha = validation.check_budget(alpha, "alpha", positive=True)

    def core(forward, x, y, engine):
        def chunk(xc, yc):
            return smoothing_loop(forward, xc, yc, eps=eps, alpha=alpha, steps=steps, noise=noise,
                                  noise_batch_size=nb, targets=yc if targeted else None, engine=engine)

        return run_chunks(x, y, chunk_sizes(x.shape[0], nb, batch_max), chunk)

    return run_functional(core, model, images, labels, engine=engine)


class PGDRS(Attack):
    r"""PGD for randomized smoothing, from 'Provably Robust Deep Learning via
    Adversarially Trained Smoothed Classifiers' [https://arxiv.org/abs/1906.04584].

    Distance measure: Linf. Each step: the noise_batch_size copies of clamp(x + delta,
    0, 1) get fresh noise (drawn in fp32 on the attack's device), the model's softmax
    is averaged over the copies, and delta = clamp(delta + alpha * sign(grad of the
    averaged cross-entropy), -eps, eps). Output: clamp(x + delta, 0, 1). The batch
    is attacked in chunks of batch_max // noise_batch_size images when it has more
    than batch_max noisy copies, each chunk drawing its targets and noise in turn,
    as the reference does.

    Equivalence: bit-exact with torchattacks 3.5.1 PGDRS (same seed, same device),
    both noise types, every targeted mode. Images of any shape [N, ...] (the
    reference needs [N, C, H, W]). engine: precision and channels_last apply to the
    model; early_stop does not apply.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps. (Default: 10)
        noise_type (str): 'guassian' (sic; 'gaussian' is accepted too) or 'uniform'. (Default: 'guassian')
        noise_sd (float): standard deviation of the noise (half-width for uniform). (Default: 0.5)
        noise_batch_size (int): noisy copies per image. (Default: 5)
        batch_max (int): most noisy copies per forward pass. (Default: 2048)
        backend, **engine: see fastadv.Attack.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.PGDRS(model, eps=8/255, alpha=2/255, steps=10, noise_sd=0.5, noise_batch_size=5)
        >>> adv_images = attack(images, labels)
    """

    update = staticmethod(linf_delta_update)
    eps_for_division = 1e-10

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 noise_type: Literal["guassian", "gaussian", "uniform"] = "guassian", noise_sd: float = 0.5,
                 noise_batch_size: int = 5, batch_max: int = 2048, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("PGDRS", model, backend=backend, **engine)
        self._init_smoothing(eps, alpha, steps, noise_type, noise_sd, noise_batch_size, batch_max)

    def _init_smoothing(self, eps, alpha, steps, noise_type, noise_sd, noise_batch_size, batch_max,
                        eps_for_division=None):
        """Checks and sets the arguments in the reference's order (its repr's order);
        eps_for_division: PGDRSL2's, set where the reference sets it."""
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps, noise_batch_size, batch_max = check_smoothing_args(steps, noise_batch_size, batch_max)
        self.noise_func = Noise(noise_type, noise_sd)
        self.noise_batch_size = noise_batch_size
        if eps_for_division is not None:
            self.eps_for_division = check_number(eps_for_division, "eps_for_division")
        self.batch_max = batch_max
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)

        def chunk(xc, yc):
            targets = self.get_target_label(xc, yc) if self.targeted else None  # per chunk, as the reference
            return smoothing_loop(
                self.get_logits, xc, yc, eps=self.eps, alpha=self.alpha, steps=self.steps, noise=self.noise_func,
                noise_batch_size=self.noise_batch_size, targets=targets, update=self.update,
                eps_for_division=self.eps_for_division, engine=self.engine,
            )

        return run_chunks(x, y, chunk_sizes(x.shape[0], self.noise_batch_size, self.batch_max), chunk)
