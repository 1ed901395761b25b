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

    def per_sample(self, n):
        """(forwards, backwards) per sample of an n-sample run."""
        return self.forwards / n, self.backwards / n
