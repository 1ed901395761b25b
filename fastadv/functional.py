"""Plain functions for every attack: ``attack(model, images, labels, *, budgets...)``.

Each validates its inputs, runs on copies on the model's device, puts the model in
eval mode for the attack and restores it after. Budgets may be per-sample [N]
tensors where the threat model allows. The classes wrap these same loops.
"""
from fastadv.attacks import FUNCTIONS, resolve


def __getattr__(name):
    if name in FUNCTIONS:
        return resolve(name, FUNCTIONS)
    raise AttributeError(f"module 'fastadv.functional' has no attribute {name!r}")


def __dir__():
    return sorted(FUNCTIONS)


__all__ = sorted(FUNCTIONS)
