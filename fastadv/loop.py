"""Runs an attack's iterations: eager, as a replayed CUDA graph, or with early stopping.

An iterative attack is ``adv <- update(adv, grad(adv))`` repeated. How it is run
never changes the arithmetic of a step:

- eager: the plain loop (the CPU path, and the fallback);
- CUDA graph: one step (forward, loss, input-gradient backward, fused update) is
  captured once and replayed, removing Python and launch overhead; used on CUDA for
  the Triton backend. A model that cannot be captured falls back to eager with a
  one-line warning;
- early stop: after each gradient evaluation the samples that already fool the
  model leave the batch (one host sync per step); each keeps the first iterate
  that fooled it.
- the cycle exit runs on fixed-shape slots (fastadv.slots), not here.
"""
import warnings

import torch

from fastadv import backend, calls

# Models (by id) whose capture failed once: not tried again in this process.
_uncapturable = set()


def keep_rows(tensors: dict, mask: torch.Tensor) -> dict:
    """Index every per-sample tensor (first dim = batch) of a dict by mask."""
    n = mask.shape[0]
    return {k: (v[mask] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v) for k, v in tensors.items()}


def run(update, grad, adv, steps, per_sample, *, early_stop=False, cuda_graph=False, model=None):
    """Iterate adv <- update(adv, grad(adv), **per_sample) and return the final iterate.

    update(adv, g, out=None, **per_sample) returns the next iterate (in out when given).
    per_sample: tensors indexed by sample that update needs (x, eps, ...).
    grad: a CrossEntropyGradient-like callable with succeeded() and keep(mask).
    """
    if early_stop:
        return _run_early_stop(update, grad, adv, steps, per_sample)
    if cuda_graph and steps >= 2 and adv.device.type == backend.KERNEL_DEVICE and id(model) not in _uncapturable:
        return _run_graph(update, grad, adv, steps, per_sample, model)
    for _ in range(steps):
        adv = update(adv, grad(adv), **per_sample)
    return adv


def _run_early_stop(update, grad, adv, steps, per_sample):
    result = adv.clone()
    active = torch.arange(adv.shape[0], device=adv.device)
    for _ in range(steps):
        g = grad(adv)
        fooled = grad.succeeded()
        if fooled.any():  # the one host sync per step that early stopping costs
            result[active[fooled]] = adv[fooled]
            keep = ~fooled
            active, adv, g = active[keep], adv[keep], g[keep]
            per_sample = keep_rows(per_sample, keep)
            grad.keep(keep)
            if active.numel() == 0:
                return result
        adv = update(adv, g, **per_sample)
    result[active] = adv
    return result


def _run_graph(update, grad, adv, steps, per_sample, model):
    static = adv.clone()

    def step():  # in place: the graph reads and writes the same buffer every replay
        update(static, grad(static), out=static, **per_sample)

    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller)
    with torch.cuda.stream(side):  # the first step runs eagerly: warms up cuDNN/Triton and checks the logits
        step()
    caller.wait_stream(side)
    counters = calls.counters(model)
    marks = [c.mark() for c in counters]
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
        _recover_from_failed_capture(caller)
        _uncapturable.add(id(model))
        warnings.warn(f"fastadv: CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly", stacklevel=3)
        for counter, mark in zip(counters, marks):
            counter.repeat_since(mark, -1)  # the capture recorded a step it never ran
        torch.cuda.synchronize()
        for _ in range(steps - 1):
            static = update(static, grad(static), **per_sample)
        return static
    for counter, mark in zip(counters, marks):
        counter.repeat_since(mark, steps - 2)  # counted once while recorded; runs steps - 1 times
    for _ in range(steps - 1):
        graph.replay()
    return static


def _recover_from_failed_capture(caller):
    """Undo what a failed capture leaves behind in torch (seen with torch 2.11 on an H200):
    torch.cuda.graph's exit raises before it restores the caller's stream, and the device's
    default generator still believes it is capturing, so the next CUDA random draw raises
    'Offset increment outside graph capture'. A clone of the generator's state (same seed
    and offset, not capturing) replaces it."""
    torch.cuda.set_stream(caller)
    gen = torch.cuda.default_generators[caller.device.index]
    gen.graphsafe_set_state(gen.clone_state())


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError
    (which PyTorch raises as a plain RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def chunked(fn, x, y, batch_size):
    """fn(x[i:j], y[i:j]) over chunks of at most batch_size, concatenated.

    When an allocation fails (CUDA or CPU out of memory) the chunk is halved and
    retried from the same RNG state, so a large evaluation finishes rather than
    crashes. batch_size None: one chunk.
    """
    n = x.shape[0]
    size = n if batch_size is None else max(1, min(int(batch_size), n))
    if size >= n:
        return _retry_on_oom(fn, x, y, n)
    outs, start = [], 0
    while start < n:
        out, size = _retry_on_oom(fn, x[start:start + size], y[start:start + size], size, return_size=True)
        outs.append(out)
        start += out.shape[0]
    return torch.cat(outs)


def _retry_on_oom(fn, x, y, size, return_size=False):
    def rng_state():
        return torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()

    def set_rng_state(state):
        torch.cuda.set_rng_state(state, x.device) if x.is_cuda else torch.set_rng_state(state)

    state = rng_state()
    while True:
        try:
            out = fn(x[:size], y[:size])
            return (out, size) if return_size else _finish_rest(fn, x, y, out, size)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if size == 1 or not is_out_of_memory(exc):
                raise
            if x.is_cuda:
                torch.cuda.empty_cache()
            set_rng_state(state)  # the retry draws the same random start
            size = (size + 1) // 2
            warnings.warn(f"fastadv: {x.device.type.upper()} out of memory; continuing with chunks of {size}", stacklevel=4)


def _finish_rest(fn, x, y, first, size):
    if size >= x.shape[0]:
        return first
    return torch.cat([first, chunked(fn, x[size:], y[size:], size)])
