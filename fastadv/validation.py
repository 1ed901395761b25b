"""Checks at the API edge: bad input gets a clear error naming the argument.

Every check reads its inputs and never modifies them. The checks that need the
data cost one pass each, once per call, never per step: the images' range and
finiteness (one min/max pass), the labels' range (at the first forward, when the
number of classes is known). Alone, each reads its result on the host (a sync).
Inside ``deferred()`` (an attack call) the data checks only queue their device
results, and the call reads them all in one host sync at its end (or when it
fails, so that bad input still gets its clear error first).
"""
import contextlib
import math
import numbers
import threading

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
    _verify(torch.aminmax(images.detach()), lambda lo, hi: _image_range(name, lo, hi, check_range))


def _image_range(name, lo, hi, check_range):
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


def check_logits(logits, labels: torch.Tensor, n_classes_min: int = 1, defer: bool = False) -> None:
    """The model's output must be [N, C] logits with every label in range.

    defer: queue the label range in the call's deferred checks, if one is open, rather than
    read it now; only for a caller whose use of out-of-range labels cannot fail on the
    device before the call ends (a CUDA index out of range is a fatal device assert)."""
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
    check_label_range(labels, c, defer=defer)


def check_label_range(labels: torch.Tensor, n_classes: int, defer: bool = False) -> None:
    """Every label in [0, n_classes): one pass, one host sync (or none, deferred; see check_logits)."""
    if labels.numel():
        _verify(torch.aminmax(labels), lambda lo, hi: _label_range(n_classes, lo, hi), defer=defer)


def _label_range(n_classes, lo, hi):
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes - 1}] for a model with {n_classes} classes, got [{int(lo)}, {int(hi)}]"
        )


# -- one host read per call -------------------------------------------------------------------

_calls = threading.local()  # .open: the Deferred of this thread's call in progress (nested calls join it)


def _open():
    return getattr(_calls, "open", None)


def deferred_open() -> bool:
    """Whether the data checks made now wait for the call's one read (see deferred)."""
    return _open() is not None


class Deferred:
    """Data checks whose device results wait for one host read (see ``deferred``)."""

    def __init__(self):
        self._pending = []  # (0-d tensors, test(*host values) -> None or raise)

    def add(self, values, test):
        self._pending.append((tuple(values), test))

    def flush(self, *extra) -> list:
        """Read every queued value and extra (0-d tensors) in one host sync per device, run
        the queued tests in order (the first failure raises), and return extra's values."""
        pending, self._pending = self._pending, []
        if not pending and not extra:
            return []
        values = [v for vs, _ in pending for v in vs] + list(extra)
        host = read_scalars(values)
        at = 0
        for vs, test in pending:
            test(*host[at:at + len(vs)])
            at += len(vs)
        return host[at:]


def read_scalars(values) -> list:
    """0-d tensors as Python numbers: one transfer per accelerator (the values cast to float64
    to share it); in host memory, where a read waits for nothing, each read alone (no stacking)."""
    from fastadv.backend import KERNEL_DEVICE

    host = [None] * len(values)
    groups = {}
    for i, v in enumerate(values):
        if v.device.type == KERNEL_DEVICE:
            groups.setdefault(v.device, []).append(i)
        else:
            host[i] = v.item()
    for rows in groups.values():
        same = [values[i] for i in rows]
        if len({v.dtype for v in same}) > 1:
            same = [v.to(torch.float64) for v in same]
        for i, h in zip(rows, torch.stack(same).tolist() if len(same) > 1 else [same[0].item()]):
            host[i] = h
    return host


@contextlib.contextmanager
def deferred():
    """The data checks made inside wait for one host read, at the end (``flush`` may read
    them earlier, with the call's last result). When the block raises, the queued checks
    are read first, so bad input gets its own error rather than what it caused later.
    A nested block joins the open one."""
    if _open() is not None:
        yield _open()
        return
    checks = _calls.open = Deferred()
    try:
        yield checks
    except BaseException as exc:
        _calls.open = None
        try:
            checks.flush()
        except ValueError as bad:
            raise bad from exc
        except Exception:  # noqa: BLE001 - the checks could not be read: the original error says more
            pass
        raise
    _calls.open = None
    checks.flush()


def read_with_checks(*values) -> list:
    """values (0-d tensors) on the host, read together with the open call's queued checks
    (which run first), or alone when none is open."""
    return _open().flush(*values) if _open() is not None else read_scalars(list(values))


def _verify(values, test, defer=True):
    """test(*host values) now, or queued in the open deferred block."""
    if defer and _open() is not None:
        _open().add(values, test)
    else:
        test(*read_scalars(list(values)))


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
