"""Host-side helpers for the kernel launchers: layouts, block sizes, budgets."""
import functools
import math
import struct

import torch
import triton

MAX_BLOCK = 4096
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_images(**named):
    """Raise a clear error, naming the argument, for inputs the kernels cannot take (so a
    caller never meets a Triton compile error): the first is the reference, the others must
    match its shape, dtype and device; the dtype must be fp32, fp16 or bf16."""
    (ref_name, ref), *others = named.items()
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if ref.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{ref_name} has dtype {ref.dtype}; the kernels take float32, float16 or bfloat16 "
                        f"(backend='torch' takes any floating dtype)")
    if ref.dim() == 0:
        raise ValueError(f"{ref_name} must have a batch dimension, got a 0-d tensor")
    for name, t in others:
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {ref_name}'s {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {ref_name}'s {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, expected {ref_name}'s device {ref.device}")


def elementwise_settings(n: int):
    """Block size and warp count for a 1-D elementwise kernel over n elements."""
    block = min(MAX_BLOCK, max(128, triton.next_power_of_2(n)))
    num_warps = min(max(block // 256, 1), 8)
    return block, num_warps


def dense_like(ref: torch.Tensor, *others: torch.Tensor):
    """Return ref and others in one shared dense layout with the batch outermost.

    The kernels walk storage as a flat array and find an element's sample as
    offset // (numel / N), which holds for contiguous and channels_last tensors.
    Anything else is copied to contiguous first.
    """
    fmt = torch.contiguous_format
    if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    # is_contiguous is a flag read; contiguous() is a dispatched op even when it returns t itself
    return [t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt) for t in (ref, *others)]


@functools.lru_cache(maxsize=256)  # a run converts the same few budgets on every launch
def fp32(value) -> float:
    """A Python float rounded to fp32 (nearest, ties to even; inf past fp32's range), as
    PyTorch and compiled Triton pass scalars. (The interpreter would type a float that fp32
    cannot hold, like 1e-150, as fp64.) Pure Python: no tensor per launch."""
    value = float(value)
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # finite, but rounds past fp32's largest value
        return math.copysign(math.inf, value)


def eps_args(eps, n_samples: int, device, name: str = "eps"):
    """(scalar, pointer, per_sample flag) for a float or [N] tensor budget or step.

    For a float the pointer is None: Triton makes a None argument a constexpr, and the
    kernel never reads it when PER_SAMPLE is False, so no placeholder is allocated."""
    if isinstance(eps, torch.Tensor):
        if eps.numel() != n_samples:  # the kernel reads value[sample] for every sample
            raise ValueError(f"{name} has {eps.numel()} values, expected one per sample ({n_samples}) or a float")
        return 0.0, eps.to(device=device, dtype=torch.float32).contiguous(), True
    return fp32(eps), None, False


def output_buffer(out, dense: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes: out itself when it has dense's layout, else a fresh buffer."""
    if out is not None and out.shape == dense.shape and out.stride() == dense.stride() and out.dtype == dense.dtype:
        return out
    return torch.empty_like(dense)


def deliver(out, written: torch.Tensor) -> torch.Tensor:
    """The launcher's return value: out (filled from written if needed) or written."""
    if out is None or out is written:
        return written
    return out.copy_(written)
