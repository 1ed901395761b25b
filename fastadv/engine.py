"""The attack loop's machinery: engine options, model state handling, input-only gradients."""
import contextlib
import copy
import dataclasses
import math
import warnings
from typing import Optional

import torch
import torch.nn as nn

from fastadv import backend, validation
from fastadv.validation import check_logits


PRECISIONS = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision):
    """The autocast dtype of a fast-mode precision name (None: exact mode, no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(k for k in PRECISIONS if k)} or None, got {precision!r}")
    return PRECISIONS[precision]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How an attack runs; exact mode (the default) never changes its arithmetic.

    precision: None (exact), or 'bf16' / 'fp16' to run the model's forward and
        backward under autocast, the perturbation state staying in the image dtype
        (fast mode: changes results; measure the agreement on your model: the
        benchmarks report it per attack. TPGD and Square lose strength under bf16,
        their losses compare differences below its resolution).
    channels_last: run on channels_last copies of 4-D images (same numbers; faster
        convolutions, best with a model converted to channels_last too).
    early_stop: samples that already fool the model stop being attacked; each
        returns the first iterate that fooled it (changes the returned tensors).
    batch_size: attack at most this many samples at once. PGD, BIM, RFGSM, TPGD, APGD and
        APGD-T run on batch_size fixed-shape slots (fastadv.slots): a sample that is done
        leaves its slot and the next one takes it, every model call has the shape
        [batch_size, ...], and the random draws are made for the whole batch as the
        reference makes them. The other attacks run chunk by chunk; when an allocation fails
        (CUDA or CPU out of memory) the chunk is halved and the run goes on.
    cuda_graph: capture one step as a CUDA graph and replay it (CUDA tensors, Triton
        backend, no early stopping). None (automatic) leaves it off: each call captures
        its own graph, and on an H200 that capture cost more than the replays saved at
        PGD-10 (ResNet-18 batch 256: 94.9 ms with the graph, 74.7 ms eager; small CNN
        batch 1024 likewise slower; `python -m benchmarks.diag_input_grad`).
    cycle_exit: exact early exit for the deterministic sign-step attacks (PGD, BIM, RFGSM,
        TPGD): a sample whose iterate repeats an earlier one, bit for bit, leaves its slot with
        the final iterate its cycle implies; the returned tensor is bit-identical to the run
        without it, with fewer gradient evaluations (fastadv.slots.CycleWatch). It runs on
        slots, so every model call keeps its shape and no sample's numbers depend on who
        left: exact on any device. True, False, or None: automatic, on wherever the attack
        runs on slots (batch_size below the batch), and, on the CPU, for runs of at least
        CYCLE_MIN_STEPS steps without batch_size, on slots of auto_slot_count(N) (PyTorch's CPU
        kernels give a sample the same bits at any batch of 8 or more, tests/test_slots.py,
        so the result still equals the reference's whole-batch run). It is exact only when
        each sample's next iterate depends on that sample's iterate alone, so it is off,
        whatever this says, when that cannot hold: a model with modules in training mode
        (dropout draws, batch statistics mix samples; a warning names the module), EOT and
        other attacks with randomness in each step, and early_stop; None also leaves it off
        for a model that is a plain function (its modes cannot be seen).
    fast: shorthand for precision='bf16' and channels_last=True.
    """

    precision: Optional[str] = None
    channels_last: bool = False
    early_stop: bool = False
    batch_size: Optional[int] = None
    cuda_graph: Optional[bool] = None
    fast: bool = False
    cycle_exit: Optional[bool] = None

    def __post_init__(self):
        if self.fast:
            object.__setattr__(self, "precision", self.precision or "bf16")
            object.__setattr__(self, "channels_last", True)
        autocast_dtype(self.precision)
        if self.cycle_exit not in (None, True, False):
            raise ValueError(f"cycle_exit must be True, False or None, got {self.cycle_exit!r}")
        if self.cycle_exit and self.early_stop:
            raise ValueError("cycle_exit and early_stop cannot both be on (early_stop changes the result; cycle_exit never does)")
        if self.batch_size is not None:
            if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
                raise ValueError(f"batch_size must be an int >= 1 or None, got {self.batch_size!r}")

    def use_graph(self, x: torch.Tensor, backend_name: str) -> bool:
        if self.early_stop or self.cycle_exit or x.device.type != backend.KERNEL_DEVICE or backend_name != "triton":
            return False
        return bool(self.cuda_graph)

    def slot_count(self, n: int, steps: int, device, model):
        """The number of slots an iterative attack on n samples runs on, or None for one plain batch.

        batch_size below n: batch_size slots. Otherwise slots only where the cycle exit runs:
        the whole batch (batch_size given: the reference's shape, and the run ends once every
        sample has settled), or auto_slot_count(n) (cycle_exit True, or automatic on the CPU).
        """
        if self.batch_size is not None and self.batch_size < n:
            return self.batch_size
        if self.early_stop or self.cycle_exit is False:
            return None
        auto = self.cycle_exit is None and steps >= CYCLE_MIN_STEPS and (self.batch_size is not None or (
            self.precision is None and torch.device(device).type == "cpu" and attacked_module(model) is not None))
        if not (self.cycle_exit or auto):
            return None  # decided without walking the model's modules (a cost on every call)
        if not self.use_cycle_exit(model, quiet=True):
            return None
        return n if self.batch_size is not None else min(n, auto_slot_count(n))

    def use_cycle_exit(self, model, deterministic=True, quiet=False) -> bool:
        """Whether a run on slots takes the exact cycle exit (see cycle_exit above).

        model: the attacked nn.Module, or the attack's forward (an Attack's bound get_logits).
        deterministic: False for attacks with randomness in each step (EOT).
        quiet: no warning when a module in training mode turns the exit off (the caller only asks).
        """
        if self.cycle_exit is False or self.early_stop or not deterministic:
            return False
        module = attacked_module(model)
        if module is None:
            return bool(self.cycle_exit)
        training = training_module(module)
        if training is not None:
            if self.cycle_exit is not False and not quiet:
                warnings.warn(f"fastadv: cycle_exit is off: {training} is in training mode, so a sample's "
                              "next iterate may depend on the rest of the batch", stacklevel=4)
            return False
        return True

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """x in the memory format the attack runs in."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


EXACT = EngineOptions()

def auto_slot_count(n: int) -> int:
    """The slots of the automatic cycle exit (CPU, no batch_size) for n samples: a quarter of
    the batch, at least AUTO_SLOTS_MIN (measured: benchmarks/bench_slots.py)."""
    return max(AUTO_SLOTS_MIN, -(-n // 4))


AUTO_SLOTS_MIN = 32


def training_module(module):
    """The module in training mode that makes a sample depend on the others (a BatchNorm's batch
    statistics, a Dropout's draws), named like 'features.3 (BatchNorm2d)'; else the first module
    in training mode; None when every module is in eval mode."""
    training = [(name, m) for name, m in module.named_modules() if m.training]
    if not training:
        return None
    mixing = [(n, m) for n, m in training if "Norm" in type(m).__name__ or "Dropout" in type(m).__name__]
    name, m = (mixing or training)[0]
    return f"{name or 'the model'} ({type(m).__name__})"


# cycle_exit=None turns the exit on from this many steps: iterates settle into cycles after
# about 20 steps at the earliest (measured on the digits CNN), so shorter runs only pay the checks.
# At 20 steps nothing settled with alpha = eps/10 or eps/8 (Madry's rule, the pgd-20 of
# fastadv.evaluate) and the checks cost 2-8% CPU time; only alpha = eps/4 gained (13-15%).
# From 30 steps the exit saved 4-51% in every case measured on the PGD-trained and the
# standard digits CNN (benchmarks/results/cycle_exit_cpu_threshold.md, _no_cycles, _pgd20_madry).
CYCLE_MIN_STEPS = 30


def attacked_module(model):
    """The nn.Module behind an attack's forward: the module itself, or an Attack's model
    when forward is its bound get_logits; None for a plain function."""
    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    module = getattr(owner, "model", None)
    return module if isinstance(module, nn.Module) else None


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer, else fallback."""
    for t in (*model.parameters(), *model.buffers()) if isinstance(model, nn.Module) else ():
        return t.device
    return fallback


def _modules(model: nn.Module) -> list:
    """model and every module under it, each once: nn.Module.modules() without the names it
    builds (model_guard walks the model on every call)."""
    out, seen = [model], {id(model)}
    for m in out:  # the list grows as it is read: breadth first
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
    return out


@contextlib.contextmanager
def model_guard(model, *, model_training=False, batchnorm_training=False, dropout_training=False):
    """Put the model in attack mode; restore every module's mode and requires_grad after.

    Attack mode follows torchattacks: eval(), or with model_training train() with
    BatchNorm and Dropout kept in eval unless their flags say otherwise. Parameters
    stop requiring grad meanwhile, so autograd never records or computes parameter
    gradients and `.grad` is left untouched.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes, trainable = [], {}
    for m in _modules(model):  # one walk: parameters() would walk the modules again
        modes.append((m, m.training))
        for p in m._parameters.values():
            if p is not None and p.requires_grad:
                trainable[id(p)] = p  # a parameter shared by two modules is restored once
    trainable = trainable.values()
    try:
        if model_training:
            model.train()
            for m, _ in modes:
                name = type(m).__name__
                if ("BatchNorm" in name and not batchnorm_training) or ("Dropout" in name and not dropout_training):
                    m.eval()
        elif any(training for _, training in modes):  # an eval model is left alone: no per-call cost
            model.eval()
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            if m.training != training:  # nn.Module.__setattr__ is slow; most modules did not change
                m.training = training
        for p in trainable:
            p.requires_grad_(True)


class CrossEntropyGradient:
    """grad of CE(forward(adv), labels) w.r.t. adv; of -CE towards the labels when targeted.

    Mirrors the reference: mean-reduced cross-entropy, `torch.autograd.grad` on the
    input only. The first call checks the model's output shape and the label range; inside
    an attack call (validation.deferred) the range is read with the call's other checks at
    its end, and meanwhile the loss takes the labels clamped into range (the same labels
    when they are valid), so a bad label cannot fail on the device before its clear error.
    The logits of the last call stay in ``last_logits`` (for early stopping).

    precision ('bf16' or 'fp16', fast mode) runs forward and backward under autocast;
    the loss is then summed rather than averaged so fp16 gradients do not underflow
    (sign and normalized steps do not depend on the scale). scale: average over this many
    samples whatever the rows' count (fixed-shape slots keep one scale).
    """

    def __init__(self, forward, labels: torch.Tensor, targeted: bool = False, precision=None, scale=None,
                 static=False):
        self.forward = forward
        self.labels = labels
        self.targeted = targeted
        self.autocast = autocast_dtype(precision)
        self.reduction = "mean" if self.autocast is None else "sum"
        self._logits = None
        self._checked = False
        # the mean's batch size when it is not the rows' count: set once early stopping drops
        # samples, or given as scale (slots: the loss of a batch of `scale` samples)
        self._batch = float(scale) if scale is not None and self.reduction == "mean" else None
        # labels is a buffer that others refill in place (a captured step's, or the slots'): keep
        # this tensor, so the first call's clamp happens in it
        self._static = static
        self._source = None  # the whole batch's labels when this gradient runs on slots (on_slots)

    def logits(self, adv: torch.Tensor) -> torch.Tensor:
        out = self.forward(adv)
        if not self._checked:
            check_logits(out, self.labels, defer=True)
            self.n_classes = out.shape[1]
            if self._source is not None:  # on slots: the whole batch's labels, which refills bring in
                validation.check_label_range(self._source, self.n_classes, defer=True)
            if validation.deferred_open():  # a static buffer (a captured step's, the slots') is clamped in place
                if self._source is not None:
                    self._source.clamp_(0, self.n_classes - 1)  # the attack's own copy, read by the refills
                self.labels = self.labels.clamp_(0, self.n_classes - 1) if self._static else \
                    self.labels.clamp(0, self.n_classes - 1)
            self._checked = True
        return out

    def __call__(self, adv: torch.Tensor) -> torch.Tensor:
        adv = adv.detach().requires_grad_(True)
        if self.autocast is None and torch.is_grad_enabled():  # exact mode, grad on: no context to enter
            return self._grad(adv)
        # torch.autocast costs ~10 us to enter even when disabled: exact mode skips it.
        mixed = torch.autocast(adv.device.type, self.autocast) if self.autocast is not None else contextlib.nullcontext()
        with torch.enable_grad(), mixed:
            return self._grad(adv)

    def _grad(self, adv):
        logits = self.logits(adv)
        logits_ = logits.float() if self.autocast is not None else logits
        if self._batch is None:
            cost = nn.functional.cross_entropy(logits_, self.labels, reduction=self.reduction)
        else:  # the full batch's 1/N scale, so each sample's gradient is as if none had left
            cost = nn.functional.cross_entropy(logits_, self.labels, reduction="sum") / self._batch
        if self.targeted:
            cost = -cost
        self._logits = logits  # detached only when read: most runs never read it
        return torch.autograd.grad(cost, adv)[0]

    # -- a captured step kept across calls (fastadv.graphs, loop._run_graph) --

    def graph_key(self) -> tuple:
        """What a captured step of this gradient bakes in besides its inputs."""
        return type(self), self.targeted, self.reduction, self._batch, self.autocast

    def graph_inputs(self, like=None) -> dict:
        """The tensors a captured step reads that change per call: the labels; with like (the
        gradient of a later call), like's labels, range-checked against the classes this one
        has seen (deferred within an attack call) and clamped as in the first step."""
        if like is None:
            return {"labels": self.labels}
        labels = like.labels
        validation.check_label_range(labels, self.n_classes, defer=True)
        return {"labels": labels.clamp(0, self.n_classes - 1) if validation.deferred_open() else labels}

    def use_graph_inputs(self, static: dict) -> None:
        self.labels, self._static = static["labels"], True

    @property
    def last_logits(self):
        return None if self._logits is None else self._logits.detach()

    def succeeded(self) -> torch.Tensor:
        """Per sample: did the last evaluated point fool the model (reach the target)?"""
        pred = self.last_logits.argmax(1)
        return pred == self.labels if self.targeted else pred != self.labels

    def per_sample(self) -> dict:
        """The per-sample inputs of this gradient (fastadv.slots loads them into slot rows)."""
        return {"labels": self.labels}

    def on_slots(self, buffers: dict) -> "CrossEntropyGradient":
        """This gradient on slot buffers: labels read from buffers['labels'] at every call, and
        the loss keeps this batch's reduction scale (1/N of its mean) whatever the slot count, so
        each sample's gradient is the one it gets in the whole batch. The whole batch's labels
        are range-checked with the first call (and clamped in place, as the first step clamps,
        before the slots load them)."""
        slotted = copy.copy(self)
        slotted.labels, slotted._static, slotted._source = buffers["labels"], True, self.labels
        slotted._checked = False
        if self.reduction == "mean":
            slotted._batch = float(self.labels.shape[0]) if self._batch is None else self._batch
        return slotted

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these samples (a bool mask, or the indices of the rows kept; early stopping)."""
        if self._batch is None and self.reduction == "mean":
            self._batch = float(self.labels.shape[0])
        self.labels = self.labels[rows]


def run_functional(core, model, images, labels, *, budgets=(), engine=None, copy_images=True, slots=False, **kwargs):
    """Validate, copy the inputs to the model's device, guard the model, run core.

    core(model, x, y, engine=..., **kwargs) is an attack loop on inputs it may own.
    copy_images=False, for a core that never writes into its images: images already on the
    model's device are not copied (a full read and write of the batch saved).
    budgets names the kwargs that may be per-sample [N] tensors (validated, moved to
    the device as fp32). engine: an EngineOptions or a dict of its fields; its
    batch_size chunks the run (per-sample budgets are chunked alongside), unless slots: the
    core then takes batch_size itself (fixed-shape slots, fastadv.slots).
    """
    engine = engine if isinstance(engine, EngineOptions) else EngineOptions(**(engine or {}))
    with validation.deferred(), backend.pinned():
        return _run_functional(core, model, images, labels, budgets, engine, copy_images, slots, kwargs)


def _run_functional(core, model, images, labels, budgets, engine, copy_images, slots, kwargs):
    from fastadv.loop import chunked, halving_on_oom

    validation.check_images(images)
    validation.check_labels(labels, images.shape[0])
    n = images.shape[0]
    device = model_device(model, images.device)
    for name in budgets:
        value = validation.check_budget(kwargs[name], name, positive=(name == "alpha"), n=n)
        kwargs[name] = value.to(device, torch.float32) if isinstance(value, torch.Tensor) else value
    x = images.detach().to(device, copy=copy_images or n == 0)
    if n == 0:
        return x
    y = labels.detach().to(device, copy=True)
    per_sample = {k for k in budgets if isinstance(kwargs[k], torch.Tensor)}

    def run_chunk(xc, idx):
        chunk_kwargs = {k: (v[idx] if k in per_sample else v) for k, v in kwargs.items()}
        return core(model, xc, y[idx], engine=engine, **chunk_kwargs)

    with model_guard(model):
        if slots:  # the core takes batch_size itself (fixed-shape slots; fewer of them on OOM)
            def run_slots(size):
                options = engine if size == (engine.batch_size or n) else dataclasses.replace(engine, batch_size=size)
                return core(model, x, y, engine=options, **kwargs)

            adv, _ = halving_on_oom(run_slots, min(engine.batch_size or n, n), device)
            return finite_or_clean(adv, x)
        if per_sample:  # [N] budgets are chunked with the samples: chunk the row indices
            return finite_or_clean(chunked(run_chunk, x, torch.arange(n, device=device), engine.batch_size), x)
        return finite_or_clean(chunked(lambda xc, yc: core(model, xc, yc, engine=engine, **kwargs), x, y,
                                       engine.batch_size), x)


def finite_or_clean(adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Samples whose adversarial example is not finite come back as the clean input.

    Degenerate gradients (a dead network, inf logits) make some reference arithmetic
    produce NaN (APGD-L2, CW, DeepFool); an attack that failed that way returns the
    clean image instead. One read pass per call, never per step: a finite sum means every
    entry is finite (an overflow takes the exact path), and the sum is read in the call's
    one host read of its edge checks (validation.deferred); finite results are untouched.
    """
    if adv.shape != x.shape or adv.numel() == 0:
        return adv
    (total,) = validation.read_with_checks(adv.sum())
    if math.isfinite(total):
        return adv
    bad = ~torch.isfinite(adv).reshape(adv.shape[0], -1).all(1)
    return torch.where(bad.reshape(-1, *([1] * (adv.dim() - 1))), x.to(adv.dtype), adv)
