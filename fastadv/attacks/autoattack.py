"""AutoAttack (Croce & Hein, ICML 2020): a cascade of parameter-free attacks, as the original runs it.

This is the evaluation of fra31/auto-attack as packaged in pyautoattack 0.2.0, not
torchattacks' shortened variant:

- 'standard': APGD-CE (100 iterations, 1 restart), APGD-T (9 target classes,
  100 iterations), FAB-T (9 target classes, 100 iterations), Square (5000 queries).
- 'plus': APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square,
  APGD-T, FAB-T.
- 'rand' (randomized defenses): APGD-CE and APGD-DLR with EOT over 20 draws.
- 'custom': the attacks named in ``attacks``, with the original's constructor
  defaults (APGD and FAB with 5 restarts).

Each attack runs only on the points every earlier attack left robust, in chunks
of ``batch_size`` (250, as the original), and re-seeds with ``seed`` at every
chunk, as the original does. The sub-attacks use fastadv's loops with the
original arithmetic: apgd_loop / apgdt_loop (arithmetic='original'), fab_loop
(the original's FAB arithmetic is torchattacks'), square_loop
(arithmetic='original', resc_schedule=False). Randomness comes from private
generators: the caller's global RNG is left untouched.

torchattacks' AutoAttack runs APGD, APGD-T and FAB for 10 iterations (their class
default); ``steps=10`` reproduces that iteration count here (with the original's
arithmetic, not torchattacks').
"""
import numbers
import time
import warnings
from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.fab import check_norm, fab_loop
from fastadv.calls import CallCounter
from fastadv.engine import EXACT, EngineOptions, attacked_module
from fastadv.hints import Model

ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("standard", "plus", "rand", "custom")
VERSION_ATTACKS = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "rand": ["apgd-ce", "apgd-dlr"],
}


class Settings:
    """The settings of one sub-attack, under the original's attribute names (aa.apgd.n_iter, ...)."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __repr__(self):
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_version(version):
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    return version


def check_attacks(version, attacks):
    """The attacks to run: the version's list, or for 'custom' the given names in order."""
    if version != "custom":
        if attacks is not None:
            raise ValueError(f"attacks is only for version='custom' (version={version!r} fixes its attacks)")
        return list(VERSION_ATTACKS[version])
    if attacks is None or isinstance(attacks, str) or not isinstance(attacks, (list, tuple)) or not attacks:
        raise ValueError(f"version='custom' needs attacks: a non-empty list of names from {ATTACKS}, got {attacks!r}")
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"attacks: unknown attack {name!r}; choose from {ATTACKS}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks must not repeat an attack, got {list(attacks)}")
    return list(attacks)


def default_settings(version, n_classes, steps=None, n_queries=None):
    """(apgd, apgd_targeted, fab, square) settings as pyautoattack's constructor and
    _set_version leave them; n_classes - 1 target classes; steps / n_queries override
    the iteration and query counts."""
    n_targets = n_classes - 1
    apgd = Settings(n_iter=100, n_restarts=5, eot_iter=1, rho=0.75)
    apgd_targeted = Settings(n_iter=100, n_restarts=1, eot_iter=1, rho=0.75, n_target_classes=n_targets)
    fab = Settings(n_iter=100, n_restarts=5, n_target_classes=n_targets, alpha_max=0.1, eta=1.05, beta=0.9)
    square = Settings(n_queries=5000, n_restarts=1, p_init=0.8, rescale_schedule=False)
    if version == "standard":
        apgd.n_restarts = 1
        fab.n_restarts = 1
    elif version == "rand":
        apgd.n_restarts = 1
        apgd.eot_iter = 20
    if steps is not None:
        apgd.n_iter = apgd_targeted.n_iter = fab.n_iter = steps
    if n_queries is not None:
        square.n_queries = n_queries
    return apgd, apgd_targeted, fab, square


class AutoAttack(Attack):
    r"""AutoAttack from 'Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690],
    [https://github.com/fra31/auto-attack], run as the original (pyautoattack 0.2.0) runs it.

    Threat model: white-box (APGD, FAB) and score-based black-box (Square), untargeted
    success (any wrong class) within an Linf or L2 ball of radius eps in [0, 1] pixel space.

    Arguments:
        model (nn.Module): model to attack (returns logits [N, C]).
        norm (str): 'Linf' or 'L2'. (Default: 'Linf')
        eps (float): budget. (Default: 8/255)
        version (str): 'standard' (APGD-CE, APGD-T, FAB-T, Square), 'plus' (APGD-CE, APGD-DLR,
            FAB, Square, APGD-T, FAB-T, with 5 restarts for APGD and FAB), 'rand' (APGD-CE and
            APGD-DLR with EOT over 20 draws) or 'custom' (the attacks listed in ``attacks``).
            (Default: 'standard')
        n_classes (int): number of classes; APGD-T and FAB-T target the n_classes - 1 most
            likely other classes (the original: 9, i.e. n_classes=10). (Default: 10)
        seed (int or None): seed of every sub-attack, re-applied at each chunk as the original;
            None: the clock, per sub-attack call. (Default: 0)
        verbose (bool): print the robust accuracy after each attack. (Default: False)
        attacks (list of str, keyword): for version='custom', names from 'apgd-ce',
            'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t', run in that order.
        steps (int, keyword): iterations of APGD, APGD-T and FAB (the original: 100).
            ``steps=10`` gives torchattacks' AutoAttack iteration count. (Default: None)
        n_queries (int, keyword): Square's queries (the original: 5000). (Default: None)
        batch_size (int, keyword): chunk size of the robust points each attack receives, as
            the original's run_standard_evaluation(bs=...). (Default: 250)
        backend (str, keyword): backend of the APGD step ops.
        early_stop (bool, keyword): the shortcut for evaluations that need only the robust
            flags. APGD and APGD-T stop iterating a point as soon as one of their iterates
            fools the model. A point's flag cannot change after that (APGD flags a point
            that any iterate fooled) and every other point's run is its own (summed loss,
            per-sample step sizes and checkpoints, the same random draws at each restart,
            which only the still-robust points receive), so the robust flags after every
            stage, the report and robust_accuracy equal the run without it; APGD and APGD-T
            compute fewer gradients (``report`` counts them). The returned image of a point
            that APGD fools is then the first iterate that fooled it, where the original
            returns the last one, so it is off by default: the default returns the
            original's images bit for bit. It stays off with EOT (eot_iter > 1, the 'rand'
            version) and for a model with modules in training mode, whose random draws
            depend on the batch. Like fastadv's cycle_exit, it assumes the model's output
            for a point does not depend on the rest of the batch: true of PyTorch's CPU
            kernels on every model tested (tests/test_autoattack_flags.py), not of CUDA's,
            where a point's logits changed with the batch size (an H200: up to 1.3e-4 on a
            ResNet-18, 4e-7 without TF32; benchmarks/results/batch_invariance_h200.md), so
            there a point at the decision boundary may get another flag. (Default: False)

    The sub-attacks' settings are exposed under the original's names and may be changed
    before a call: ``apgd`` (n_iter, n_restarts, eot_iter, rho), ``apgd_targeted`` (n_iter,
    n_restarts, eot_iter, rho, n_target_classes), ``fab`` (n_iter, n_restarts,
    n_target_classes, alpha_max, eta, beta), ``square`` (n_queries, n_restarts, p_init,
    rescale_schedule); ``attacks_to_run`` lists the cascade. APGD's checkpoint schedule
    always follows its current n_iter (pyautoattack fixes it at construction, so there
    setting ``aa.apgd.n_iter`` afterwards keeps the 100-iteration schedule).

    After a call, ``report`` lists one dict per stage ('clean', then each attack run):
    attack, robust_accuracy (fraction), n_robust, time_s (the stage's wall time),
    forwards and backwards (the stage's model calls in samples: a forward of a chunk of
    250 adds 250; backwards are the gradient evaluations);
    ``robust_flags`` maps each stage to its per-sample [N] bool robust flags;
    ``robust_accuracy`` is the final robust accuracy; ``y_adv`` the predictions on the
    returned images. ``summary()`` formats the report; ``run_standard_evaluation(x, y)``
    returns (x_adv, y_adv) as pyautoattack 0.2.0 does.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W), the first
        successful adversarial example of each point, the clean image where all fail.

    Equivalence: the cascade, chunking and seeding are the original's and each sub-attack
    follows pyautoattack 0.2.0's arithmetic; tests/test_autoattack.py checks robust accuracy
    within 0.2 points and per-sample robust flags after every attack on >= 99% of samples
    against pyautoattack on trained models. Differences: the caller's RNG is untouched; the
    original's warnings-only sanity checks (randomized defense, probability outputs) are not
    run, except the Square success-rate warning; 'plus' runs FAB with 5 restarts on every
    call (the original lowers it to 1 for good after its first FAB-T); L1 is not supported.

    Example::
        >>> attack = fastadv.AutoAttack(model, norm='Linf', eps=8/255, version='standard', n_classes=10, seed=0)
        >>> adv_images = attack(images, labels)
        >>> print(attack.summary())
    """

    def __init__(self, model: nn.Module, norm: Literal["Linf", "L2"] = "Linf", eps: float = 8 / 255,
                 version: Literal["standard", "plus", "rand", "custom"] = "standard", n_classes: int = 10,
                 seed: Optional[int] = 0, verbose: bool = False, *, attacks: Optional[Sequence[str]] = None,
                 steps: Optional[int] = None, n_queries: Optional[int] = None, batch_size: int = 250,
                 backend: Optional[str] = None, early_stop: bool = False) -> None:
        super().__init__("AutoAttack", model, backend=backend)
        if not isinstance(early_stop, bool):
            raise TypeError(f"early_stop must be a bool, got {type(early_stop).__name__}")
        self.early_stop = early_stop
        self.norm = check_norm(norm)
        self.eps = validation.check_budget(eps, "eps")
        self.version = check_version(version)
        self.attacks_to_run = check_attacks(self.version, attacks)
        self.n_classes = _check_int(n_classes, "n_classes", 2)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.verbose = verbose
        if steps is not None:
            steps = _check_int(steps, "steps", 0)
        if n_queries is not None:
            n_queries = _check_int(n_queries, "n_queries", 1)
        self.steps = steps
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.apgd, self.apgd_targeted, self.fab, self.square = default_settings(
            self.version, self.n_classes, steps, n_queries
        )
        self.supported_mode = ["default"]
        self.report = []
        self.robust_flags = {}
        self.y_adv = None

    def get_seed(self):
        return int(time.time()) if self.seed is None else self.seed

    # -- the cascade ---------------------------------------------------------------------------

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return self._evaluate(x, y)

    def run_standard_evaluation(self, x_orig, y_orig, bs=None, *, batch_size=None):
        """pyautoattack 0.2.0's entry point: returns (x_adv, y_adv), y_adv the model's
        predictions on x_adv. bs (fra31's name) or batch_size overrides the chunk size
        for this call.
        """
        size = batch_size if batch_size is not None else bs
        saved = self.batch_size
        if size is not None:
            self.batch_size = _check_int(size, "batch_size", 1)
        try:
            x_adv = self(x_orig, y_orig)
        finally:
            self.batch_size = saved
        return x_adv, self.y_adv

    def _check_classes(self, logits, y_first, y):
        validation.check_logits(logits, y_first, n_classes_min=2)
        c = logits.shape[1]
        validation.check_label_range(y, c)
        if self.n_classes > c:
            raise ValueError(f"n_classes={self.n_classes} exceeds the {c} classes the model returns")
        targeted = {"apgd-t", "fab-t"} & set(self.attacks_to_run)
        if "apgd-t" in targeted and self.apgd_targeted.n_target_classes + 1 > c:
            raise ValueError(f"apgd_targeted.n_target_classes={self.apgd_targeted.n_target_classes} needs more than the {c} classes the model returns")
        if "fab-t" in targeted and self.fab.n_target_classes + 1 > c:
            raise ValueError(f"fab.n_target_classes={self.fab.n_target_classes} needs more than the {c} classes the model returns")

    def _evaluate(self, x, y):
        n = x.shape[0]
        bs = self.batch_size
        start = time.time()
        forward = CallCounter(self.get_logits)  # the model calls of each stage, for the report
        with torch.no_grad():
            y_adv = torch.empty_like(y)
            for s in range(0, n, bs):
                logits = forward(x[s:s + bs])
                if s == 0:
                    self._check_classes(logits, y[:bs], y)
                y_adv[s:s + bs] = logits.max(1)[1]
            robust = y_adv == y
        x_adv = x.clone()
        self.report = []
        self.robust_flags = {}
        self._record("clean", robust, n, time.time() - start, forward)

        for name in self.attacks_to_run:
            t0 = time.time()
            idx = robust.nonzero().squeeze(1)  # the one sync per attack: the chunks need sizes
            if idx.numel() == 0:
                if self.verbose:
                    print("no robust points left, skipping the remaining attacks")
                break
            for chunk in idx.split(bs):
                xs, ys = x[chunk], y[chunk]
                adv = self._run_attack(name, xs, ys, forward)
                with torch.no_grad():
                    pred = forward(adv).max(1)[1]
                fooled = pred != ys
                robust[chunk] = ~fooled
                y_adv[chunk] = torch.where(fooled, pred, y_adv[chunk])
                x_adv[chunk] = torch.where(fooled.view(-1, *([1] * (x.dim() - 1))), adv, x_adv[chunk])
            self._record(name, robust, n, time.time() - t0, forward)

        self._check_square()
        self.y_adv = y_adv
        if self.verbose:
            print(self.summary())
        return x_adv

    def _record(self, name, robust, n, seconds, counter):
        n_robust = int(robust.sum().item())
        acc = n_robust / n if n else 0.0
        self.report.append({"attack": name, "robust_accuracy": acc, "n_robust": n_robust, "time_s": seconds,
                            "forwards": counter.forwards, "backwards": counter.backwards})
        counter.reset()
        self.robust_flags[name] = robust.clone()
        if self.verbose:
            what = "initial accuracy" if name == "clean" else f"robust accuracy after {name.upper()}"
            print(f"{what}: {acc:.2%} ({seconds:.1f} s)")

    def _check_square(self):
        """The original's warning when Square lowers the robust accuracy below the gradient attacks'."""
        accs = {e["attack"]: e["robust_accuracy"] for e in self.report}
        if "square" in accs and len(accs) > 2:
            others = min(v for k, v in accs.items() if k != "square")
            if accs["square"] < others - 0.002:
                warnings.warn(
                    f"Square Attack has decreased the robust accuracy of {others - accs['square']:.2%}. This might "
                    "indicate that the robustness evaluation using AutoAttack is unreliable. Consider running Square "
                    "Attack with more iterations and restarts or an adaptive attack.",
                    stacklevel=4,
                )

    def _apgd_engine(self, eot_iter):
        """APGD's engine options: early stopping where it keeps every flag (see early_stop)."""
        module = attacked_module(self.model)
        training = module is not None and any(m.training for m in module.modules())
        return EngineOptions(early_stop=True) if self.early_stop and eot_iter == 1 and not training else EXACT

    def _run_attack(self, name, x, y, forward):
        """One sub-attack on a chunk of robust points, seeded afresh; returns its adversarial images."""
        seed = self.get_seed()
        common = dict(norm=self.norm, eps=self.eps)
        if name in ("apgd-ce", "apgd-dlr"):
            from fastadv.attacks.apgd import apgd_loop

            s = self.apgd
            adv, _ = apgd_loop(
                forward, x, y, n_iter=s.n_iter, n_restarts=s.n_restarts, loss=name[5:], eot_iter=s.eot_iter,
                rho=s.rho, seed=seed, arithmetic="original", backend=self.backend,
                engine=self._apgd_engine(s.eot_iter), **common,
            )
        elif name == "apgd-t":
            from fastadv.attacks.apgdt import apgdt_loop

            s = self.apgd_targeted
            adv, _ = apgdt_loop(
                forward, x, y, n_target_classes=s.n_target_classes, n_iter=s.n_iter, n_restarts=s.n_restarts,
                eot_iter=s.eot_iter, rho=s.rho, seed=seed, arithmetic="original", backend=self.backend,
                engine=self._apgd_engine(s.eot_iter), **common,
            )
        elif name in ("fab", "fab-t"):
            s = self.fab
            adv = fab_loop(
                forward, x, y, steps=s.n_iter, n_restarts=1 if name == "fab-t" else s.n_restarts,
                alpha_max=s.alpha_max, eta=s.eta, beta=s.beta, seed=seed, multi_targeted=name == "fab-t",
                n_target_classes=s.n_target_classes, **common,
            )
        else:
            from fastadv.attacks.square import square_loop

            s = self.square
            adv = square_loop(
                forward, x, y, n_queries=s.n_queries, n_restarts=s.n_restarts, p_init=s.p_init, loss="margin",
                resc_schedule=s.rescale_schedule, seed=seed, arithmetic="original", **common,
            )
        return adv

    # -- the report ------------------------------------------------------------------------------

    @property
    def robust_accuracy(self):
        """The robust accuracy after the last call's cascade (None before any call)."""
        return self.report[-1]["robust_accuracy"] if self.report else None

    def get_report(self):
        """A copy of the last call's report: [{attack, robust_accuracy, n_robust, time_s}, ...]."""
        return [dict(e) for e in self.report]

    def summary(self):
        """The last call's report as a table: robust accuracy and time after each attack."""
        if not self.report:
            return "AutoAttack: not run yet"
        lines = [f"AutoAttack ({self.version}, {self.norm}, eps={self.eps:.5g})"]
        for e in self.report:
            label = "clean" if e["attack"] == "clean" else e["attack"].upper()
            lines.append(f"  {label:<9} robust accuracy {e['robust_accuracy']:7.2%} ({e['n_robust']}) {e['time_s']:8.2f} s"
                         f"  {e['forwards']} forwards, {e['backwards']} gradients")
        lines.append(f"  total     {sum(e['time_s'] for e in self.report):.2f} s")
        return "\n".join(lines)


def autoattack(model: Model, images: torch.Tensor, labels: torch.Tensor, *, norm: Literal["Linf", "L2"] = "Linf",
               eps: float = 8 / 255, version: Literal["standard", "plus", "rand", "custom"] = "standard",
               n_classes: int = 10, seed: Optional[int] = 0, attacks: Optional[Sequence[str]] = None,
               steps: Optional[int] = None, n_queries: Optional[int] = None, batch_size: int = 250,
               verbose: bool = False, backend: Optional[str] = None, early_stop: bool = False) -> torch.Tensor:
    """AutoAttack as the original runs it (see AutoAttack for the arguments).

    Returns the adversarial images on the model's device: each point's first successful
    adversarial example, the clean image where every attack fails.
    """
    atk = AutoAttack(model, norm=norm, eps=eps, version=version, n_classes=n_classes, seed=seed, verbose=verbose,
                     attacks=attacks, steps=steps, n_queries=n_queries, batch_size=batch_size, backend=backend,
                     early_stop=early_stop)
    return atk(images, labels)
