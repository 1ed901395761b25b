"""The momentum sign-step loop and the gradient wrappers the MI-FGSM family shares.

MIFGSM, UPGD, DIFGSM, TIFGSM, NIFGSM, SINIFGSM, VMIFGSM and VNIFGSM all update

    momentum <- g / mean(|g|) + decay * momentum;  adv <- P(adv + alpha * sign(momentum))

on ops.mifgsm_step; they differ only in the gradient g. A gradient here is a callable
g(adv) with succeeded() and keep(mask) (see engine.CrossEntropyGradient); the
wrappers below build the variants from it, each in the reference's op order.
"""
import numbers

import torch

from fastadv import draws, loop, ops
from fastadv.backend import resolve
from fastadv.engine import EXACT


def momentum_iterations(grad, adv, x, momentum, *, eps, alpha, steps, decay, backend=None, engine=EXACT, model=None,
                        cuda_graph=True):
    """steps MI-FGSM updates from adv; returns the last iterate.

    momentum is updated in place (a Nesterov look-ahead reads that buffer; a captured
    CUDA graph replays the update on it). cuda_graph=False for gradients that draw
    host randomness or change shapes per step.
    """

    def update(adv, g, x, eps, alpha, momentum, out=None):
        return ops.mifgsm_step(
            adv, x, g, momentum, alpha=alpha, eps=eps, decay=decay, backend=backend, out=out, momentum_out=momentum,
            consume_grad=True,
        )[0]

    state = {"x": x, "eps": eps, "alpha": alpha, "momentum": momentum}
    return loop.run(
        update, grad, adv, steps, state, early_stop=engine.early_stop,
        cuda_graph=cuda_graph and engine.use_graph(x, resolve(backend, x.device)), model=model,
    )


def check_count(value, name: str) -> int:
    """An int >= 1 (N, m, eot_iter...)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def refuse_early_stop(engine, name: str, reason: str) -> None:
    """early_stop judges a sample by the logits of the last gradient evaluation; where
    that is not the iterate's, it would stop on the wrong evidence."""
    if engine.early_stop:
        raise ValueError(f"{name} does not support early_stop: {reason}")


class MeanGradient:
    """The mean of n evaluations at one point, as UPGD takes it (zeros, then += g / n).

    Computed in the first gradient's buffer: 0 + g / n is g / n except that -0.0
    becomes +0.0, a difference sign() and the later sums never see.
    """

    def __init__(self, gradient, n: int):
        self.gradient = gradient
        self.n = n

    def __call__(self, adv):
        total = self.gradient(adv)
        if self.n == 1:
            return total  # g / 1 == g
        total.div_(self.n)
        for _ in range(self.n - 1):
            total += self.gradient(adv).div_(self.n)
        return total

    def succeeded(self):
        return self.gradient.succeeded()

    def keep(self, mask):
        self.gradient.keep(mask)


class Lookahead:
    """Nesterov: the gradient at adv + (decay * alpha) * momentum (the momentum buffer
    as it is when called). The look-ahead is an addition, whose backward passes the
    gradient through unchanged: taking it at that point equals the reference's
    gradient with respect to adv bit for bit."""

    def __init__(self, gradient, momentum, coefficient: float):
        self.gradient = gradient
        self.momentum = momentum
        self.coefficient = coefficient

    def __call__(self, adv):
        return self.gradient(adv.detach() + self.coefficient * self.momentum)


class ScaledCopiesGradient:
    """Scale invariance (SI-NI-FGSM): the sum of the gradients at point / 2**i, i < m,
    accumulated from zeros in that order, divided by m."""

    def __init__(self, gradients):
        self.gradients = gradients  # gradient i evaluates the model at its input / 2**i

    def __call__(self, point):
        total = torch.zeros_like(point)
        for gradient in self.gradients:
            total += gradient(point)
        return total / len(self.gradients)


class VarianceTuned:
    """Variance tuning (VMI/VNI-FGSM): returns g + v, where g is gradient(adv) and v
    the previous step's variance, then sets v = mean of neighbor gradients at
    adv + U(-radius, radius) (N draws, each a randn_like then uniform_ in the layout
    of like, as the reference draws) - g."""

    def __init__(self, gradient, neighbor_gradient, like, n: int, radius: float):
        self.gradient = gradient
        self.neighbor_gradient = neighbor_gradient
        self.like = like
        self.n = n
        self.radius = radius
        self.variance = None

    def __call__(self, adv):
        g = self.gradient(adv)
        tuned = g + self.variance if self.variance is not None else g.clone()  # g + 0 == g
        total = torch.zeros_like(adv)
        base = adv.detach()
        for _ in range(self.n):
            noise = draws.uniform_after_discarded_normal(self.like, -self.radius, self.radius)
            total += self.neighbor_gradient(noise.add_(base))  # noise + adv == adv + noise
        self.variance = total.div_(self.n).sub_(g)
        return tuned
