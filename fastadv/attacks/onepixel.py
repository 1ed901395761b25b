"""One Pixel attack (Su et al., 2019): differential evolution over a few pixels' positions and values. L0."""
import numbers
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from fastadv.attack import Attack
from fastadv.engine import EXACT, run_functional
from fastadv.evolution import differential_evolution
from fastadv.hints import EngineKwargs, Model, Unpack
from fastadv.validation import check_logits


def check_count(value, name: str) -> int:
    """An int >= 1 (counts whose zero the reference accepts but that make no attack)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_onepixel_args(pixels, steps, popsize, inf_batch):
    return tuple(check_count(v, n) for v, n in ((pixels, "pixels"), (steps, "steps"), (popsize, "popsize"),
                                                   (inf_batch, "inf_batch")))


def check_model_output(logits, labels):
    """The model's logits for candidates of one image must be [M, C], and every label of
    the batch in [0, C) (checked once per call, on the first evaluation)."""
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] >= 1:
        logits = logits[:1].expand(labels.shape[0], -1)
    check_logits(logits, labels)


def host_array(t: torch.Tensor) -> np.ndarray:
    """t as a numpy array on the host; bfloat16 (which numpy lacks, so the reference fails) as float32."""
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


def set_pixels(image: torch.Tensor, params: np.ndarray, pixels: int) -> torch.Tensor:
    """Copies of image [1, C, H, W], one per row of params [M, pixels * (2 + C)]: each
    pixel's (row, column, value per channel), written pixel after pixel so that a later
    pixel at the same place wins, as the reference's loop. A position of exactly H or W
    (a parameter at its upper bound, where the reference raises IndexError) is clamped."""
    m = params.shape[0]
    _, c, h, w = image.shape
    out = image.expand(m, -1, -1, -1).clone()
    per_pixel = params.reshape(m, pixels, 2 + c)
    rows = torch.from_numpy(np.minimum(per_pixel[:, :, 0].astype(np.int64), h - 1)).to(image.device)
    cols = torch.from_numpy(np.minimum(per_pixel[:, :, 1].astype(np.int64), w - 1)).to(image.device)
    values = torch.from_numpy(per_pixel[:, :, 2:]).to(image.device, image.dtype)  # rounds as a scalar store
    batch = torch.arange(m, device=image.device)
    for p in range(pixels):
        out[batch, :, rows[:, p], cols[:, p]] = values[:, p]
    return out


def onepixel_loop(forward, x, y, *, pixels=1, steps=10, popsize=10, inf_batch=128, targeted=False,
                  deterministic=True, engine=EXACT):
    """OnePixel on inputs the caller owns, one image at a time (the reference's order of
    numpy draws). y: the labels, or the targets when targeted.

    Each generation evaluates the population in batches of inf_batch and asks whether
    the best member fools the model (a forward of that one image, as the reference).
    With deterministic (a model whose output depends on its input only) that question
    is not asked again while the best member stays the same: the answer cannot change.
    Host syncs: every evaluation (the search runs on the host).
    """
    if x.dim() != 4:
        raise ValueError(f"OnePixel needs images of shape [N, C, H, W], got shape {tuple(x.shape)}")
    _, c, h, w = x.shape
    bounds = ([(0, h), (0, w)] + [(0, 1)] * c) * pixels
    popmul = max(1, int(popsize / len(bounds)))
    checked = []

    def probabilities(images):
        with torch.no_grad():
            outs = [forward(b) for b in torch.split(images, inf_batch)]
        if not checked:
            check_model_output(outs[0], y)
            checked.append(True)
        return host_array(torch.softmax(torch.cat(outs), dim=1))

    advs = []
    for i in range(x.shape[0]):
        image, label = x[i:i + 1], int(y[i])
        last = []

        def energies(params):
            prob = probabilities(set_pixels(image, params, pixels))[:, label]
            return 1 - prob if targeted else prob

        def stop(best, changed):
            if changed or not deterministic or not last:
                pred = int(np.argmax(probabilities(set_pixels(image, best[None], pixels))[0]))
                last[:] = [pred == label if targeted else pred != label]
            return last[0]

        best = differential_evolution(energies, bounds, maxiter=steps, popmul=popmul, stop=stop)
        advs.append(set_pixels(image, best[None], pixels))
    return torch.cat(advs) if advs else x.clone()


def onepixel(model: Model, images: torch.Tensor, labels: torch.Tensor, *, pixels: int = 1, steps: int = 10,
             popsize: int = 10, inf_batch: int = 128, targeted: bool = False, backend: Optional[str] = None,
             **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """The One Pixel attack: differential evolution over `pixels` pixels (L0).

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, C, H, W] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        pixels, steps, popsize, inf_batch: as OnePixel (ints >= 1).
        **engine: fastadv.engine.EngineOptions (batch_size chunks the batch).
    Draws from numpy's global RNG. Returns the adversarial images on the model's device;
    bit-exact with torchattacks.OnePixel after the same np.random.seed (see OnePixel).
    """
    pixels, steps, popsize, inf_batch = check_onepixel_args(pixels, steps, popsize, inf_batch)
    return run_functional(
        onepixel_loop, model, images, labels, engine=engine, pixels=pixels, steps=steps, popsize=popsize,
        inf_batch=inf_batch, targeted=targeted,
    )


class OnePixel(Attack):
    r"""One Pixel attack from 'One pixel attack for fooling deep neural networks'
    [https://arxiv.org/abs/1710.08864].

    Distance measure: L0. For each image, differential evolution (best1bin, mutation
    dithered in [0.5, 1), recombination 1, random initial population of
    max(5, max(1, popsize // (pixels * (2 + C))) * pixels * (2 + C)) members) searches the
    positions and values of `pixels` pixels that minimize the probability of the label
    (untargeted) or maximize that of the target; it stops after `steps` generations or
    once the best member fools the model.

    Equivalence: bit-exact with torchattacks 3.5.1 OnePixel (same np.random.seed, same
    device, untargeted and every targeted mode): the same numpy draws in the same
    order (numpy's global RNG, as the reference), the same batches of inf_batch for
    the model. Where the reference re-evaluates a best member that has not changed,
    fastadv reuses the answer (exact for a model whose output depends on its input
    only; under set_model_training_mode it re-evaluates, as the reference). The
    search runs on the host: every generation syncs with the device.

    Arguments:
        model (nn.Module): model to attack.
        pixels (int): number of pixels to change, >= 1. (Default: 1)
        steps (int): number of generations, >= 1. (Default: 10)
        popsize (int): population size per searched parameter, >= 1. (Default: 10)
        inf_batch (int): maximum batch size for the model, >= 1. (Default: 128)
        backend, **engine: see fastadv.Attack (OnePixel has no kernels).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.OnePixel(model, pixels=1, steps=10, popsize=10, inf_batch=128)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, pixels: int = 1, steps: int = 10, popsize: int = 10, inf_batch: int = 128, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("OnePixel", model, backend=backend, **engine)
        self.pixels, self.steps, self.popsize, self.inf_batch = check_onepixel_args(pixels, steps, popsize, inf_batch)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return onepixel_loop(
            self.get_logits, x, self._targets(x, y), pixels=self.pixels, steps=self.steps, popsize=self.popsize,
            inf_batch=self.inf_batch, targeted=self.targeted, deterministic=not self._model_training,
            engine=self.engine,
        )
