"""MultiAttack: run several attacks in turn, each on the points the previous ones left robust."""
from typing import Sequence

import torch

from fastadv import validation
from fastadv.attack import Attack
from fastadv.engine import model_device, model_guard
from fastadv.hints import Model


def multiattack_loop(forward, x, y, attacks, *, verbose=False):
    """The cascade on inputs the caller owns.

    attacks: callables atk(images, labels) -> adversarial images. Every attack starts
    from the clean images of the points still classified correctly; a point keeps the
    first adversarial example that fools forward. The indices of those points stay
    on the device: the only host syncs are the sizes each next batch needs.
    Returns (adversarial images, records), records[0] = N and records[i] = the points
    still robust after attack i.
    """
    final = x.clone()
    remaining = torch.arange(x.shape[0], device=x.device)
    records = [x.shape[0]]
    for attack in attacks:
        adv = attack(x[remaining], y[remaining]).to(final.device)
        with torch.no_grad():
            wrong = forward(adv).max(1)[1] != y[remaining]
        final[remaining] = torch.where(wrong.view(-1, *([1] * (x.dim() - 1))), adv.to(final.dtype), final[remaining])
        remaining = remaining[~wrong]
        records.append(remaining.shape[0])
        if remaining.shape[0] == 0:
            break
    if verbose:
        print(success_rate_record(records))
    return final, records


def success_rate_record(records):
    """'Attack success rate: a % | b % | ...', cumulative after each attack, as torchattacks prints."""
    rates = [(1 - r / records[0]) * 100 if records[0] else 0.0 for r in records[1:]]
    return "Attack success rate: " + " | ".join("%2.2f %%" % r for r in rates)


def multiattack(model: Model, images: torch.Tensor, labels: torch.Tensor, attacks: Sequence[Attack], *,
                verbose: bool = False) -> torch.Tensor:
    """Run attacks in turn on the points still robust; each point keeps its first success.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C]; decides success.
        images: [N, ...] floats in [0, 1]. labels: [N] true class indices.
        attacks: callables atk(images, labels) -> adversarial images (fastadv attacks, or
            functools.partial of the plain functions), at least 2.
    Returns the adversarial images on the model's device (the clean image where every
    attack failed).
    """
    _check_attacks(attacks, need_same_model=False)
    validation.check_images(images)
    validation.check_labels(labels, images.shape[0])
    device = model_device(model, images.device)
    x = images.detach().clone().to(device)
    y = labels.detach().clone().to(device)
    if x.shape[0] == 0:
        return x
    with model_guard(model):
        return multiattack_loop(model, x, y, attacks, verbose=verbose)[0]


def _check_attacks(attacks, need_same_model=True):
    if not isinstance(attacks, (list, tuple)):
        raise TypeError(f"attacks must be a list of attacks, got {type(attacks).__name__}")
    if len(attacks) < 2:
        raise ValueError(f"attacks must hold at least 2 attacks, got {len(attacks)}")
    for i, atk in enumerate(attacks):
        if not callable(atk):
            raise TypeError(f"attacks[{i}] is not callable: {type(atk).__name__}")
    if need_same_model:
        for i, atk in enumerate(attacks):
            if not isinstance(atk, Attack):
                raise TypeError(f"attacks[{i}] must be a fastadv Attack, got {type(atk).__name__}")
        if len({id(atk.model) for atk in attacks}) != 1:
            raise ValueError("attacks must all attack the same model object")


class MultiAttack(Attack):
    r"""Run attacks in turn, each on the points that all the previous ones left robust.

    Threat model: that of the attacks given. A point keeps the first adversarial example
    that fools the model; points no attack fools come back clean. Untargeted success
    (prediction != label) decides, whatever the attacks' modes.

    Arguments:
        attacks (list): at least 2 fastadv attacks on the same model object.
        verbose (bool): print the cumulative success rate after each attack. (Default: False)

    After a call, ``records`` holds [N, robust after attack 1, robust after attack 2, ...]
    (shorter when every point was fooled early).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Equivalence: bit-exact with torchattacks 3.5.1 MultiAttack given bit-exact attacks
    (same cascade: sub-batches of the still-robust points in their original order).

    Example::
        >>> atk = fastadv.MultiAttack([fastadv.PGD(model), fastadv.FAB(model)])
        >>> adv_images = atk(images, labels)
    """

    def __init__(self, attacks: Sequence[Attack], verbose: bool = False) -> None:
        _check_attacks(attacks)
        super().__init__("MultiAttack", attacks[0].model, backend=attacks[0].backend)
        self.attacks = list(attacks)
        self.verbose = verbose
        self.supported_mode = ["default"]
        self._records = None

    @property
    def records(self):
        """[N, robust after attack 1, ...] of the last call (None before the first)."""
        return self._records

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        adv, self._records = multiattack_loop(self.get_logits, x, y, self.attacks, verbose=self.verbose)
        return adv

    def success_rates(self):
        """Cumulative success rates (%) after each attack of the last call."""
        if not self.records:
            return []
        return [(1 - r / self.records[0]) * 100 if self.records[0] else 0.0 for r in self.records[1:]]
