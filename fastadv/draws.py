"""Random draws bit for bit as PyTorch makes them, cheaper where the reference throws values away.

torchattacks draws uniform noise as ``torch.randn_like(x).uniform_(low, high)`` (FFGSM,
VMIFGSM, VNIFGSM): the normal values are overwritten at once, so all that the normal fill
contributes is how far it advances the generator. On the CPU, for a contiguous fp32 tensor
of 16 or more elements, ATen's normal fill takes one 32-bit draw per element (16 more when
the count is not a multiple of 16, which it redraws), exactly as many as a uniform fill
takes, which skips the Box-Muller transform: about half the cost. Whether this torch
behaves so is checked once per process on private generators; where it does not, or on
other devices, dtypes and layouts, the normal fill is made as the reference makes it.
"""
import functools

import torch


def _normal_advance(n: int) -> int:
    """32-bit draws a CPU normal fill of n >= 16 fp32 elements takes."""
    return n if n % 16 == 0 else n + 16


@functools.cache
def _uniform_fill_advances_as_normal_fill() -> bool:
    for n in (16, 48, 50, 3 * 32 * 32 + 5):
        normal, uniform = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        torch.empty(n).normal_(generator=normal)
        torch.empty(_normal_advance(n)).uniform_(generator=uniform)
        if not torch.equal(normal.get_state(), uniform.get_state()):
            return False
    return True


def uniform_after_discarded_normal(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``torch.randn_like(like).uniform_(low, high)``: the same values and generator state."""
    cheap = (like.device.type == "cpu" and like.dtype == torch.float32 and like.numel() >= 16
             and like.is_contiguous() and _uniform_fill_advances_as_normal_fill())
    if not cheap:
        return torch.randn_like(like).uniform_(low, high)
    noise = torch.empty_like(like, memory_format=torch.contiguous_format)
    noise.uniform_()  # the normal fill's draws, values unused
    if like.numel() % 16:
        torch.empty(16).uniform_()  # and the 16 it redraws for the tail
    return noise.uniform_(low, high)
