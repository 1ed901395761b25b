"""Fixed-shape slots: an iterative attack runs on B slots that the stream of samples refills.

Continuous batching, as LLM servers do it. Every model call has the shape [B, ...]. A
sample whose work is done (its steps ran out, its iterates settled into a cycle, or, where
only its robust flag is wanted, it was fooled) leaves its slot, and the next sample of the
stream takes the slot at the next step. A sample's numbers then depend on its own iterates
and on the batch shape B, never on which samples share its batch, so the exits are exact by
construction on any device whose kernels give a row the same bits at a fixed shape whatever
the other rows hold (PyTorch's CPU kernels do on every model tested; tests/test_slots.py).

Work arrives in **units**: samples whose random draws are made together (a whole attack
call, as the reference draws them, or one chunk of an evaluation). A unit runs one or more
**phases** (APGD's restarts and target classes): phase p + 1 of a unit starts when every
one of its samples has finished phase p, with the samples that phase p lets go on. Units
and phases share the slots freely. The queue serves first the members of the units with the
most phases still to run (their chains of phases are the longest; serving them first keeps
the last units from running their phases alone on a mostly empty batch), then in order of
arrival.

The scheduler (``run``) is generic. A program, the attack's iteration on slots, provides:

- ``size``: B, the slot count; ``steps``: the slot-steps a member takes at most per phase;
  ``phases(unit)``: how many phases a unit runs;
- ``begin(unit, phase, members)``: the start state of these members (a ``Phase``; random
  draws happen here, in the unit's order);
- ``admit(rows, phase, positions)``: load those members of a phase into slot rows;
- ``step(age)``: one iteration of every slot (one model call of [B]); age: the steps each
  slot's occupant has done (numpy, -1 for an empty slot);
- ``poll(age, limit)``: the exits only the device knows (a cycle, a fooled sample): returns
  the rows that exit now, and may lower limit (steps left once a long cycle is known);
  one host sync; ``None`` when the program has no device exits; ``max_check_interval``
  (optional): the most steps polls may lie apart;
- ``retire(rows, phase, positions)``: store the results of members that leave; returns,
  per member, whether it goes on to the unit's next phase (None: none does);
- ``finish(phase)`` (optional): called once every member of a phase has left.
"""
import dataclasses
import heapq
import itertools
import warnings

import numpy as np
import torch

# How often, in steps, the scheduler asks the device which slots exit (one host sync each):
# from every CHECK_EVERY steps, twice as far apart after each check that found no exit (up to
# CHECK_EVERY_MAX), half as far after each that found one. A late exit costs the sample's
# extra steps; a check costs host work (and on CUDA a sync, which stalls the launch queue).
# Where samples leave often the checks stay close; where they seldom do, the checks thin out
# (benchmarks/bench_slots.py measures both on the CPU; the CUDA values are not yet measured).
CHECK_EVERY = {"cpu": 1, "cuda": 4}
CHECK_EVERY_MAX = {"cpu": 8, "cuda": 16}


@dataclasses.dataclass
class Phase:
    """One phase of one unit: its members (positions in the unit) and their start state."""

    unit: object
    index: int
    members: torch.Tensor  # [m] positions in the unit (CPU, long)
    state: dict = dataclasses.field(default_factory=dict)
    outstanding: int = 0
    going_on: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SlotStats:
    """What the slots did: model calls of [B], and how many slot-steps carried a real sample.

    ``admitting``: the slot-steps taken while samples waited to be admitted (the occupancy
    goal); ``tail``: the slot-steps after the stream ran dry, while the last samples finish.
    """

    size: int = 0
    calls: int = 0
    slot_steps: int = 0
    useful_admitting: int = 0
    steps_admitting: int = 0
    useful_tail: int = 0
    steps_tail: int = 0
    samples: int = 0

    @property
    def useful(self):
        return self.useful_admitting + self.useful_tail

    def occupancy(self, part="all"):
        """Useful slot-steps over all slot-steps (part: 'all', 'admitting' or 'tail')."""
        if part == "all":
            return self.useful / self.slot_steps if self.calls else None
        useful, steps = getattr(self, f"useful_{part}"), getattr(self, f"steps_{part}")
        return useful / steps if steps else None

    def add(self, other):
        for f in dataclasses.fields(self):
            if f.name != "size":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.size = self.size or other.size
        return self

    def as_dict(self):
        return {"slots": self.size, "calls": self.calls, "slot_steps": self.slot_steps, "useful": self.useful,
                "occupancy": self.occupancy(), "occupancy_admitting": self.occupancy("admitting"),
                "occupancy_tail": self.occupancy("tail"), "samples": self.samples}


def run(program, units, *, check_every=None, device=None, on_unit_done=None, shrink=False) -> SlotStats:
    """Run every unit of the iterable through the program's slots; returns the SlotStats.

    Units are pulled lazily, as slots free up (a streamed data set is read as it is needed).
    on_unit_done(unit) is called once all of a unit's phases have finished.
    shrink: once nothing is left to admit, drop the empty slots (program.shrink(rows)), so the
    last samples run on a smaller batch: compaction, for a single batch that has no stream to
    refill from. It changes the batch shape, so a sample's numbers are then only as
    independent of the others as the device's kernels make them (PyTorch's CPU kernels gave
    the same bits at 8 rows or more on every model tested, tests/test_slots.py, not at 1 or 2);
    it is never used where exactness is promised.
    """
    size = program.size
    device = torch.device(device) if device is not None else torch.device("cpu")
    if check_every is None:  # adaptive: see CHECK_EVERY
        base = CHECK_EVERY.get(device.type, 4)
        ceiling = max(base, CHECK_EVERY_MAX.get(device.type, 16))
    else:  # a fixed interval
        base = ceiling = int(check_every)
    cap = getattr(program, "max_check_interval", None)
    if cap is not None:
        base, ceiling = min(base, cap), min(ceiling, cap)
    stats = SlotStats(size=size)
    occupant = [None] * size  # (phase, position in phase.members) per slot
    age = np.full(size, -1, dtype=np.int64)
    limit = np.zeros(size, dtype=np.int64)
    queue = []  # a heap of (-phases left, arrival, phase, position) waiting for a slot
    arrivals = itertools.count()
    units = iter(units)
    source_open = True
    remaining_phases = {}

    def open_phase(unit, index, members):
        phase = Phase(unit, index, members)
        if len(members) == 0:
            return close_phase(phase)
        phase.state = program.begin(unit, index, members)
        phase.outstanding = len(members)
        stats.samples += len(members) if index == 0 else 0
        left = remaining_phases[id(unit)] - index
        for i in range(len(members)):
            heapq.heappush(queue, (-left, next(arrivals), phase, i))

    def close_phase(phase):
        unit = phase.unit
        if hasattr(program, "finish"):
            program.finish(phase)
        going_on = torch.as_tensor(phase.going_on, dtype=torch.long)
        if phase.index + 1 < remaining_phases[id(unit)] and len(going_on):
            return open_phase(unit, phase.index + 1, going_on)
        del remaining_phases[id(unit)]
        if on_unit_done is not None:
            on_unit_done(unit)

    def pull_unit():
        nonlocal source_open
        try:
            unit = next(units)
        except StopIteration:
            source_open = False
            return
        remaining_phases[id(unit)] = program.phases(unit)
        open_phase(unit, 0, torch.arange(unit.size) if unit.members is None else unit.members)

    def fill():
        free = [b for b in range(size) if occupant[b] is None]
        while (len(queue) < len(free) or not queue) and source_open:  # an empty queue looks one unit ahead
            pull_unit()
        for group_phase, rows, positions in _groups((heapq.heappop(queue)[2:], b) for b in free[:len(queue)]):
            program.admit(torch.as_tensor(rows), group_phase, torch.as_tensor(positions))
            for b, p in zip(rows, positions):
                occupant[b] = (group_phase, p)
                age[b] = 0
                limit[b] = program.steps

    def retire(rows):
        for phase, slot_rows, positions in _groups((occupant[b], b) for b in rows):
            going_on = program.retire(torch.as_tensor(slot_rows), phase, torch.as_tensor(positions))
            if going_on is not None:
                phase.going_on.extend(int(phase.members[p]) for p, keep in zip(positions, going_on) if keep)
            phase.outstanding -= len(slot_rows)
            for b in slot_rows:
                occupant[b] = None
                age[b] = -1
            if phase.outstanding == 0:
                phase.going_on.sort()
                close_phase(phase)

    since_poll, interval = 0, base
    while True:
        fill()
        live = age >= 0
        n_live = int(live.sum())
        if n_live == 0:
            break
        admitting = bool(queue) or source_open
        program.step(age)
        stats.calls += 1
        stats.slot_steps += size
        if admitting:
            stats.useful_admitting += n_live
            stats.steps_admitting += size
        else:
            stats.useful_tail += n_live
            stats.steps_tail += size
        age[live] += 1
        since_poll += 1
        exits = live & (age >= limit)
        if since_poll >= interval:
            since_poll = 0
            polled = program.poll(age, limit)  # may lower limit
            if polled is not None:
                exits |= live & (polled | (age >= limit))
            found = polled is not None and (live & polled).any()
            interval = max(base, interval // 2) if found else min(2 * interval, ceiling)
        if exits.any():
            retire(np.flatnonzero(exits).tolist())
            if shrink and not queue and not source_open and 0 < (age >= 0).sum() < size:
                keep = np.flatnonzero(age >= 0)
                program.shrink(torch.as_tensor(keep))
                occupant, age, limit = [occupant[b] for b in keep], age[keep], limit[keep]
                size = len(keep)
    return stats


def _groups(pairs):
    """[(phase, rows, positions)] from (occupant, row) pairs, grouped by phase in first-seen order."""
    out = {}
    for (phase, position), row in pairs:
        entry = out.setdefault(id(phase), (phase, [], []))
        entry[1].append(row)
        entry[2].append(position)
    return list(out.values())


@dataclasses.dataclass
class Unit:
    """A unit of work: samples whose draws are made together.

    size: its sample count; data: whatever the program needs to begin it (tensors of the
    unit's samples, a seed, ...); results: filled by the program as members retire; key:
    the caller's name for it (an evaluation's chunk index, say).
    """

    size: int
    data: dict = dataclasses.field(default_factory=dict)
    results: dict = dataclasses.field(default_factory=dict)
    key: object = None
    members: torch.Tensor = None  # the positions phase 0 works on (None: all)
    seed: int = None  # the seed of the unit's random draws, for programs that draw


# -- exact cycle detection on slots --------------------------------------------------------------

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns as integers: a repeat is the same bits (0.0 and -0.0 differ, a NaN equals itself)."""
    return t.view(_SAME_SIZE_INT[t.element_size()])


def on_device(array, device) -> torch.Tensor:
    """Host numbers (a numpy array) as a tensor on device, without waiting for the device: on
    CUDA through pinned memory, asynchronously (a copy from pageable memory syncs the stream).
    The scheduler's per-step row lists and ages take this way."""
    t = torch.as_tensor(array)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> np.ndarray:
    """A device tensor's numbers as a numpy array, in one copy (the one host sync on CUDA)."""
    return t.numpy().copy() if t.device.type == "cpu" else t.cpu().numpy()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t as a [rows, -1] view, whatever its memory format (the order of a row's elements does
    not matter to a fingerprint or to a comparison of whole rows)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)
    return t.reshape(t.shape[0], -1)


def _flat_bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits as a [rows, -1] view (see _flat)."""
    return bits(_flat(t))


class CycleWatch:
    """Which slots' iterates repeat an earlier one, bit for bit, and where their cycle lands.

    The update writes each new iterate into ``next_buffer()``, a ring of the last ``history``
    iterates of every slot (one tensor; no copy). When a slot's iterate after t steps equals
    the one of p <= history - 1 steps earlier, its sequence has period p from there on (the
    next iterate is a function of the current one, per sample), so its iterate after T steps
    is the one (T - t) mod p steps further round the cycle, already in the ring. Periods the
    ring cannot hold are caught by an anchor, the iterate saved at every power-of-two age from
    `history` on: once the anchor lies on the cycle, an iterate of the ring equals it again, p
    steps after it; then the slot goes on for the (T - t) mod p steps that bring it to the
    same final iterate.

    Every iterate gets a fingerprint (a dot product of its values with fixed random weights,
    taken for the whole ring in one product of one shape, so equal iterates get equal
    fingerprints), and a check compares fingerprints, [history, B] numbers; only the rows whose
    fingerprints match are compared bit for bit, and only a bitwise match closes a cycle (a NaN
    iterate never matches: its cycle is simply not caught). A step costs no device work beyond
    writing its iterate: the fingerprints and the anchors due since the last check are taken at
    the check, in one pass (``fetch``). So the checks may be up to ``history`` steps apart:
    every iterate is then still in the ring at some check.
    """

    def __init__(self, adv: torch.Tensor, history: int, anchor: bool = True):
        if history < 2:
            raise ValueError(f"the cycle history must be >= 2 iterates, got {history}")
        self.history, self.rows = history, adv.shape[0]
        self.store = torch.empty((history * self.rows, *adv.shape[1:]), dtype=adv.dtype, device=adv.device)
        if adv.dim() == 4:
            self.store = self.store.contiguous(memory_format=_format(adv))
        self.ring = list(self.store.split(self.rows))  # [rows, ...] views, in adv's memory format
        self.ring[0].copy_(adv)
        gen = torch.Generator().manual_seed(0)
        # fingerprints in the iterate's own values (no conversion pass); half types in fp32
        self.print_dtype = adv.dtype if adv.dtype in (torch.float32, torch.float64) else torch.float32
        self.weights = torch.rand(adv[0].numel(), generator=gen, dtype=self.print_dtype).to(adv.device)
        # what a check reads, in one buffer (one host read): the ring's fingerprints, the anchors',
        # and the caller's per-slot flags (fetch's flags: a fooled sample, say)
        self.board = torch.zeros((history + 2) * self.rows, dtype=self.print_dtype, device=adv.device)
        self.prints = self.board[:history * self.rows].view(history, self.rows)
        self.anchor_print = self.board[history * self.rows:(history + 1) * self.rows]
        self.flags = self.board[(history + 1) * self.rows:]
        self.anchor = torch.empty_like(adv)
        self.anchor_age = np.full(self.rows, -1, dtype=np.int64)
        self.anchored = anchor
        self.clock = 0  # the ring position of the current iterate
        self.checked_age = np.zeros(self.rows, dtype=np.int64)  # each slot's age at the last check

    @property
    def current(self) -> torch.Tensor:
        return self.ring[self.clock % self.history]

    def next_buffer(self) -> torch.Tensor:
        return self.ring[(self.clock + 1) % self.history]

    def advance(self):
        """The update wrote the next iterate (into next_buffer())."""
        self.clock += 1

    def _fingerprint(self):
        """The fingerprints of every iterate in the ring, in one product of one shape: each row's
        dot product then runs the same kernel with the same reduction at every check, on any
        device (a product over only the iterates new since the last check would change shape
        from check to check, and cuBLAS may sum a row in another order at another shape, so an
        iterate and its repeat could get different fingerprints)."""
        block = _flat(self.store)
        torch.mv(block if block.dtype == self.print_dtype else block.to(self.print_dtype), self.weights,
                 out=self.prints.view(-1))

    def _save_anchors(self, age):
        """Per slot, the anchor due since the last check: its iterate at the newest power-of-two
        age passed since then (still in the ring: checks are at most history steps apart). From
        age history on: shorter runs have only periods the ring closes."""
        live = age >= self.history
        power = np.where(live, np.ldexp(1, np.frexp(np.maximum(age, 1))[1] - 1).astype(np.int64), 0)
        due = live & (power > self.checked_age)
        self.checked_age = np.maximum(age, 0)
        if not due.any():
            return
        rows = np.flatnonzero(due)
        back = age[rows] - power[rows]
        if back.max() >= self.history:
            raise RuntimeError(f"cycle checks more than {self.history} steps apart")  # the scheduler's cap
        entries = on_device((self.clock - back) % self.history * self.rows + rows, self.store.device)
        device_rows = on_device(rows, self.store.device)
        self.anchor.index_copy_(0, device_rows, self.store.index_select(0, entries))
        self.anchor_print.index_copy_(0, device_rows, self.prints.view(-1).index_select(0, entries))
        self.anchor_age[rows] = power[rows]

    def fetch(self, age, flags=None):
        """A check's one host read: the ring's fingerprints, the anchors due, and flags ([rows]
        bool on the device, the caller's, or None) go to the host together. age: each slot's
        steps done (-1: empty). Returns (flags as a numpy bool array or None, and match's
        period and home_back)."""
        self._fingerprint()
        if self.anchored:
            self._save_anchors(age)
        if flags is not None:
            self.flags.copy_(flags)
        got = to_host(self.board)
        h, rows = self.history, self.rows
        period, home_back = self.match(got[:h * rows].reshape(h, rows), got[h * rows:(h + 1) * rows], age)
        return (got[(h + 1) * rows:] > 0 if flags is not None else None), period, home_back

    def match(self, prints, anchor, age):
        """On the host, from the fingerprints of the ring ([history, rows]) and of the anchors:
        per slot, the period whose fingerprint matches the current iterate's (0: none), and how
        many steps back an iterate of the ring matches the anchor (-1: none). resolve verifies
        them bit for bit."""
        h = self.history
        cur = prints[self.clock % h]
        back = ((self.clock - np.arange(h)) % h)[:, None]  # how many steps back each ring entry lies
        depth = np.minimum(np.maximum(age, 0), h - 1)[None, :]
        in_run = back <= depth  # the entry belongs to the slot's present occupant
        valid = (prints == cur) & (back > 0) & in_run
        period = np.where(valid, back, h).min(0)
        period = np.where(period < h, period, 0)
        # an iterate written after the anchor was saved (age - back > anchor_age) that equals it
        home = (prints == anchor) & in_run & (age[None, :] - back > self.anchor_age[None, :]) \
            & (self.anchor_age >= 0)[None, :]
        home_back = np.where(home, back, h).min(0)
        return period, np.where(home_back < h, home_back, -1)

    def _verified(self, rows, mine, others):
        """Of the rows (numpy), those whose entry `mine` ([len(rows)] ring entries, flat store rows)
        equals, bit for bit, the row of `others` ([len(rows), ...] tensor) (one small sync)."""
        dev = self.store.device
        entries = _flat_bits(self.store.index_select(0, on_device(mine, dev)))
        return rows[np.array((entries == _flat_bits(others)).all(1).tolist(), dtype=bool)]

    def resolve(self, period, home_back, age, limit, *, finish_long=True):
        """The host side of a check (match's numpy arrays): returns the slots whose cycle is closed; the
        ring's cycles get their final iterate written into the current ring buffer now. A cycle
        found at the anchor lowers limit to the step that lands on the same final iterate
        (finish_long), or closes at once (finish_long=False: only the flags are wanted, and
        every iterate of the cycle has been seen)."""
        h, dev = self.history, self.store.device
        closed = np.zeros(self.rows, dtype=bool)
        rows = np.flatnonzero(period > 0)
        if len(rows):
            current = self.clock % h * self.rows + rows
            entries = (self.clock - period[rows]) % h * self.rows + rows
            rows = self._verified(rows, current, self.store.index_select(0, on_device(entries, dev)))
            closed[rows] = True
        if closed.any():
            rows = np.flatnonzero(closed)
            p = period[rows]
            offset = (self.clock - p + (limit[rows] - age[rows]) % p) % h
            current = self.current
            for r, o in zip(rows.tolist(), offset.tolist()):
                if o != self.clock % h:
                    current[r] = self.ring[o][r]
        rows = np.flatnonzero((home_back >= 0) & ~closed)
        if len(rows):
            entries = (self.clock - home_back[rows]) % h * self.rows + rows
            rows = self._verified(rows, entries, self.anchor.index_select(0, on_device(rows, dev)))
            if len(rows) and not finish_long:
                closed[rows] = True
            elif len(rows):
                p = age[rows] - home_back[rows] - self.anchor_age[rows]
                limit[rows] = age[rows] + (limit[rows] - age[rows]) % p
        return closed

    def admit(self, rows: torch.Tensor):
        """New occupants (their start iterates are in the current buffer): forget their anchors;
        their starts get fingerprints with the next check's."""
        rows = rows.cpu().numpy()
        self.anchor_age[rows] = -1
        self.checked_age[rows] = 0


# -- a fixed number of steps of one iterate: PGD, BIM, RFGSM, TPGD ------------------------------

CYCLE_HISTORY = 16  # iterates the ring keeps per slot: periods up to 15 close at once
CYCLE_ANCHOR = True  # also catch longer periods at the power-of-two anchors (benchmarks/bench_slots.py)


def slot_buffers(data: dict, size: int) -> dict:
    """Zeroed [size, ...] buffers shaped like the per-sample tensors of data (first dim = the
    unit's samples), in their dtype, device and memory format; other values are kept as they
    are (a float eps is the same for every slot)."""
    from fastadv.validation import memory_format

    n = next(v.shape[0] for v in data.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    out = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            buf = value.new_zeros((size, *value.shape[1:]))
            out[key] = buf.contiguous(memory_format=memory_format(value)) if value.dim() == 4 else buf
        else:
            out[key] = value
    return out


class Iterations:
    """adv <- update(adv, grad(adv), **per_sample), steps times per sample, on slots.

    Each unit's ``data`` holds its members' start iterate ``adv`` and the per-sample inputs of
    update and of the gradient (``x``, ``eps``, ``labels``, ...: [m, ...] tensors, or values the
    samples share); ``prepare(unit)``, when given, fills it as the unit begins (its random
    draws). make_grad(buffers) builds the gradient on the slot buffers: it reads them at
    every call, so a refilled slot needs no new gradient; its ``succeeded()`` tells, per
    slot, whether the last evaluated iterate fooled the model.

    result, per unit (``unit.results``):
    - 'final': ``adv``, every sample's iterate after steps steps;
    - 'first_fooled': ``adv``, the first evaluated iterate that fooled the model, else the
      final one (early_stop: the sample leaves once fooled);
    - 'flags': ``robust``, [m] bool, True where no iterate fooled the model, the start and
      the final iterate included (steps + 1 gradient evaluations; the sample leaves at its
      first fooling iterate when fooled_exit).
    cycle_exit: exact exit for samples whose iterates repeat (CycleWatch); valid only when a
    sample's next iterate is a function of its current iterate alone.
    """

    RESULTS = ("final", "first_fooled", "flags")

    def __init__(self, *, size, steps, update, make_grad, result="final", cycle_exit=False, fooled_exit=True,
                 prepare=None, history=None):
        if result not in self.RESULTS:
            raise ValueError(f"result must be one of {self.RESULTS}, got {result!r}")
        self.size = size
        self.result = result
        self.steps = steps + 1 if result == "flags" else steps
        self.update = update
        self.make_grad = make_grad
        self.cycle_exit = cycle_exit
        self.fooled_exit = fooled_exit and result != "final"
        self.prepare = prepare
        self.history = CYCLE_HISTORY if history is None else history
        self.bufs = None

    def phases(self, unit):
        return 1

    @property
    def max_check_interval(self):
        return self.history if self.cycle_exit else None  # CycleWatch's: every iterate seen by some check

    def _allocate(self, data):
        self.bufs = slot_buffers(data, self.size)
        adv = self.bufs.pop("adv")
        self.watch = CycleWatch(adv, self.history, anchor=CYCLE_ANCHOR) if self.cycle_exit else None
        self._adv = adv
        self.grad = self.make_grad(self.bufs)
        self.fooled = torch.zeros(self.size, dtype=torch.bool, device=adv.device)
        self.first = torch.empty_like(adv) if self.result == "first_fooled" else None

    @property
    def adv(self):
        return self.watch.current if self.watch is not None else self._adv

    def begin(self, unit, phase, members):
        if self.prepare is not None and "adv" not in unit.data:
            self.prepare(unit)
        if self.bufs is None:
            self._allocate(unit.data)
        adv = unit.data["adv"]
        if self.result == "flags":
            unit.results.setdefault("robust", torch.ones(unit.size, dtype=torch.bool, device=adv.device))
        else:
            unit.results.setdefault("adv", torch.empty_like(adv))
        return unit.data

    def admit(self, rows, phase, positions):
        data = phase.state
        device_rows = rows.to(self.fooled.device)
        members = phase.members[positions].to(self.fooled.device)
        self.adv.index_copy_(0, device_rows, data["adv"].index_select(0, members))
        for key, buf in self.bufs.items():
            if isinstance(buf, torch.Tensor) and isinstance(data[key], torch.Tensor) and data[key].dim() > 0:
                buf.index_copy_(0, device_rows, data[key].index_select(0, members))
        self.fooled.index_fill_(0, device_rows, False)
        if self.watch is not None:
            self.watch.admit(rows)

    def step(self, age):
        adv = self.adv
        g = self.grad(adv)
        if self.result != "final":
            fooled = self.grad.succeeded()
            if self.first is not None:  # keep the iterate the gradient was taken at, where it fooled first
                newly = (fooled & ~self.fooled).reshape(-1, *([1] * (adv.dim() - 1)))
                torch.where(newly, adv, self.first, out=self.first)
            self.fooled |= fooled
        if self.watch is None:
            self.update(adv, g, out=adv, **self.bufs)
            return
        self.update(adv, g, out=self.watch.next_buffer(), **self.bufs)
        self.watch.advance()

    def poll(self, age, limit):
        if self.watch is None:
            return to_host(self.fooled) if self.fooled_exit else None  # the one host sync of a poll
        fooled, period, home = self.watch.fetch(age, self.fooled if self.fooled_exit else None)  # the one sync
        exits = fooled if fooled is not None else np.zeros(self.size, dtype=bool)
        # a fooled sample that retires now keeps its result; the cycle's final iterate is
        # written only for the others (flags need no iterate: every one of the cycle was seen)
        period, home = np.where(exits, 0, period), np.where(exits, -1, home)
        if not (period.any() or (home >= 0).any()):  # no fingerprint matched: nothing to verify
            return exits
        return exits | self.watch.resolve(period, home, age, limit, finish_long=self.result != "flags")

    def retire(self, rows, phase, positions):
        device_rows = rows.to(self.fooled.device)
        members = phase.members[positions].to(self.fooled.device)
        fooled = self.fooled.index_select(0, device_rows)
        if self.result == "flags":
            phase.unit.results["robust"].index_copy_(0, members, ~fooled)
            return None
        adv = self.adv.index_select(0, device_rows)
        if self.first is not None:
            adv = torch.where(fooled.reshape(-1, *([1] * (adv.dim() - 1))), self.first.index_select(0, device_rows), adv)
        phase.unit.results["adv"].index_copy_(0, members, adv)
        return None


def iterate(update, grad, adv, steps, per_sample, *, size, result="final", cycle_exit=False, check_every=None,
            stats=None):
    """fastadv.loop.run's iterations on `size` slots, for one batch: returns every sample's result
    iterate (see Iterations). grad: the whole batch's gradient; its ``on_slots(buffers)`` is the
    same gradient on slot buffers and ``per_sample()`` its per-sample inputs (labels, ...)."""
    data = {"adv": adv, **per_sample, **grad.per_sample()}
    unit = Unit(adv.shape[0], data)
    program = Iterations(size=size, steps=steps, update=_without(update, grad.per_sample()), make_grad=grad.on_slots,
                         result=result, cycle_exit=cycle_exit)
    done = run(program, [unit], check_every=check_every, device=adv.device)
    if stats is not None:
        stats.add(done)
    return unit.results["adv"]


def _without(update, keys):
    """update, called without the gradient's own per-sample inputs (labels, ...)."""
    keys = set(keys)
    if not keys:
        return update

    def call(adv, g, out=None, **bufs):
        return update(adv, g, out=out, **{k: v for k, v in bufs.items() if k not in keys})

    return call


def iterations(update, grad, adv, steps, per_sample, *, engine, model, backend_name, deterministic=True):
    """An iterative attack's loop, run as the engine options ask: on slots (batch_size below the
    batch, or the automatic cycle exit) or as one batch (fastadv.loop.run: eager, CUDA graph,
    early stop). Every sign-step attack with a fixed step count goes through here."""
    from fastadv import loop

    slottable = deterministic and hasattr(grad, "on_slots")
    size = engine.slot_count(adv.shape[0], steps, adv.device, model) if slottable else None
    if size is None:
        return loop.run(update, grad, adv, steps, per_sample, early_stop=engine.early_stop,
                        cuda_graph=engine.use_graph(adv, backend_name), model=model)
    from fastadv.engine import CYCLE_MIN_STEPS

    if engine.use_graph(adv, backend_name):  # a slot step reads the scheduler's refills: not captured yet
        warnings.warn("fastadv: cuda_graph is not used on fixed-shape slots (batch_size below the batch, or the "
                      "cycle exit): the steps run eagerly", stacklevel=5)
    # the cycle exit from CYCLE_MIN_STEPS steps unless asked for: shorter runs rarely settle
    cycle_exit = engine.use_cycle_exit(model, deterministic) and (engine.cycle_exit or steps >= CYCLE_MIN_STEPS)
    return iterate(update, grad, adv, steps, per_sample, size=size,
                   result="first_fooled" if engine.early_stop else "final", cycle_exit=cycle_exit)


def forward_in_slots(forward, x: torch.Tensor, size: int) -> torch.Tensor:
    """forward(x) in calls of exactly [size, ...] (the last one padded with zeros), without
    gradients: every sample's logits come from the same shape as the attack's own calls."""
    n = x.shape[0]
    if n == size:
        with torch.no_grad():
            return forward(x)
    outs = []
    with torch.no_grad():
        for lo in range(0, n, size):
            chunk = x[lo:lo + size]
            if chunk.shape[0] < size:
                pad = chunk.new_zeros((size - chunk.shape[0], *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad.contiguous(memory_format=_format(chunk))])
            outs.append(forward(chunk)[:min(size, n - lo)])
    return torch.cat(outs)


def _format(t):
    from fastadv.validation import memory_format

    return memory_format(t)
