"""Captured CUDA graphs of an attack step, kept and replayed across calls.

A CUDA graph replays the kernels one step launched, reading and writing the same memory
every time: no Python, no launch cost. Capturing one costs more than ten steps save
(measured on an H200), so a graph pays only when it is replayed across calls: the
batches of a training epoch, the chunks of an evaluation, the refills of fixed-shape
slots all run one step of one shape over and over.

The API is two functions::

    step = graphs.cached(owner, key)              # kept from an earlier call, or None
    if step is not None:
        step.load(inputs)                         # this call's values into its static buffers
    else:
        step = graphs.capture(owner, key, make_step, inputs)   # None: run eagerly
    step.replay(n)                                # and read or refill step.static between replays

``inputs`` are the tensors the step reads that change from call to call (the iterate,
the clean images, the labels, per-sample budgets), by name. ``capture`` copies them into
static buffers, ``make_step(static)`` returns the step function (it must read and write
only ``static`` and what the key pins), and the step runs once eagerly (its warm-up:
cuDNN, Triton, the lazy checks; ``step.warmed`` tells the caller that one step has run)
before it is captured. Every later call loads its inputs into the same buffers and
replays; a caller may also write into ``step.static`` between replays (a slot scheduler
refilling rows). ``owner`` is what the graph belongs to (``owner_of(forward)``: the model).

What a capture bakes in, and so what invalidates it:

- ``key``: everything the step's arithmetic depends on that is not in a buffer: shapes,
  dtypes, layouts and devices of the inputs (``tensor_key``), scalar budgets, options, the
  step's code (``function_key``), the global cuDNN, TF32 and determinism settings
  (``settings_key``). The caller builds it; a different key is another graph.
- ``model_state(owner)``: the storage of every parameter and buffer, every module's
  mode and every parameter's requires_grad. A graph reads the weights where they were at
  capture: a parameter updated in place (an optimizer step) is read anew by every replay,
  but one replaced (``p.data = ...``, ``load_state_dict(assign=True)``, a new Parameter) would
  be stale, so its entry is dropped and captured again. Values are not part of the state
  (in-place updates are what training does), storage addresses are.

At most ``MAX_PER_OWNER`` graphs are kept per owner (least recently used first out): each
holds the memory of one step's activations. A capture that fails marks the owner
uncapturable for the process (a one-line warning, then the eager path), except when it
failed for lack of memory: then only that call runs eagerly.
"""
import collections
import warnings
import weakref

import torch
import torch.nn as nn

MAX_PER_OWNER = 2


class Uncacheable(TypeError):
    """A key part that cannot be compared across calls (a tensor captured by a closure, say)."""


# -- keys and the model's state: plain functions, testable without a GPU -------------------------


def forward_key(forward) -> tuple:
    """What a step's forward adds to the key beyond its owner: the function, and for an
    attack's get_logits the normalization it applies (host tensors: no sync)."""
    if isinstance(forward, nn.Module):
        return ("module", type(forward))
    owner = getattr(forward, "__self__", None)
    norm = getattr(owner, "normalization_used", None)
    applies = norm is not None and getattr(owner, "_normalization_applied", None) is False
    return function_key(forward), tuple(tuple(v.flatten().tolist()) for v in norm.values()) if applies else None


def tensor_key(t: torch.Tensor) -> tuple:
    """What a capture bakes in about a buffer: shape, strides, dtype, device."""
    return tuple(t.shape), t.stride(), t.dtype, t.device


def value_key(v):
    """v itself when it is a plain value a capture may bake in (numbers, strings, dtypes...);
    tensors by tensor_key; tuples and lists element by element; else Uncacheable."""
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)):
        return v
    if isinstance(v, torch.Tensor):
        return ("tensor", tensor_key(v))
    if isinstance(v, (tuple, list)):
        return tuple(value_key(e) for e in v)
    raise Uncacheable(f"cannot key a {type(v).__name__}")


def function_key(fn) -> tuple:
    """A function by its code and the plain values its closure holds (a step built per call
    from the same code and settings has the same key)."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        raise Uncacheable(f"cannot key {fn!r}")
    cells = tuple(value_key(c.cell_contents) if not callable(c.cell_contents) else function_key(c.cell_contents)
                  for c in fn.__closure__ or ())
    return code, cells, value_key(fn.__defaults__ or ())


def owner_of(forward):
    """What a graph of forward's steps belongs to: the nn.Module behind it (itself, or an
    attack's model when forward is a bound get_logits), else the object the method is bound
    to, else the function itself. Never a bound method: each access makes a new one."""
    if isinstance(forward, nn.Module):
        return forward
    owner = getattr(forward, "__self__", None)
    module = getattr(owner, "model", None)
    if isinstance(module, nn.Module):
        return module
    return owner if owner is not None else forward


def settings_key() -> tuple:
    """The global settings a capture's kernels were chosen under: a replay keeps the kernels
    (cuDNN's algorithms, TF32 or not) whatever the settings are by then."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    return (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32,
            matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction,
            torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled())


def model_state(owner) -> tuple:
    """The storage, modes and requires_grad flags a captured step depends on (see the module
    docstring); () for an owner that is not an nn.Module."""
    if not isinstance(owner, nn.Module):
        return ()
    state = []
    for m in owner.modules():
        state.append(m.training)
        for p in m._parameters.values():
            state.append(None if p is None else (p.data_ptr(), p.requires_grad, p.dtype))
        for b in m._buffers.values():
            state.append(None if b is None else (b.data_ptr(), b.dtype))
    return tuple(state)


# -- the cache ------------------------------------------------------------------------------------


class Replayable:
    """A captured step: static buffers, the graph, and what one step costs in model calls."""

    def __init__(self, graph, static: dict, state: tuple, calls_per_step=(), context=None):
        self.graph = graph
        self.static = static
        self.state = state
        self.context = context  # what the caller keeps with it (the attack loop: the captured gradient)
        self.calls_per_step = calls_per_step  # [(CallCounter, forwards, backwards)] of one step
        self.warmed = True  # the call that made it has run one step already (the warm-up)

    def load(self, inputs: dict) -> "Replayable":
        """Copy this call's inputs into the static buffers."""
        for name, value in inputs.items():
            self.static[name].copy_(value)
        self.warmed = False
        return self

    def replay(self, times: int = 1) -> None:
        for _ in range(times):
            self.graph.replay()
        for counter, forwards, backwards in self.calls_per_step:  # a replay runs no Python: count here
            counter.forwards += forwards * times
            counter.backwards += backwards * times


class StepCache:
    """Replayable steps per owner (held weakly) and key, at most max_per_owner each."""

    def __init__(self, max_per_owner=MAX_PER_OWNER):
        self.max_per_owner = max_per_owner
        self._by_owner = weakref.WeakKeyDictionary()
        self.captures = 0  # how many captures this cache made (tests and benchmarks read it)

    def get(self, owner, key, state):
        """The entry for (owner, key) if its state still holds; a stale one is dropped."""
        entries = self._by_owner.get(owner)
        entry = None if entries is None else entries.get(key)
        if entry is None:
            return None
        if entry.state != state:
            del entries[key]
            return None
        entries.move_to_end(key)
        return entry

    def put(self, owner, key, entry):
        entries = self._by_owner.setdefault(owner, collections.OrderedDict())
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.max_per_owner:
            entries.popitem(last=False)
        self.captures += 1

    def clear(self):
        self._by_owner = weakref.WeakKeyDictionary()


cache = StepCache()
_uncapturable = weakref.WeakKeyDictionary()  # owner -> why its capture failed
_uncapturable_fns = {}  # owners that cannot be weakly referenced: by id, with the object kept alive


def capturable(owner) -> bool:
    try:
        return owner not in _uncapturable
    except TypeError:
        return id(owner) not in _uncapturable_fns


def _mark_uncapturable(owner, reason):
    try:
        _uncapturable[owner] = reason
    except TypeError:
        _uncapturable_fns[id(owner)] = (owner, reason)


def cached(owner, key):
    """The Replayable kept for (owner, key), if the owner's state still matches its capture;
    None otherwise (then ``capture``). Load it with ``load`` before replaying."""
    if key is None or not capturable(owner) or not _weakable(owner):
        return None
    return cache.get(owner, key, model_state(owner))


def _weakable(owner) -> bool:
    try:
        weakref.ref(owner)
        hash(owner)
    except TypeError:
        return False
    return True


def capture(owner, key, make_step, inputs: dict, counters=(), context=None):
    """Capture make_step(static) for (owner, key) and keep it (key None: for this call only).

    static holds clones of inputs; the step runs once eagerly first (the warm-up: one real
    step, counted by counters) and is then captured. Returns the Replayable, or None when the
    owner is known to be uncapturable (nothing has run). When the capture itself fails, the
    Replayable's replay runs the step eagerly (nothing kept; an owner that failed other than
    for lack of memory is not tried again). context: kept with the entry for the caller.
    """
    if not capturable(owner):
        return None
    static = {name: value.clone() for name, value in inputs.items()}
    step = make_step(static)
    state = model_state(owner)
    marks = [c.mark() for c in counters]
    _warm_up(step)
    calls = [(c, c.forwards - m[0], c.backwards - m[1]) for c, m in zip(counters, marks)]
    marks = [c.mark() for c in counters]
    try:
        graph = _capture(step)
    except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
        if _out_of_memory(exc):
            warnings.warn("fastadv: CUDA graph capture ran out of memory; this call runs eagerly", stacklevel=3)
        else:
            _mark_uncapturable(owner, f"{type(exc).__name__}: {exc}")
            warnings.warn(f"fastadv: CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly",
                          stacklevel=3)
        return Replayable(_Eager(step), static, state, context=context)
    finally:
        _undo_counts(counters, marks)  # a capture records a step; it runs none
    entry = Replayable(graph, static, state, calls, context=context)
    if key is not None and _weakable(owner):
        cache.put(owner, key, entry)
    return entry


class _Eager:
    """Stands in for a graph that could not be captured: replay runs the step."""

    def __init__(self, step):
        self.replay = step


def _out_of_memory(exc) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _undo_counts(counters, marks):
    for counter, mark in zip(counters, marks):
        counter.forwards, counter.backwards = mark


# -- the CUDA part (tests on the CPU replace these two) -----------------------------------------------


def _warm_up(step):
    """One eager step on a side stream, as a capture needs (cuDNN and Triton pick their kernels)."""
    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        step()
    caller.wait_stream(side)


def _capture(step):
    caller = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception:
        _recover_from_failed_capture(caller)
        torch.cuda.synchronize()
        raise
    return graph


def _recover_from_failed_capture(caller):
    """Undo what a failed capture leaves behind in torch (seen with torch 2.11 on an H200):
    torch.cuda.graph's exit raises before it restores the caller's stream, and the device's
    default generator still believes it is capturing, so the next CUDA random draw raises
    'Offset increment outside graph capture'. A clone of the generator's state (same seed
    and offset, not capturing) replaces it."""
    torch.cuda.set_stream(caller)
    gen = torch.cuda.default_generators[caller.device.index]
    gen.graphsafe_set_state(gen.clone_state())
