"""SparseFool (Modas et al., 2019): few-pixel attacks from DeepFool's boundary points, L0."""
import numbers
from typing import Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.cw import engine_forward
from fastadv.attacks.deepfool import DeepFool, check_deepfool_args, deepfool_loop
from fastadv.engine import EXACT, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack
from fastadv.validation import check_logits


def check_sparsefool_args(steps, lam, overshoot):
    """Validated (steps, lam, overshoot); errors name the argument."""
    steps, overshoot = check_deepfool_args(steps, overshoot)
    checked = validation.check_budget(lam, "lam", positive=True)
    return steps, (lam if isinstance(lam, numbers.Real) else checked), overshoot


def linear_solver(x0, normal, point):
    """The reference's greedy solver: from x0, move one coordinate at a time (largest
    |normal| first, the first index on ties) by max(|f| / |normal_j|, 1e-4) in the
    direction of sign(normal_j), clipped to [0, 1], until f(x) = <normal, x - point>
    changes sign (f gets a 0.001 push in its starting sign's direction at each step).

    Bit-exact with the reference, which recomputes the argmax and two full dot products
    per coordinate: a coordinate step changes x only at that coordinate, so the order is
    one stable sort, and the dot at the start of a step is the last one plus the push.
    Host syncs: one per coordinate (the sign test).
    """
    normal = normal.flatten()
    point = point.flatten()
    x = x0.flatten().clone()
    f = torch.dot(normal, x - point)
    sign_true = f.sign().item()
    if sign_true != sign_true:  # NaN: the reference's loop test fails at once
        return x.view_as(x0)
    push = 0.001 * sign_true
    magnitude = normal.abs()
    count = int(torch.count_nonzero(normal))
    order = torch.sort(magnitude, descending=True, stable=True)[1][:count].tolist()
    direction = normal.sign()
    for k, j in enumerate(order):
        pert = (f + push).abs() / magnitude[j]
        step = torch.clamp(pert, min=1e-4)
        if not torch.isfinite(step):  # the reference's vector step turns inf * 0 into NaN everywhere
            remaining = normal.clone()
            remaining[order[:k]] = 0
            mask = torch.zeros_like(remaining)
            mask[j] = 1.0
            x = torch.clamp(x + step * mask * remaining.sign(), min=0, max=1)
            break
        x[j] = torch.clamp(x[j] + step * direction[j], min=0, max=1)
        f = torch.dot(normal, x - point)
        if f.sign().item() != sign_true:
            break
    return x.view_as(x0)


def sparsefool_single(forward, image, label, *, steps, lam, overshoot, deepfool_steps, deepfool_overshoot):
    """SparseFool on one image [1, ...] with its label [1]."""
    adv = image
    for _ in range(steps):
        with torch.no_grad():
            if torch.max(forward(adv)[0], dim=0)[1] != label[0]:
                break
        boundary, towards = deepfool_loop(
            forward, adv, label, steps=deepfool_steps, overshoot=deepfool_overshoot, return_target_labels=True
        )
        xb = (image + lam * (boundary - image)).requires_grad_(True)
        with torch.enable_grad():
            logits = forward(xb)[0]
            pred = torch.max(logits.detach(), dim=0)[1]
            if pred == label[0]:
                pred = towards[0]
            grad = torch.autograd.grad(logits[pred] - logits[label[0]], xb)[0]
        grad = grad / grad.norm()
        x_i = linear_solver(image, grad, xb.detach())
        adv = torch.clamp(image + (1 + overshoot) * (x_i - image), min=0, max=1)
    return adv


def sparsefool_loop(forward, x, y, *, steps=10, lam=3, overshoot=0.02, deepfool_steps=50, deepfool_overshoot=0.02,
                    engine=EXACT):
    """SparseFool image by image on inputs the caller owns (y: the true labels).

    One image at a time, as the reference: its DeepFool runs on single images, and the
    model's kernels round differently for a batch (~1e-6 on digits models), which moves
    the boundary points and the solver's sign tests, so batching would not keep its bits.
    deepfool_steps, deepfool_overshoot: the inner DeepFool's settings (the reference's
    SparseFool.deepfool attribute, a DeepFool with default arguments).
    """
    fmt = validation.memory_format(x)
    x = x.contiguous()
    forward = engine_forward(forward, engine)
    with torch.no_grad():
        first = forward(x[:1])
    check_logits(first.expand(x.shape[0], -1), y, n_classes_min=2)
    adv = torch.cat([
        sparsefool_single(forward, x[i:i + 1], y[i:i + 1], steps=steps, lam=lam, overshoot=overshoot,
                          deepfool_steps=deepfool_steps, deepfool_overshoot=deepfool_overshoot)
        for i in range(x.shape[0])
    ])
    return adv.detach().contiguous(memory_format=fmt)


def sparsefool(model: Model, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 10, lam: float = 3,
               overshoot: float = 0.02, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """SparseFool, untargeted, as torchattacks.SparseFool: see fastadv.SparseFool.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] true class indices.
        steps (int >= 0), lam (float > 0), overshoot (float >= 0): see fastadv.SparseFool.
        **engine: fastadv.engine.EngineOptions: precision, channels_last, batch_size.
    Returns the adversarial images [N, ...] on the model's device. The inner DeepFool
    runs with its defaults (50 steps, overshoot 0.02), as the reference's.
    """
    steps, lam, overshoot = check_sparsefool_args(steps, lam, overshoot)
    return run_functional(sparsefool_loop, model, images, labels, engine=engine, steps=steps, lam=lam,
                          overshoot=overshoot)


class SparseFool(Attack):
    r"""Attack in the paper 'SparseFool: a few pixels make a big difference'
    [https://arxiv.org/abs/1811.02248].

    Distance measure: L0. Each step runs DeepFool from the current image to a boundary
    point, scales its perturbation by lam, linearizes the model there, and changes the
    fewest pixels (largest gradient first) that cross that linearized boundary, times
    (1 + overshoot), clipped to [0, 1]; up to steps times, until the image is misclassified.

    Equivalence: bit-exact with torchattacks 3.5.1 SparseFool on CPU in fp32 (default mode
    only, as the reference). Runs one image at a time like the reference (a batch would
    change the model's rounding and so the boundary points); the solver does one dot
    product and one host sync per changed pixel (the reference: two dots, an argmax and a
    nonzero each). The inner DeepFool is fastadv's (bit-exact with the reference's on one
    image), set by the ``deepfool`` attribute as in the reference. Unlike the reference,
    the model parameters' .grad are never written.

    Arguments:
        model (nn.Module): model to attack.
        steps (int): outer steps, >= 0. (Default: 10)
        lam (float): scale of DeepFool's perturbation, > 0. (Default: 3)
        overshoot (float): final scaling (1 + overshoot), >= 0. (Default: 0.02)
        backend (str, keyword-only): accepted for API uniformity; SparseFool has no kernels.
        **engine (keyword-only): see fastadv.Attack; precision and channels_last apply
            to the model, batch_size chunks the batch, early_stop does not apply.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.SparseFool(model, steps=10, lam=3, overshoot=0.02)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, steps: int = 10, lam: float = 3, overshoot: float = 0.02, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("SparseFool", model, backend=backend, **engine)
        self.steps, self.lam, self.overshoot = check_sparsefool_args(steps, lam, overshoot)
        self.deepfool = DeepFool(model, backend=backend, **engine)
        self.supported_mode = ["default"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return sparsefool_loop(
            self.get_logits, x, y, steps=self.steps, lam=self.lam, overshoot=self.overshoot,
            deepfool_steps=self.deepfool.steps, deepfool_overshoot=self.deepfool.overshoot, engine=self.engine,
        )
