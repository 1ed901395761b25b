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
- cycle exit (``run_cycle_exit``): samples whose iterate repeats an earlier one leave
  the batch with the final iterate their cycle implies (the same bits as eager).
"""
import warnings

import torch

from fastadv import backend, calls, graphs
from fastadv.validation import memory_format

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
                tuple((k, graphs.value_key(v)) for k, v in sorted(per_sample.items())), backend.KERNEL_DEVICE)
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
    def rng_state():
        return torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()

    def set_rng_state(state):
        torch.cuda.set_rng_state(state, x.device) if x.is_cuda else torch.set_rng_state(state)

    state = rng_state()
    while True:
        try:
            out = fn(_rows(x, 0, size), _rows(y, 0, size))
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
    return torch.cat([first, chunked(fn, x[size:], None if y is None else y[size:], size)])


# Exact early exit (cycle_exit): how many recent iterates are kept per sample (periods up to
# CYCLE_HISTORY - 1 are found) and how often, in steps, the loop looks for repeats (one host
# sync per look). Both measured on the digits and ResNet-18 benchmarks (see README, speed).
CYCLE_HISTORY = 16
CYCLE_CHECK_EVERY = 4


def run_cycle_exit(update, grad, adv, steps, per_sample, *, history=None, check_every=None):
    """Iterate like ``run``, but stop iterating each sample once its iterate repeats.

    When the next iterate is a deterministic function of the current one, per sample
    (see EngineOptions.cycle_exit for when that holds), an iterate that equals one of
    p steps earlier means the sequence has period p from there on, so the final iterate
    is already known: the one (steps - t) mod p steps further round the cycle. The
    loop keeps the last ``history`` iterates of every active sample in a ring (the
    update writes straight into it), and every ``check_every`` steps compares the
    current iterate bit for bit with the earlier ones; samples that repeat leave
    the batch with the iterate their period implies. It holds ``history`` copies of the
    batch's iterates (16 by default). The loss of the samples that stay
    keeps the full batch's scale (grad.keep), so their trajectory is unchanged.
    Returns a tensor equal, bit for bit, to ``run``'s. history, check_every: None for
    CYCLE_HISTORY and CYCLE_CHECK_EVERY (read at call time, so a benchmark can sweep them).
    """
    history = CYCLE_HISTORY if history is None else history
    check_every = CYCLE_CHECK_EVERY if check_every is None else check_every
    if history < 2 or check_every < 1:
        raise ValueError(f"history must be >= 2 and check_every >= 1, got {history} and {check_every}")
    result = torch.empty_like(adv)
    ring = [adv.clone()] + [torch.empty_like(adv) for _ in range(history - 1)]
    active = torch.arange(adv.shape[0], device=adv.device)
    for t in range(steps):
        current, slot = ring[t % history], (t + 1) % history
        ring[slot] = update(current, grad(current), out=ring[slot], **per_sample)
        done = t + 1
        if done % check_every == 0 and done < steps:
            settled, final = _settled(ring, done, steps)
            if settled is not None:
                keep = torch.nonzero(~settled).flatten()
                result[active[settled]] = final
                active = active[keep]
                if active.numel() == 0:
                    return result
                ring = [_take(r, keep) for r in ring]
                per_sample = {k: (_take(v, keep) if _per_sample(v, settled.shape[0]) else v) for k, v in per_sample.items()}
                grad.keep(~settled)
    result[active] = ring[steps % history]
    return result


def _settled(ring, done, steps):
    """(mask of the samples whose iterate after `done` steps repeats an earlier one, their
    iterates after `steps` steps), or (None, None) when none repeats (one host sync)."""
    history = len(ring)
    current = _bits(ring[done % history])
    period = torch.zeros(current.shape[0], dtype=torch.long, device=current.device)
    for p in range(min(history - 1, done), 0, -1):  # descending: the shortest period wins
        same = (current == _bits(ring[(done - p) % history])).flatten(1).all(1)
        period = torch.where(same, p, period)
    settled = period > 0
    if not bool(settled.any()):
        return None, None
    period = period[settled]
    # The cycle is ring[done - p], ..., ring[done - 1]; step `steps` lands (steps - done) mod p past its start.
    slots = (done - period + (steps - done) % period) % history
    rows = torch.nonzero(settled).flatten()
    final = torch.stack([_take(r, rows) for r in ring])[slots, torch.arange(rows.numel(), device=rows.device)]
    return settled, final


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    """t's bit patterns as integers: a repeat is the same bits (0.0 and -0.0 differ, a NaN equals itself)."""
    return t.view(_SAME_SIZE_INT[t.element_size()])


def _per_sample(v, n):
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n


def _take(t, rows):
    """t's rows, in t's memory format (a channels_last run stays channels_last: same bits)."""
    return t.index_select(0, rows).contiguous(memory_format=memory_format(t))
