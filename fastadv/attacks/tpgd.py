"""TPGD: PGD on TRADES' KL loss against the clean prediction (Zhang et al., 2019). Linf, no labels."""
import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import ops, validation
from fastadv.attack import Attack
from fastadv.attacks.pgd import linf_iterations
from fastadv.engine import EXACT, autocast_dtype, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


class KLGradient:
    """grad w.r.t. adv of KLDivLoss(reduction='sum')(log_softmax(f(adv)), softmax(f(x))).

    The clean logits f(x) are taken once, at construction. A sample "succeeds"
    (for early stopping) when its prediction differs from the clean one.
    precision ('bf16' or 'fp16', fast mode) runs the model under autocast.
    """

    def __init__(self, forward, x: torch.Tensor, precision=None):
        self.forward = forward
        self.autocast = autocast_dtype(precision)
        with torch.no_grad(), self._autocast(x):
            clean = forward(x)
        n = x.shape[0]
        ok = isinstance(clean, torch.Tensor) and clean.dim() == 2 and clean.shape[0] == n
        if not ok or not clean.is_floating_point():
            got = f"{clean.dtype} {tuple(clean.shape)}" if isinstance(clean, torch.Tensor) else type(clean).__name__
            raise ValueError(f"the model must return floating-point logits of shape [N={n}, C], got {got}")
        clean = clean.float() if self.autocast is not None else clean
        self.target = F.softmax(clean, dim=1)
        self.clean_pred = clean.argmax(1)
        self.last_logits = None

    def _autocast(self, x):
        return torch.autocast(x.device.type, self.autocast, enabled=self.autocast is not None)

    def __call__(self, adv: torch.Tensor) -> torch.Tensor:
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad(), self._autocast(adv):
            logits = self.forward(adv)
            logits = logits.float() if self.autocast is not None else logits
            cost = F.kl_div(F.log_softmax(logits, dim=1), self.target, reduction="sum")
            self.last_logits = logits.detach()
            return torch.autograd.grad(cost, adv)[0]

    def succeeded(self) -> torch.Tensor:
        return self.last_logits.argmax(1) != self.clean_pred

    def keep(self, mask: torch.Tensor) -> None:
        self.target, self.clean_pred = self.target[mask], self.clean_pred[mask]

    def per_sample(self) -> dict:
        return {"target": self.target, "clean_pred": self.clean_pred}

    def on_slots(self, buffers: dict) -> "KLGradient":
        """This gradient on slot buffers (the loss is a sum: no scale to keep)."""
        slotted = copy.copy(self)
        slotted.target, slotted.clean_pred = buffers["target"], buffers["clean_pred"]
        return slotted


def tpgd_loop(forward, x, y=None, *, eps, alpha, steps, backend=None, engine=EXACT):
    """The TPGD iteration on inputs the caller owns (y is unused); returns the last iterate."""
    fmt = validation.memory_format(x)
    xl = engine.layout(x)
    grad = KLGradient(forward, xl, engine.precision)  # the clean forward runs before the noise draw, as there
    adv = engine.layout(ops.random_start(x, 0.001 * torch.randn_like(x), backend=backend))
    x = xl

    adv = linf_iterations(grad, adv, x, eps=eps, alpha=alpha, steps=steps, backend=backend, engine=engine, model=forward)
    return adv.contiguous(memory_format=fmt)


def tpgd(model: Model, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *, eps: Budget = 8 / 255,
         alpha: Budget = 2 / 255, steps: int = 10, backend: Optional[str] = None,
         **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """PGD maximizing the KL divergence between the model's clean and adversarial predictions.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: ignored (may be None).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps: iterations.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.TPGD.
    """
    validation.check_images(images)
    if labels is None:  # run_functional requires labels; TPGD never reads them
        labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    return run_functional(
        tpgd_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), backend=backend, slots=True,
    )


class TPGD(Attack):
    r"""PGD on the KL-divergence loss of TRADES, from 'Theoretically Principled Trade-off
    between Robustness and Accuracy' [https://arxiv.org/abs/1901.08573].

    Distance measure: Linf. Labels are not used: the loss is
    KLDivLoss(reduction='sum')(log_softmax(f(adv)), softmax(f(x))) and the start is
    clamp(x + 0.001 * N(0, 1), 0, 1). Default (untargeted) mode only. Equivalence:
    bit-exact with torchattacks 3.5.1 TPGD (same seed, same device).

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps. (Default: 10)
        backend, **engine: see fastadv.Attack (exact mode by default; early_stop
            stops a sample once its prediction leaves the clean one).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: ignored; output: (N, C, H, W).

    Example::
        >>> attack = fastadv.TPGD(model, eps=8/255, alpha=2/255, steps=10)
        >>> adv_images = attack(images)
    """

    runs_on_slots = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("TPGD", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps = validation.check_steps(steps)
        self.supported_mode = ["default"]

    def _needs_labels(self):
        return False

    def forward(self, images, labels=None):
        x, _ = self._prepare(images, labels)
        return tpgd_loop(
            self.get_logits, x, eps=self.eps, alpha=self.alpha, steps=self.steps,
            backend=self.backend, engine=self.engine,
        )
