"""Checks at the API edge: bad input gets a clear error naming the argument.

Every check reads its inputs and never modifies them. The checks that need the
data cost one pass and one host sync each, once per call, never per step: the
images' range and finiteness (one min/max pass), the labels' range (at the first
forward, when the number of classes is known).
"""
import math
import numbers

import torch

RANGE_TOL = 1e-6  # images may leave [0, 1] by this much (normalization round trips)


def check_images(images, name="images", check_range=True) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}"
            " (convert integer images with images.float() / 255)"
        )
    if images.dim() < 2:
        raise ValueError(f"{name} must have shape [N, ...] (e.g. [N, C, H, W]), got shape {tuple(images.shape)}")
    if images.numel() == 0:
        return
    # NaN propagates through min and max, inf lands in one of them: one pass tells all
    lo, hi = torch.stack(torch.aminmax(images.detach())).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf")
    if check_range and (lo < -RANGE_TOL or hi > 1 + RANGE_TOL):
        raise ValueError(f"{name} must lie in [0, 1] (the attack's pixel space), got values in [{lo:.6g}, {hi:.6g}]")


def check_labels(labels, n: int, name="labels") -> None:
    if labels is None:
        raise ValueError(f"{name} are required: pass a tensor of shape [{n}] with class indices")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] to match the images, got shape {tuple(labels.shape)}")


def check_logits(logits, labels: torch.Tensor, n_classes_min: int = 1) -> None:
    """The model's output must be [N, C] logits with every label in range."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model must return a tensor of logits [N, C], got {type(logits).__name__}")
    n = labels.shape[0]
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"the model must return logits of shape [N={n}, C], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"the model must return floating-point logits, got dtype {logits.dtype}")
    c = logits.shape[1]
    if c < n_classes_min:
        raise ValueError(f"the model returns {c} classes, at least {n_classes_min} needed")
    check_label_range(labels, c)


def check_label_range(labels: torch.Tensor, n_classes: int) -> None:
    """Every label in [0, n_classes): one pass, one host sync."""
    if labels.numel():
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()
        if lo < 0 or hi >= n_classes:
            raise ValueError(
                f"labels must lie in [0, {n_classes - 1}] for a model with {n_classes} classes, got [{lo}, {hi}]"
            )


def check_budget(value, name: str, *, positive=False, n=None):
    """A float >= 0 (> 0 when positive), or, when n is given, an [n] tensor of them."""
    if isinstance(value, torch.Tensor):
        if n is None or value.dim() == 0:
            if value.numel() != 1:
                raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
            value = value.item()
        else:
            if value.shape != (n,):
                raise ValueError(f"{name} must be a number or a tensor of shape [{n}], got shape {tuple(value.shape)}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
            if n and not torch.isfinite(value).all():
                raise ValueError(f"{name} contains NaN or inf")
            if n and ((value <= 0).any() if positive else (value < 0).any()):
                raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} for every sample")
            return value.detach()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def check_steps(steps, name="steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps}")
    return int(steps)


def memory_format(x: torch.Tensor):
    """The memory format to hand results back in: channels_last if x is, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def explain_float32_inputs(forward, images_dtype: torch.dtype, attack: str):
    """forward, for an attack whose arithmetic runs in float32 (as its reference's does): with
    fp16/bf16 images the model is fed float32 iterates, and a model that refuses them (fp16
    weights, say) raises a TypeError saying so instead of its own error from deep inside."""
    if images_dtype == torch.float32:
        return forward

    def call(x, *args, **kwargs):
        try:
            return forward(x, *args, **kwargs)
        except RuntimeError as exc:
            if x.dtype != torch.float32:
                raise
            raise TypeError(
                f"{attack} works in float32, as its reference does, so a model attacked with {images_dtype} images "
                f"is fed float32 iterates, and this model refused them ({exc}). Attack a float32 copy of the model "
                f"(model.float())"
            ) from exc

    return call
