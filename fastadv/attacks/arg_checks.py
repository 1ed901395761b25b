"""Argument checks shared by the attacks added for torchattacks' remaining names
(PIFGSM, PIFGSMPP, Jitter, PGDRS, PGDRSL2, GN, SPSA): counts and bounded numbers."""
import numbers

from fastadv import validation


def check_count(value, name: str, minimum: int = 1) -> int:
    """An int >= minimum (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_number(value, name: str, *, positive=False, upper=None):
    """A finite real >= 0 (> 0 when positive, <= upper when given), returned as given
    (an int stays an int, as the reference stores it)."""
    checked = validation.check_budget(value, name, positive=positive)
    if upper is not None and checked > upper:
        raise ValueError(f"{name} must be <= {upper}, got {checked}")
    return value


def check_choice(value, name: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    return value


def check_image_batch(x, attack: str) -> None:
    """Attacks that convolve their steps (PIFGSM) or take per-image norms need [N, C, H, W]."""
    if x.dim() != 4:
        raise ValueError(f"{attack} needs images of shape [N, C, H, W], got shape {tuple(x.shape)}")
