"""Runs an attack's iterations: eager, as a replayed CUDA graph, or with early stopping.

An iterative attack is ``adv <- update(adv, grad(adv))`` repeated. How it is run
never changes the arithmetic of a step:

- eager: the plain loop (the CPU path, and the fallback);
- CUDA graph: one step (forward, loss, input-gradient backward, fused update) is
  captured once and replayed, removing Python and launch overhead; the capture is kept
  and replayed by later calls of the same shape and settings on the same model
  (fastadv.graphs). A model that cannot be captured falls back to eager with a
  one-line warning;
- early stop: after each gradient evaluation the samples that already fool the
  model leave the batch (one host sync per step: how many left; the rows are then
  moved by index, without reading them); each keeps the first iterate that fooled it.
- the cycle exit runs on fixed-shape slots (fastadv.slots), not here.
"""
import warnings

import torch

from fastadv import backend, calls, graphs

def keep_rows(tensors: dict, rows: torch.Tensor, n: int) -> dict:
    """Index every per-sample tensor (first dim = n, the batch) of a dict by rows (indices or a mask)."""
    return {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v) for k, v in tensors.items()}


def run(update, grad, adv, steps, per_sample, *, early_stop=False, cuda_graph=False, model=None):
    """Iterate adv <- update(adv, grad(adv), **per_sample) and return the final iterate.

    update(adv, g, out=None, **per_sample) returns the next iterate (in out when given).
    per_sample: tensors indexed by sample that update needs (x, eps, ...).
    grad: a CrossEntropyGradient-like callable with succeeded() and keep(mask).
    """
    if early_stop:
        return _run_early_stop(update, grad, adv, steps, per_sample)
    if cuda_graph and steps >= 2 and adv.device.type == backend.KERNEL_DEVICE and graphs.capturable(graphs.owner_of(model)):
        return _run_graph(update, grad, adv, steps, per_sample, model)
    return _run_eager(update, grad, adv, steps, per_sample)


def _run_early_stop(update, grad, adv, steps, per_sample):
    result = adv.clone()
    active = torch.arange(adv.shape[0], device=adv.device)
    for _ in range(steps):
        g = grad(adv)
        fooled = grad.succeeded()
        n, left = fooled.shape[0], int(fooled.sum())  # the one host sync per step that early stopping costs
        if left:
            # the rows that stay first, then those that leave, each in batch order: index tensors
            # of known length, so that no mask is read on the host again
            order = torch.argsort(fooled.to(torch.uint8), stable=True)
            keep, gone = order[:n - left], order[n - left:]
            result.index_copy_(0, active[gone], adv[gone])
            active, adv, g = active[keep], adv[keep], g[keep]
            per_sample = keep_rows(per_sample, keep, n)
            grad.keep(keep)
            if left == n:
                return result
        adv = update(adv, g, **per_sample)
    result[active] = adv
    return result


def _run_graph(update, grad, adv, steps, per_sample, model):
    """The steps as one captured step replayed, the capture kept across calls (fastadv.graphs)
    when the gradient can refill its inputs (graph_inputs); the caller gets a copy of the result."""
    owner = graphs.owner_of(model)
    tensors = {k: v for k, v in per_sample.items() if isinstance(v, torch.Tensor)}
    key = _graph_key(update, grad, adv, per_sample, model)
    entry = graphs.cached(owner, key)
    if entry is not None:
        inputs = {"adv": adv, **tensors, **_prefixed(entry.context.graph_inputs(like=grad))}
        entry.load(inputs).replay(steps)
        return entry.static["adv"].clone()

    def make_step(static):
        if key is not None:  # the captured gradient reads its inputs from the static buffers
            grad.use_graph_inputs({k[len("grad."):]: v for k, v in static.items() if k.startswith("grad.")})
        args = {k: static.get(k, v) for k, v in per_sample.items()}
        iterate = static["adv"]

        def step():  # in place: the graph reads and writes the same buffers every replay
            update(iterate, grad(iterate), out=iterate, **args)

        return step

    inputs = {"adv": adv, **tensors, **(_prefixed(grad.graph_inputs()) if key is not None else {})}
    entry = graphs.capture(owner, key, make_step, inputs, calls.counters(owner), context=grad)
    if entry is None:
        return _run_eager(update, grad, adv, steps, per_sample)
    entry.replay(steps - 1)  # the capture ran the first step
    return entry.static["adv"] if key is None else entry.static["adv"].clone()


def _graph_key(update, grad, adv, per_sample, model):
    """Everything a capture of this loop's step bakes in (see fastadv.graphs), or None when
    the gradient cannot refill its inputs or a part cannot be compared across calls."""
    if not hasattr(grad, "graph_key"):
        return None
    try:
        return (graphs.function_key(update), graphs.tensor_key(adv), grad.graph_key(), graphs.forward_key(model),
                tuple((k, graphs.value_key(v)) for k, v in sorted(per_sample.items())), backend.KERNEL_DEVICE,
                graphs.settings_key())
    except graphs.Uncacheable:
        return None


def _prefixed(inputs: dict) -> dict:
    return {f"grad.{k}": v for k, v in inputs.items()}


def _run_eager(update, grad, adv, steps, per_sample):
    for _ in range(steps):
        adv = update(adv, grad(adv), **per_sample)
    return adv


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError
    (which PyTorch raises as a plain RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def chunked(fn, x, y, batch_size):
    """fn(x[i:j], y[i:j]) over chunks of at most batch_size, concatenated (y may be None).

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
        out, size = _retry_on_oom(fn, x[start:start + size], _rows(y, start, start + size), size, return_size=True)
        outs.append(out)
        start += out.shape[0]
    return torch.cat(outs)


def _rows(t, start, stop):
    """t[start:stop]; t itself when that is all of it (a slice is a dispatched op), None for None."""
    return t if t is None or (start == 0 and stop >= t.shape[0]) else t[start:stop]


def _retry_on_oom(fn, x, y, size, return_size=False):
    out, size = halving_on_oom(lambda size: fn(_rows(x, 0, size), _rows(y, 0, size)), size, x.device)
    return (out, size) if return_size else _finish_rest(fn, x, y, out, size)


def halving_on_oom(fn, size, device):
    """fn(size), retried with size halved (from the same RNG state) while an allocation fails;
    returns (result, the size that ran)."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    cuda = device.type == "cuda"
    state = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    while True:
        try:
            return fn(size), size
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if size == 1 or not is_out_of_memory(exc):
                raise
            # the retry draws the same random start
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.set_rng_state(state, device)
            else:
                torch.set_rng_state(state)
            size = (size + 1) // 2
            warnings.warn(f"fastadv: {device.type.upper()} out of memory; continuing with chunks of {size}",
                          stacklevel=5)


def _finish_rest(fn, x, y, first, size):
    if size >= x.shape[0]:
        return first
    return torch.cat([first, chunked(fn, x[size:], None if y is None else y[size:], size)])
