"""Host-side helpers for the kernel launchers: layouts, block sizes, budgets."""
import torch
import triton

MAX_BLOCK = 4096


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
    return [t.contiguous(memory_format=fmt) for t in (ref, *others)]


def fp32(value) -> float:
    """A Python float rounded to fp32, as PyTorch and compiled Triton pass scalars. (The
    interpreter would type a float that fp32 cannot hold, like 1e-150, as fp64.)"""
    return float(torch.tensor(float(value), dtype=torch.float32))


def eps_args(eps, n_samples: int, device):
    """(scalar, pointer tensor, per_sample flag) for a float or [N] tensor budget or step."""
    if isinstance(eps, torch.Tensor):
        return 0.0, eps.to(device=device, dtype=torch.float32).contiguous(), True
    # The pointer is never read when PER_SAMPLE is False; any fp32 tensor will do.
    return fp32(eps), torch.empty(1, device=device, dtype=torch.float32), False


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
