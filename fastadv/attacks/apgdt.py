"""APGD-T: targeted Auto-PGD on the targeted DLR loss (Croce & Hein, ICML 2020).

For each target rank c = 2..n_classes (the class with the c-th largest clean
logit) and each restart, APGD attacks the samples still robust towards that
class; the first success is kept. The iteration is fastadv.attacks.apgd's.
"""
from typing import Literal, Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attacks.apgd import (
    ARITHMETICS, NORMS, _APGDBase, apgd_loop, check_choice, check_count, check_n_classes, check_rho, check_seed,
)
from fastadv.engine import run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def apgdt_loop(forward, x, y, *, n_target_classes=9, **kwargs):
    """APGD-T on inputs the caller owns: apgd_loop with loss='dlr-targeted'.

    n_target_classes: target ranks 2..n_target_classes+1 (torchattacks: n_classes - 1;
    pyautoattack's default: 9). Other keyword arguments as apgd_loop (norm, eps, n_iter,
    n_restarts, eot_iter, rho, seed, generator, arithmetic, robust, backend, verbose).
    Returns (adv, robust).
    """
    return apgd_loop(forward, x, y, loss="dlr-targeted", n_target_classes=n_target_classes, **kwargs)


def _apgdt_core(model, x, y, **kwargs):
    return apgdt_loop(model, x, y, **kwargs)[0]


def apgdt(
    model: Model, images: torch.Tensor, labels: torch.Tensor, *, norm: Literal["Linf", "L2"] = "Linf",
    eps: Budget = 8 / 255, steps: int = 10, n_restarts: int = 1, seed: Optional[int] = 0, eot_iter: int = 1,
    rho: float = 0.75, verbose: bool = False, n_classes: int = 10,
    arithmetic: Literal["torchattacks", "original"] = "torchattacks", backend: Optional[str] = None,
    **engine: Unpack[EngineKwargs],
) -> torch.Tensor:
    """Targeted Auto-PGD over the n_classes - 1 most likely other classes, as torchattacks.APGDT.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C] with C >= n_classes.
        images: [N, C, H, W] floats in [0, 1]. labels: [N] true class indices.
        norm: 'Linf' or 'L2' (default 'Linf'). eps: budget, a float or a per-sample [N]
            tensor (default 8/255). steps: iterations per run (default 10).
        n_restarts: runs per target class (default 1). seed: default 0 (private generator).
        eot_iter: default 1. rho: default 0.75. n_classes: targets are the classes ranked
            2..n_classes by the clean logits (default 10).
        arithmetic: 'torchattacks' (default) or 'original' (pyautoattack 0.2.0
            APGDAttack_targeted with n_target_classes = n_classes - 1).
        backend: 'auto', 'triton', 'torch' or 'interpret' (default: FASTADV_BACKEND, else 'auto').
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size; see apgd_loop).
    Returns the adversarial images on the model's device (clean where the attack fails).
    Equivalence: bit-exact with torchattacks 3.5.1 APGDT on the 'torch' backend.
    """
    return run_functional(
        _apgdt_core, model, images, labels, budgets=("eps",), engine=engine, eps=eps,
        norm=check_choice(norm, "norm", NORMS), n_iter=validation.check_steps(steps),
        n_restarts=check_count(n_restarts, "n_restarts"), seed=check_seed(seed),
        eot_iter=check_count(eot_iter, "eot_iter"), rho=check_rho(rho), verbose=verbose,
        n_target_classes=check_n_classes(n_classes) - 1,
        arithmetic=check_choice(arithmetic, "arithmetic", ARITHMETICS), backend=backend, slots=True,
    )


class APGDT(_APGDBase):
    r"""APGD-Targeted in the paper 'Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690],
    [https://github.com/fra31/auto-attack]. Targeted attack for every wrong class.

    Distance measure: Linf, L2. Threat model: untargeted success (any wrong class) by
    targeted runs, white-box, budget eps in [0, 1] pixel space. Equivalence: bit-exact with
    torchattacks 3.5.1 APGDT (same seed) on the 'torch' backend, the CPU default, including
    its L2 quirk of using the first sample's step size for the whole batch; on the Triton
    kernels the Linf step is bit-exact too and the L2 step differs in the last bits of its
    norms. The global RNG is not re-seeded (a private generator gives the same draws).

    Arguments:
        model (nn.Module): model to attack.
        norm (str): Lp-norm of the attack. ['Linf', 'L2'] (Default: 'Linf')
        eps (float): maximum perturbation. (Default: 8/255)
        steps (int): number of steps. (Default: 10)
        n_restarts (int): number of random restarts. (Default: 1)
        seed (int): random seed for the starting point. (Default: 0)
        eot_iter (int): number of iteration for EOT. (Default: 1)
        rho (float): parameter for step-size update (Default: 0.75)
        verbose (bool): print progress. (Default: False)
        n_classes (int): number of classes; targets ranks 2..n_classes. (Default: 10)
        backend (str, keyword only): 'auto', 'triton', 'torch' or 'interpret'. (Default: None)
        **engine (keyword only): see fastadv.Attack and apgd_loop (exact mode by default).

    Shape:
        - images: (N, C, H, W) in [0, 1]. labels: (N,). output: (N, C, H, W).

    Examples::
        >>> attack = fastadv.APGDT(model, norm='Linf', eps=8/255, steps=10, n_restarts=1, seed=0, eot_iter=1, rho=.75, verbose=False, n_classes=10)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, norm: Literal["Linf", "L2"] = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, seed: Optional[int] = 0, eot_iter: int = 1, rho: float = 0.75,
                 verbose: bool = False, n_classes: int = 10, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("APGDT", model, backend, engine, norm, eps, steps, n_restarts, seed, eot_iter, rho, verbose)
        self.target_class = None
        self.n_target_classes = check_n_classes(n_classes) - 1

    def perturb(self, x_in, y_in, best_loss=False, cheap=True):
        """(acc, adv) as torchattacks' APGDT.perturb."""
        if not cheap:
            raise ValueError("not implemented yet")
        adv, robust = apgdt_loop(
            self.get_logits, x_in.clone(), y_in.clone(), n_target_classes=self.n_target_classes,
            norm=self.norm, eps=validation.check_budget(self.eps, "eps"), n_iter=validation.check_steps(self.steps),
            n_restarts=self.n_restarts, seed=self.seed, eot_iter=self.eot_iter, rho=self.thr_decr,
            backend=self.backend, verbose=self.verbose, engine=self.engine,
        )
        return robust, adv
