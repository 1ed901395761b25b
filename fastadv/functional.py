"""Plain functions for every attack: ``attack(model, images, labels, *, budgets...)``.

Each validates its inputs, runs on copies on the model's device, puts the model in
eval mode for the attack and restores it after. Budgets may be per-sample [N] tensors.
"""
from fastadv.attacks.fgsm import fgsm
from fastadv.attacks.pgd import pgd
from fastadv.attacks.pgdl2 import pgdl2

__all__ = ["fgsm", "pgd", "pgdl2"]
