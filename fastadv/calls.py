"""Counting model calls: an attack's cost is its forward passes and input-gradient backward passes."""
import torch.nn as nn


class CallCounter(nn.Module):
    """Wraps a model and counts, in samples, the forward passes through it and the
    backward passes (gradient evaluations) that reach its output.

    The counts are measured, not derived from an attack's settings: a forward of a
    batch of 64 adds 64 to ``forwards``; a backward through that output adds 64 to
    ``backwards``. Divide by the number of attacked samples for calls per sample.
    The wrapper has no parameters and passes train()/eval() through to the model.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        # the wrapper's own mode is the model's: a library that restores "the model's mode" after
        # an attack (torchattacks) would otherwise put an eval model into training mode
        self.training = bool(getattr(model, "training", False))
        self.reset()

    def reset(self):
        self.forwards = 0
        self.backwards = 0

    def forward(self, x, *args, **kwargs):
        out = self.model(x, *args, **kwargs)
        n = x.shape[0]
        self.forwards += n
        if out.requires_grad:
            out.register_hook(lambda grad: self._count_backward(n))
        return out

    def _count_backward(self, n):
        self.backwards += n

    def mark(self):
        """The counts now, for repeat_since."""
        return self.forwards, self.backwards

    def repeat_since(self, mark, times):
        """Count the calls made since mark `times` more times (negative: fewer). A replayed CUDA
        graph runs the calls it recorded without calling the model's Python again."""
        self.forwards += (self.forwards - mark[0]) * times
        self.backwards += (self.backwards - mark[1]) * times

    def per_sample(self, n):
        """(forwards, backwards) per sample of an n-sample run."""
        return self.forwards / n, self.backwards / n


def counters(model) -> list:
    """The CallCounters in a model (itself or any submodule)."""
    return [m for m in model.modules() if isinstance(m, CallCounter)] if isinstance(model, nn.Module) else []
