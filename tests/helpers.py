"""Assertions with informative failures, and the tolerance table."""
import torch

# Bounds for results that are not bit-exact (the L2 kernels' norms are summed in a
# different order from torch.norm); exact ops are compared with torch.equal.
L2_KERNEL_ATOL = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, max_show=5) -> str:
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    if a.dtype != e.dtype:
        return f"dtype {a.dtype} != {e.dtype}"
    a64, e64 = a.double(), e.double()
    nan_a, nan_e = a64.isnan(), e64.isnan()
    both_nan = nan_a & nan_e
    bad = ((a64 != e64) & ~both_nan)
    idx = bad.nonzero()[:max_show].tolist()
    diff = (a64 - e64).abs()[bad & ~nan_a & ~nan_e]
    return (
        f"{int(bad.sum())}/{a.numel()} elements differ; NaN only in actual: {int((nan_a & ~nan_e).sum())}, "
        f"only in expected: {int((nan_e & ~nan_a).sum())}; inf in actual: {int(a64.isinf().sum())}; "
        f"max abs diff {diff.max().item() if diff.numel() else 0:.3g}; first indices {idx}"
    )


def assert_equal(actual, expected, msg=""):
    """Bit-for-bit equality (NaN never equals)."""
    assert torch.equal(actual, expected), f"{msg} {describe_mismatch(actual, expected)}"


def assert_close(actual, expected, atol, msg=""):
    """|actual - expected| <= atol everywhere; NaN only where expected has NaN."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, describe_mismatch(actual, expected)
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{msg} NaN positions differ: {describe_mismatch(actual, expected)}"
    finite = ~nan_e
    diff = (actual[finite].double() - expected[finite].double()).abs().max().item() if finite.any() else 0.0
    assert diff <= atol, f"{msg} max abs diff {diff:.3g} > {atol:.3g}: {describe_mismatch(actual, expected)}"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN-filled output buffer, so an element a kernel forgets to write fails the test."""
    return torch.full_like(t, float("nan"))
