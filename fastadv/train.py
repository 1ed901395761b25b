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
"""
import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv.attacks.pgd import pgd_loop
from fastadv.attacks.tpgd import tpgd_loop
from fastadv.engine import EngineOptions, autocast_dtype, model_device, model_guard

METHODS = ("plain", "pgd", "trades", "fgsm-rs", "free")


# -- model views and contexts ---------------------------------------------------------------

def _is_ddp(model) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def attack_view(model: nn.Module) -> nn.Module:
    """The module an attack runs on: the module inside DistributedDataParallel, so that
    the attack's passes never touch DDP's reducer; otherwise the model itself (a
    torch.compile'd model stays compiled, unless it compiles a DDP wrapper)."""
    if _is_ddp(model):
        return model.module
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if inner is not None and _is_ddp(inner):
        return inner.module
    return model


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

def pgd_examples(model, x, y, *, eps, alpha, steps, random_start=True, bn_training=False, amp=None, backend=None):
    """Linf PGD examples for PGD-AT (fastadv's PGD loop; amp is the engine's precision)."""
    with crafting(model, bn_training=bn_training) as net:
        return pgd_loop(net, x.detach(), y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                        backend=backend, engine=EngineOptions(precision=amp))


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
    iterations for pgd and trades; replays is Free AT's m.
    """

    method: str = "pgd"
    eps: float = 8 / 255
    alpha: float = None
    steps: int = 10
    beta: float = 6.0
    replays: int = 4
    random_start: bool = True
    bn_training: bool = False
    amp: str = None
    backend: str = None

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
        return {**asdict(self), "step_size": self.step_size}


def craft(model, x, y, cfg: TrainConfig):
    """The training examples for cfg.method (x itself for plain), without parameter gradients."""
    kw = dict(eps=cfg.eps, bn_training=cfg.bn_training, amp=cfg.amp, backend=cfg.backend)
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
        scale = _world() / n_global if n_global else 1.0 / max(len(y), 1)
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


# -- the reference trainer --------------------------------------------------------------------

def _world():
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank():
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def fit(model, x, y, cfg: TrainConfig, *, epochs=10, batch_size=128, optimizer="adam", lr=1e-2, weight_decay=0.0,
        schedule="cosine", seed=0, shuffle=True, progress=False, on_epoch=None):
    """Train model on (x, y) with cfg's method; returns a list of per-epoch records.

    Under torch.distributed (model wrapped in DDP by the caller) every rank must pass
    the same full (x, y): each global batch of batch_size is split into world
    contiguous shards and rank r trains on shard r; batches smaller than the world
    are skipped. x and y may live on the CPU; batches move to the model's device.
    schedule: 'cosine' (per step, to zero) or 'constant'.
    """
    from fastadv.evaluate import progress_bar

    device = model_device(attack_view(model), torch.device("cpu"))
    opt = make_optimizer(model, optimizer, lr, weight_decay) if isinstance(optimizer, str) else optimizer
    trainer = Trainer(model, opt, cfg)
    world, rank = _world(), _rank()
    steps_per_epoch = len([b for b in global_batches(len(y), batch_size, 0, seed, shuffle) if len(b) >= world])
    total_steps = max(epochs * steps_per_epoch, 1)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    elif schedule == "constant":
        sched = None
    else:
        raise ValueError(f"unknown schedule {schedule!r}: expected 'cosine' or 'constant'")
    history = []
    bar = progress_bar(epochs, enabled=progress and rank == 0, desc=f"train {cfg.method}", unit="epoch")
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for idx in global_batches(len(y), batch_size, epoch, seed, shuffle):
            if len(idx) < world:
                continue
            local = idx.tensor_split(world)[rank]
            xb, yb = x[local].to(device, non_blocking=True), y[local].to(device, non_blocking=True)
            loss_sum += trainer.step(xb, yb, n_global=len(idx))
            n_steps += 1
            if sched is not None:
                sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record = {"epoch": epoch + 1, "loss": (loss_sum / max(n_steps, 1)).item(), "seconds": time.perf_counter() - t0,
                  "steps": n_steps}
        history.append(record)
        bar.set_description(f"train {cfg.method} loss {record['loss']:.4f}")
        bar.update(1)
        if on_epoch is not None:
            on_epoch(record)
    bar.close()
    attack_view(model).eval()
    return history


@torch.no_grad()
def accuracy(model, x, y, batch_size=512) -> float:
    """Clean accuracy of model (eval mode, restored after) on (x, y)."""
    net = attack_view(model)
    device = model_device(net, x.device)
    correct = 0
    with model_guard(net):
        for i in range(0, len(y), batch_size):
            correct += (net(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / max(len(y), 1)
