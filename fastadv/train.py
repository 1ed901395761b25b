"""Adversarial training: the building blocks and a compact reference trainer.

Methods (``METHODS``):

- ``plain``:   cross-entropy on clean inputs.
- ``pgd``:     PGD-AT (Madry et al., 2018): CE on a k-step Linf PGD example.
- ``trades``:  TRADES (Zhang et al., 2019): CE(clean) + beta * KL(adv || clean), the
               example maximising the KL term as torchattacks' TPGD crafts it.
- ``fgsm-rs``: "fast is better than free" (Wong et al., 2020): one FGSM step of
               1.25 * eps from a uniform random start, projected to the eps-ball.
- ``free``:    Free AT (Shafahi et al., 2019): one backward gives the parameter and
               the input gradient; each batch is replayed m times, the perturbation
               carried over from replay to replay and batch to batch.

The crafting functions never accumulate parameter gradients: they run under
``crafting``, which puts the model in attack mode (``fastadv.engine.model_guard``:
eval, BatchNorm in eval unless asked, parameters' requires_grad off) and on the
module inside a DistributedDataParallel wrapper, so an attack's forward and
backward passes never reach DDP's reducer (no gradient synchronisation). Free AT is
the exception by design: its one backward is the training backward, in train mode.

Mixed precision: ``amp='bf16'`` (CPU or CUDA) or ``'fp16'`` (CUDA, with a GradScaler)
runs forward and backward under ``torch.autocast``; perturbations stay in fp32.
A ``torch.compile``'d model works as is (the attack runs the compiled forward).

Distributed: ``fit`` shards every global batch across the ranks and scales each
rank's summed loss by world / global batch size, so DDP's gradient average equals
the gradient of the mean loss over the global batch.

Resuming: ``fit(..., state_path=P, save_every=k)`` writes a training state atomically
after every epoch and every k training steps (model, optimizer, LR scheduler,
GradScaler, Free AT's perturbation, RNG states, history, position; each rank's own
RNG, perturbation and buffers under torch.distributed), with a fingerprint of the run
and a checksum. Started again with the same arguments, fit continues from it and
ends bit for bit where an uninterrupted run ends; a state of another run, or a
corrupt one, raises TrainStateError and is left as it is. Batches depend only on
(seed, epoch), so resuming mid-epoch skips the batches already done. In the main
thread, Ctrl-C (SIGINT) lets the current step finish, saves, and raises
KeyboardInterrupt; a second Ctrl-C interrupts at once. Under torch.distributed the
ranks agree on the step to stop at (at most one step after the first rank's Ctrl-C),
so every rank finishes it, the state is saved once, and every rank raises
KeyboardInterrupt.
"""
import contextlib
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv.attacks.pgd import pgd_loop
from fastadv.attacks.tpgd import tpgd_loop
from fastadv.data import as_source, check_batch, split_data_args
from fastadv.engine import EngineOptions, autocast_dtype, model_device, model_guard
from fastadv.hints import Data, PathLike
from fastadv.runstate import (StateFileError, atomic_save, attack_view, description_fingerprint, dist_info,
                              model_digest, progress_bar, read_state_file, structure_digest)

METHODS = ("plain", "pgd", "trades", "fgsm-rs", "free")


# -- model views and contexts ---------------------------------------------------------------

@contextlib.contextmanager
def crafting(model: nn.Module, *, bn_training: bool = False):
    """Attack mode for crafting training examples; yields the module to attack.

    Eval mode (BatchNorm in train mode only with bn_training), every parameter's
    requires_grad off, so no parameter gradient is computed or accumulated, and on
    the module inside DDP. Modes and flags are restored on exit.
    """
    net = attack_view(model)
    with model_guard(net, model_training=bn_training, batchnorm_training=bn_training):
        yield net


def autocast(device: torch.device, amp=None):
    """torch.autocast for amp in (None, 'bf16', 'fp16') on device's type; a no-op for None."""
    dtype = autocast_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# -- crafting the training examples ------------------------------------------------------

def pgd_examples(model, x, y, *, eps, alpha, steps, random_start=True, bn_training=False, amp=None, backend=None,
                 cuda_graph=False):
    """Linf PGD examples for PGD-AT (fastadv's PGD loop; amp is the engine's precision;
    cuda_graph: one captured step replayed on every batch, see fastadv.graphs)."""
    with crafting(model, bn_training=bn_training) as net:
        return pgd_loop(net, x.detach(), y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                        backend=backend, engine=EngineOptions(precision=amp, cuda_graph=cuda_graph))


def fgsm_rs_examples(model, x, y, *, eps, alpha=None, bn_training=False, amp=None, backend=None):
    """FGSM from a uniform random start (Wong et al.): one step of alpha (default
    1.25 * eps) from clamp(x + U(-eps, eps), 0, 1), projected to the eps-ball."""
    alpha = 1.25 * eps if alpha is None else alpha
    return pgd_examples(model, x, y, eps=eps, alpha=alpha, steps=1, random_start=True,
                        bn_training=bn_training, amp=amp, backend=backend)


def trades_examples(model, x, *, eps, alpha, steps, bn_training=False, amp=None, backend=None):
    """TRADES' inner maximisation: fastadv's TPGD loop (torchattacks TPGD's arithmetic:
    start at clamp(x + 0.001 * randn, 0, 1), Linf sign steps on
    KLDivLoss(sum)(log_softmax(f(adv)), softmax(f(x))))."""
    with crafting(model, bn_training=bn_training) as net, autocast(x.device, amp):
        return tpgd_loop(net, x.detach(), eps=eps, alpha=alpha, steps=steps, backend=backend)


# -- configuration and the training step ------------------------------------------------------

@dataclass
class TrainConfig:
    """What one adversarial training step does.

    alpha defaults: pgd and trades 2.5 * eps / steps (Madry et al.), fgsm-rs
    1.25 * eps (Wong et al.), free eps (Shafahi et al.). steps is the attack's
    iterations for pgd and trades; replays is Free AT's m. cuda_graph (pgd on CUDA with the
    Triton kernels): the attack step is captured once and replayed on every batch, the
    last smaller batch on a graph of its own (fastadv.graphs); the same numbers, so it is
    not part of a run's identity (a run may resume with it on or off).
    """

    method: str = "pgd"
    eps: float = 8 / 255
    alpha: Optional[float] = None
    steps: int = 10
    beta: float = 6.0
    replays: int = 4
    random_start: bool = True
    bn_training: bool = False
    amp: Optional[str] = None
    backend: Optional[str] = None
    cuda_graph: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown training method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.method != "plain" and not (isinstance(self.eps, (int, float)) and self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a number > 0 for method {self.method!r}, got {self.eps!r}")
        if self.steps < 1 or self.replays < 1:
            raise ValueError(f"steps and replays must be >= 1, got steps={self.steps}, replays={self.replays}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        autocast_dtype(self.amp)

    @property
    def step_size(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return {"fgsm-rs": 1.25 * self.eps, "free": self.eps}.get(self.method, 2.5 * self.eps / self.steps)

    def to_dict(self) -> dict:
        d = {**asdict(self), "step_size": self.step_size}
        d.pop("cuda_graph")  # how the attack runs, not what it computes
        return d


def craft(model, x, y, cfg: TrainConfig):
    """The training examples for cfg.method (x itself for plain), without parameter gradients."""
    kw = dict(eps=cfg.eps, bn_training=cfg.bn_training, amp=cfg.amp, backend=cfg.backend)
    if cfg.method == "pgd":
        kw["cuda_graph"] = cfg.cuda_graph
    if cfg.method == "pgd":
        return pgd_examples(model, x, y, alpha=cfg.step_size, steps=cfg.steps, random_start=cfg.random_start, **kw)
    if cfg.method == "fgsm-rs":
        return fgsm_rs_examples(model, x, y, alpha=cfg.step_size, **kw)
    if cfg.method == "trades":
        return trades_examples(model, x, alpha=cfg.step_size, steps=cfg.steps, **kw)
    if cfg.method == "plain":
        return x
    raise ValueError(f"method {cfg.method!r} crafts its examples inside the training step (see Trainer)")


def training_loss(model, x, x_adv, y, cfg: TrainConfig, scale: float):
    """scale * the per-sample sum of the method's outer loss (scale = 1 / batch size
    for the mean; world / global batch size under DDP)."""
    if cfg.method == "trades":
        logits_clean = model(x).float()
        logits_adv = model(x_adv).float()
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="sum")
        return scale * (F.cross_entropy(logits_clean, y, reduction="sum") + cfg.beta * kl)
    return scale * F.cross_entropy(model(x_adv).float(), y, reduction="sum")


@dataclass
class Trainer:
    """One adversarial training step at a time, for any model wrapper.

    model may be a plain module, DistributedDataParallel or torch.compile'd; it is
    put in train mode for the outer step. scaler: a torch.amp.GradScaler for fp16
    (created automatically for amp='fp16' on CUDA).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    scaler: object = None
    _delta: torch.Tensor = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.scaler is None and autocast_dtype(self.cfg.amp) == torch.float16:
            device = model_device(attack_view(self.model), torch.device("cpu"))
            self.scaler = torch.amp.GradScaler(device.type)

    def step(self, x, y, n_global=None):
        """Train on the local batch (x, y); n_global is the global batch size under DDP
        (default: this batch's size). Returns the loss as a 0-dim tensor (no host sync)."""
        scale = dist_info()[1] / n_global if n_global else 1.0 / max(len(y), 1)
        if self.cfg.method == "free":
            return self._free_step(x, y, scale)
        x_adv = craft(self.model, x, y, self.cfg)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, self.cfg.amp):
            loss = training_loss(self.model, x, x_adv, y, self.cfg, scale)
        self._backward_and_step(loss)
        return loss.detach()

    def _backward_and_step(self, loss):
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def _free_step(self, x, y, scale):
        """m replays of one batch; each backward yields the parameter gradient (an
        optimizer step) and the input gradient (a sign step on the carried delta)."""
        cfg, n = self.cfg, len(y)
        if self._delta is None or self._delta.shape[1:] != x.shape[1:] or self._delta.shape[0] < n:
            self._delta = torch.zeros_like(x, dtype=torch.float32)
        delta = self._delta[:n]
        self.model.train()
        total = torch.zeros((), device=x.device)
        for _ in range(cfg.replays):
            adv = torch.clamp(x + delta, 0, 1).requires_grad_(True)
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(x.device, cfg.amp):
                loss = scale * F.cross_entropy(self.model(adv).float(), y, reduction="sum")
            self._backward_and_step(loss)
            grad = torch.nan_to_num(adv.grad, nan=0.0, posinf=0.0, neginf=0.0)  # fp16 overflow steps are skipped
            delta.add_(cfg.step_size * grad.sign()).clamp_(-cfg.eps, cfg.eps)
            total += loss.detach()
        return total / cfg.replays


# -- helpers of the reference trainer --------------------------------------------------------

def make_optimizer(model, name="adam", lr=1e-2, weight_decay=0.0, momentum=0.9):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: expected 'adam' or 'sgd'")


def global_batches(n, batch_size, epoch, seed, shuffle=True):
    """The index batches of one epoch, identical on every rank."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)) if shuffle else torch.arange(n)
    return list(order.split(batch_size))


# -- the resumable training state ---------------------------------------------------------------

TRAIN_STATE_FORMAT = "fastadv-train-state"
TRAIN_STATE_VERSION = 1


class TrainStateError(StateFileError):
    """A training state file that belongs to another run, or is corrupt, truncated or foreign."""


def _checksum(state: dict) -> str:
    h = hashlib.sha256()
    structure_digest(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def load_train_state(path, description: dict = None) -> dict:
    """The training state in path, checked: readable, a fastadv training state of this
    version, intact (checksum), and, given the run's description, of this run.

    Raises TrainStateError and leaves the file as it is otherwise.
    """
    path = os.fspath(path)
    state, hint = read_state_file(path, TRAIN_STATE_FORMAT, TRAIN_STATE_VERSION, "training state file", TrainStateError)
    if state.get("checksum") != _checksum(state):
        raise TrainStateError(f"training state file {path} is corrupt (its checksum does not match its content); {hint}")
    if description is not None and state.get("fingerprint") != description["fingerprint"]:
        theirs = state.get("description") or {}
        diffs = [f"{k}: state file has {theirs.get(k)!r}, this run {description.get(k)!r}"
                 for k in sorted(set(theirs) | set(description)) if k != "fingerprint" and theirs.get(k) != description.get(k)]
        raise TrainStateError(f"training state file {path} belongs to another training run ("
                              + ("; ".join(diffs) if diffs else "different fingerprint") + f"); {hint}")
    return state


def _run_description(net, source, cfg, opt, optimizer, lr, weight_decay, **run) -> dict:
    """What makes two fit calls the same run; its hash is the state's fingerprint."""
    d = {f"config.{k}": v for k, v in cfg.to_dict().items()}
    d.update(run)
    named = isinstance(optimizer, str)
    d["optimizer"] = optimizer if named else type(opt).__name__
    for key, value in (("lr", lr), ("weight_decay", weight_decay)):
        value = value if named else opt.defaults.get(key)
        d[key] = float(value) if isinstance(value, (int, float)) else value  # 1 and 1.0: the same run
    d["n"] = len(source)
    d["data_sha256"] = source.identity()  # an (images, labels) pair: the digest of the tensors, as before
    d["model_sha256"] = model_digest(net)  # the initial weights: the same model, built the same way
    d = json.loads(json.dumps(d, default=str))  # as it reads back from the file (tuples -> lists, ...)
    d["fingerprint"] = description_fingerprint(d)
    return d


class _Checkpoint:
    """Saves and restores everything fit needs to continue bit for bit."""

    def __init__(self, path, description, net, trainer, sched, device, world, rank):
        self.path, self.description, self.net, self.trainer, self.sched = os.fspath(path), description, net, trainer, sched
        self.device, self.world, self.rank = device, world, rank

    def _rank_part(self, history, loss_sum, seconds):
        """This rank's own state: RNG, Free AT's delta, loss sums (history) and, under
        DDP, buffers (each rank's BatchNorm statistics drift until the next forward)."""
        delta = self.trainer._delta
        part = {"rng_cpu": torch.get_rng_state(), "history": [dict(h) for h in history],
                "loss_sum": loss_sum.detach().cpu().clone(), "seconds": float(seconds),
                "delta": None if delta is None else delta.detach().cpu().clone()}
        if self.device.type == "cuda":
            part["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world > 1:
            part["buffers"] = {k: b.detach().cpu().clone() for k, b in self.net.named_buffers()}
        return part

    def save(self, epoch, step, history, loss_sum, seconds, finished=False):
        """epoch and step: the position to continue from (epochs and steps done)."""
        part = self._rank_part(history, loss_sum, seconds)
        parts = [part]
        if self.world > 1:  # a collective: every rank reaches the same save points
            import torch.distributed as dist

            parts = [None] * self.world
            dist.all_gather_object(parts, part)
        if self.rank != 0:
            return
        trainer = self.trainer
        state = {
            "format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION,
            "fingerprint": self.description["fingerprint"], "description": self.description,
            "epoch": epoch, "step": step, "finished": finished,
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": None if self.sched is None else self.sched.state_dict(),
            "scaler": None if trainer.scaler is None else trainer.scaler.state_dict(),
            "ranks": parts,
        }
        state["checksum"] = _checksum(state)
        atomic_save(state, self.path)

    def restore(self):
        """Loads a matching state into the model, optimizer, scheduler, scaler, Free AT's
        delta and the RNG; returns (state, this rank's part), or None without a state file."""
        state = None
        if self.rank == 0 and os.path.exists(self.path):
            try:
                state = load_train_state(self.path, self.description)
                if not isinstance(state.get("ranks"), list) or len(state["ranks"]) != self.world:
                    raise TrainStateError(f"training state file {self.path} has no per-rank state for "
                                          f"{self.world} processes")
            except TrainStateError as e:
                state = e
        if self.world > 1:  # rank 0's verdict and state, for every rank
            import torch.distributed as dist

            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if isinstance(state, TrainStateError):
            raise state
        if state is None:
            return None
        trainer, part = self.trainer, state["ranks"][self.rank]
        self.net.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(state["scheduler"])
        if trainer.scaler is not None and state["scaler"]:
            trainer.scaler.load_state_dict(state["scaler"])
        with torch.no_grad():
            for name, b in self.net.named_buffers():
                if name in part.get("buffers", {}):
                    b.copy_(part["buffers"][name])
        trainer._delta = None if part["delta"] is None else part["delta"].to(self.device)
        torch.set_rng_state(part["rng_cpu"])
        if self.device.type == "cuda" and part.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(part["rng_cuda"], self.device)
        return state, part


class _StopRequest:
    """Ctrl-C as a request: fit finishes the current step, saves, then raises
    KeyboardInterrupt. A second Ctrl-C raises at once.

    Under torch.distributed (world > 1) the ranks get SIGINT at slightly different
    moments (a terminal signals its whole process group, torchrun forwards it to one
    rank after the other), yet all must stop after the same step: the save is a
    collective, and a rank that stopped alone would leave the others waiting in DDP's
    gradient all_reduce. So they agree: after each step every rank launches an
    all_reduce(MAX) of its flag with async_op=True and reads the result one step
    later, once the next step is issued. Every rank reads the same results in the same
    order, so every rank stops after the same step, one step after the first request;
    the lag keeps the host from waiting for the GPU at each step. Every rank exchanges,
    whether or not it could install the handler, so the collectives always match.
    """

    requested = False

    def __init__(self, world=1, device=None):
        self.world, self.device = world, device
        self._pending = None  # the exchange launched after the previous step
        self._stream = None
        self._flag_device = None  # chosen at the first exchange, once the process group exists

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def after_step(self):
        """Whether to stop now, the step just issued done: every rank answers alike."""
        if self.world == 1:
            return self.requested
        agreed = self._pending is not None and self._pending()
        self._pending = None if agreed else self._launch()
        return agreed

    def at_epoch_end(self):
        """Whether to stop at an epoch's end: an exchange read at once (the epoch's end
        waits for the device and saves anyway), so none stays in flight past it. It
        covers the pending one: a flag, once set, stays set."""
        if self.world == 1:
            return self.requested
        if self._pending is not None:
            self._pending()
            self._pending = None
        return self._launch()()

    def _launch(self):
        """Starts the exchange of this rank's flag; returns a function that reads the result."""
        import torch.distributed as dist

        if self._flag_device is None:
            # The tensor where the backend takes it: the CPU if it can (gloo, mpi, ucc, the
            # default cpu:gloo,cuda:nccl), else the model's device (nccl: CUDA only).
            backends = {b.split(":")[0] for b in dist.get_backend_config().split(",")}
            self._flag_device = torch.device("cpu") if "cpu" in backends else self.device
        device = self._flag_device
        flag = torch.full((1,), int(self.requested), dtype=torch.int32, device=device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if device.type != "cuda":
            def read():
                work.wait()
                return bool(flag.item())
            return read
        # Copy the result to pinned host memory on a side stream: reading it then waits
        # for this step and the exchange only, never for the step queued after them.
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        host, done = torch.empty(1, dtype=torch.int32, pin_memory=True), torch.cuda.Event()
        with torch.cuda.stream(self._stream):
            work.wait()  # the side stream waits for the all_reduce; the host does not
            host.copy_(flag, non_blocking=True)
            flag.record_stream(self._stream)  # flag's memory is not reused before the copy is done
            done.record()

        def read():
            done.synchronize()
            return bool(host.item())
        return read


@contextlib.contextmanager
def _deferred_sigint(enabled, world=1, device=None):
    """Installs _StopRequest for SIGINT while fit runs, where that is safe: the main
    thread, Python's default handler in place (a handler of the caller's is kept)."""
    stop = _StopRequest(world, device)
    main = threading.current_thread() is threading.main_thread()
    if not (enabled and main and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        yield stop
        return
    signal.signal(signal.SIGINT, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# -- the reference trainer --------------------------------------------------------------------

def fit(model: nn.Module, data: Data, *args: Union[torch.Tensor, TrainConfig], cfg: Optional[TrainConfig] = None,
        epochs: int = 10, batch_size: int = 128, optimizer: Union[str, torch.optim.Optimizer] = "adam", lr: float = 1e-2,
        weight_decay: float = 0.0, schedule: Literal["cosine", "constant"] = "cosine", seed: int = 0,
        shuffle: bool = True, progress: bool = False, on_epoch: Optional[Callable[[dict], object]] = None,
        state_path: Optional[PathLike] = None, save_every: Optional[int] = None,
        log: Optional[Callable[[str], object]] = None) -> List[dict]:
    """Train model on data with cfg's method; returns a list of per-epoch records.

    ``fit(model, data, cfg, ...)``, data a DataLoader, a map-style Dataset or an
    (images, labels) pair (see fastadv.data); today's ``fit(model, x, y, cfg, ...)``
    works as well. The batches are fit's own: a permutation drawn from (seed, epoch)
    (a DataLoader gives its dataset and loading options, not its sampler), so they do
    not depend on the form of the data. Streamed batches are checked as they arrive:
    images outside [0, 1] or labels outside the model's classes raise DataError
    naming the batch.

    Under torch.distributed (model wrapped in DDP by the caller) every rank passes
    the same data: each global batch of batch_size is split into world contiguous
    shards and rank r reads and trains on shard r only; batches smaller than the
    world are skipped. Batches move to the model's device.
    schedule: 'cosine' (per step, to zero) or 'constant'.

    state_path: the resumable training state (see the module docs): written after
    every epoch and, with save_every=k, every k training steps (batches); if it
    exists, fit continues from it (a finished one: no training, the saved history and
    weights), or raises TrainStateError if it is not this run's. log: a callable for
    one-line messages (resuming).
    """
    data, args = split_data_args(data, args, "fit")
    if len(args) > 1 or (args and cfg is not None):
        raise TypeError("fit(model, data, cfg, *, epochs, ...) takes one TrainConfig after the data")
    cfg = args[0] if args else cfg
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"fit needs a TrainConfig, got {type(cfg).__name__}")
    if save_every is not None:
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be a positive int (training steps), got {save_every!r}")
        if state_path is None:
            raise ValueError("save_every needs a state_path to save to")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}: expected 'cosine' or 'constant'")
    source = as_source(data, "fit's data")
    device = model_device(attack_view(model), torch.device("cpu"))
    opt = make_optimizer(model, optimizer, lr, weight_decay) if isinstance(optimizer, str) else optimizer
    trainer = Trainer(model, opt, cfg)
    rank, world = dist_info()
    n_classes = _probe_classes(model, source, device) if source.streamed else None

    def batches(epoch):
        return [b for b in global_batches(len(source), batch_size, epoch, seed, shuffle) if len(b) >= world]

    steps_per_epoch = len(batches(0))
    total_steps = max(epochs * steps_per_epoch, 1)
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))

    history, start_epoch, start_step, partial = [], 0, 0, None
    ckpt = None
    if state_path is not None:
        net = attack_view(model)
        net = getattr(net, "_orig_mod", net)  # the bare module: the state does not depend on torch.compile
        description = _run_description(net, source, cfg, opt, optimizer, lr, weight_decay, epochs=epochs,
                                       batch_size=batch_size, schedule=schedule, seed=seed, shuffle=shuffle, world_size=world)
        ckpt = _Checkpoint(state_path, description, net, trainer, sched, device, world, rank)
        restored = ckpt.restore()
        if restored is None:
            ckpt.save(0, 0, history, torch.zeros(()), 0.0, finished=epochs == 0)
        else:
            state, partial = restored
            history, start_epoch, start_step = partial["history"], state["epoch"], state["step"]
            if log is not None:
                log(f"resuming from {state_path}: " + ("finished" if state["finished"] else
                                                      f"epoch {start_epoch + 1}, step {start_step}"))

    done_steps = min(start_epoch, epochs) * steps_per_epoch + (start_step if start_epoch < epochs else 0)
    bar = progress_bar(epochs * steps_per_epoch, enabled=progress and rank == 0, desc=f"train {cfg.method}",
                       unit="batch", initial=done_steps)
    with _deferred_sigint(ckpt is not None, world, device) as stop:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            loss_sum, seconds, first = torch.zeros((), device=device), 0.0, 0
            if epoch == start_epoch and start_step > 0:  # continue a saved partial epoch
                loss_sum, seconds, first = partial["loss_sum"].to(device), partial["seconds"], start_step
            epoch_batches = batches(epoch)
            local = [idx.tensor_split(world)[rank] for idx in epoch_batches[first:]]  # this rank's shards only
            images = 0
            for n_steps, (idx, (xb, yb)) in enumerate(zip(local, source.batches(local)), start=first + 1):
                if source.streamed:
                    check_batch(xb, yb, n_classes, f"training batch of samples {idx.tolist()[:4]}... (epoch {epoch + 1}, "
                                f"step {n_steps})")
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True).long()
                loss_sum += trainer.step(xb, yb, n_global=len(epoch_batches[n_steps - 1]))
                if sched is not None:
                    sched.step()
                images += len(epoch_batches[n_steps - 1])
                bar.update(1)
                bar.set_postfix_str(f"{images / max(time.perf_counter() - t0, 1e-9):.0f} img/s")
                if ckpt is not None and n_steps < len(epoch_batches):  # the epoch's end saves below
                    stopping = stop.after_step()
                    due = save_every is not None and (epoch * steps_per_epoch + n_steps) % save_every == 0
                    if due or stopping:
                        ckpt.save(epoch, n_steps, history, loss_sum, seconds + time.perf_counter() - t0)
                    if stopping:
                        raise KeyboardInterrupt
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            n_steps = len(epoch_batches)
            elapsed = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "loss": (loss_sum / max(n_steps, 1)).item(),
                      "seconds": seconds + elapsed, "steps": n_steps,
                      "images": sum(len(b) for b in epoch_batches)}  # images / seconds: the throughput
            history.append(record)
            if ckpt is not None:
                ckpt.save(epoch + 1, 0, history, torch.zeros(()), 0.0, finished=epoch + 1 == epochs)
                if stop.at_epoch_end():
                    raise KeyboardInterrupt
            bar.set_description(f"train {cfg.method} loss {record['loss']:.4f}")
            if on_epoch is not None:
                on_epoch(record)
    bar.close()
    attack_view(model).eval()
    return history


def _probe_classes(model, source, device):
    """The model's number of classes, from one forward pass on the first sample (eval mode)."""
    x, y = next(iter(source.batches([[0]])))
    check_batch(x, y, None, "the first sample")
    net = attack_view(model)
    with torch.no_grad(), model_guard(net):
        out = net(x.to(device))
    if out.dim() != 2:
        raise ValueError(f"the model must return logits [N, C], got shape {tuple(out.shape)}")
    return out.shape[1]


@torch.no_grad()
def accuracy(model, data, y=None, batch_size=512) -> float:
    """Clean accuracy of model (eval mode, restored after) on data (as fit takes it, or x, y)."""
    source = as_source((data, y) if y is not None else data, "accuracy's data")
    net = attack_view(model)
    device = model_device(net, source.x.device if not source.streamed else torch.device("cpu"))
    correct = 0
    with model_guard(net):
        for xb, yb in source.batches(torch.arange(len(source)).split(batch_size)):
            correct += (net(xb.to(device)).argmax(1).cpu() == yb).sum().item()
    return correct / max(len(source), 1)
