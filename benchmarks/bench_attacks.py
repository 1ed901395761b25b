"""Whole attacks: fastadv against the reference libraries, and against the floor.

For each (model, batch, attack, mode) the attacks run in one process on the same
model, inputs and seed (``torch.manual_seed(seed)`` before every call), after a
warm-up, alternating fastadv, each reference and the floor, the order reversed every other
repeat (A B F F B A A B F ...) so that none always runs right after another. The
reported time is the median; CUDA runs are timed with CUDA events, CPU runs with
perf_counter.

- Reference: torchattacks 3.5.1 for every attack it has; pyautoattack 0.2.0 too for
  APGD, and alone for AutoAttack (fastadv.AutoAttack is the original's; torchattacks'
  AutoAttack runs other settings, so timing it against fastadv's would compare other work). A reference
  that is not installed, or an attack fastadv does not have yet, is skipped.
- Floor: ``k x (forward + input-gradient backward)`` of the model at the mode's
  precision, timed in the same run, where k is the number of gradient evaluations
  the attack makes (steps for PGD; steps x eot_iter for EOTPGD; 1 for FGSM; ...).
  Square is a forward-only attack: its floor is n_queries forwards. Attacks whose
  work is not a fixed count of gradients (FAB, DeepFool, AutoAttack) have none.
- Calls: the forward passes and gradient evaluations (input-gradient backward passes)
  per sample of one more, untimed run of each of fastadv, the references and the floor,
  counted by wrapping the model (fastadv.calls.CallCounter).
- Bit-exact: ``torch.equal(fastadv output, reference output)``, with the max abs
  difference when not equal (PGDL2 on Triton sums norms in another order). On CUDA
  the pair is re-run with deterministic algorithms for this check only.
- Modes: 'exact' (default arguments) and 'fast' when fastadv's attack takes
  ``precision`` / ``channels_last`` keyword arguments (skipped otherwise).
- Outcomes: the fraction of samples fastadv's output fools (success), and the
  reference's (for AutoAttack: 1 - robust accuracy, inputs starting correct); for fast mode
  also exact mode's success with the same seed and the agreement: the fraction of
  samples fooled in both modes or in neither. The two trained models (digits-cnn,
  robust-resnet18) are where the agreement means something.

    python -m benchmarks.bench_attacks --quick                       # CPU, small sizes
    python -m benchmarks.bench_attacks --models resnet18,wrn-28-10   # CUDA defaults
"""
import argparse
import contextlib
import copy
import dataclasses
import inspect
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from . import models as bench_models
from . import results, timing

SMALL_MODELS = ("smallcnn", "smallcnn-digits", "linear", "digits-cnn")


# -- what each attack is called with ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    kwargs: object  # (steps, num_classes, eps) -> kwargs shared by fastadv and torchattacks
    grads: object = None  # (steps, num_classes) -> gradient evaluations for the floor, or None
    forwards: object = None  # (steps, num_classes) -> forward-only evaluations for the floor (Square)
    references: tuple = ("torchattacks",)
    heavy: bool = False  # left out of the default attack list
    reference_channels: int = None  # the references run only on images with this many channels (PIFGSM's kernels)


# Linf attacks take the model's eps (8/255 for most, see models.py) and step sizes that
# scale with it as torchattacks' defaults do at 8/255 (alpha 2/255 = eps/4, FFGSM's 10/255).
ATTACKS = {
    "FGSM": AttackSpec(lambda s, c, e: dict(eps=e), grads=lambda s, c: 1),
    "FFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=1.25 * e), grads=lambda s, c: 1),
    "PGD": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, random_start=True), grads=lambda s, c: s),
    "PGDL2": AttackSpec(lambda s, c, e: dict(eps=0.5, alpha=0.1, steps=s, random_start=True), grads=lambda s, c: s),
    "RFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s), grads=lambda s, c: s),
    "MIFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, decay=1.0), grads=lambda s, c: s),
    "TPGD": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s), grads=lambda s, c: s),
    "EOTPGD": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, eot_iter=2), grads=lambda s, c: 2 * s),
    "CW": AttackSpec(lambda s, c, e: dict(c=1, kappa=0, steps=s, lr=0.01), grads=lambda s, c: s),
    "APGD": AttackSpec(
        lambda s, c, e: dict(norm="Linf", eps=e, steps=s, n_restarts=1, seed=0, loss="ce"), grads=lambda s, c: s,
        references=("torchattacks", "pyautoattack"),
    ),
    "APGDT": AttackSpec(
        lambda s, c, e: dict(norm="Linf", eps=e, steps=s, n_restarts=1, seed=0, n_classes=c),
        grads=lambda s, c: s * (c - 1),  # one APGD run per target class (n_classes - 1 of them)
    ),
    "FAB": AttackSpec(lambda s, c, e: dict(norm="Linf", eps=e, steps=s, n_restarts=1, seed=0, n_classes=c)),
    "Square": AttackSpec(
        lambda s, c, e: dict(norm="Linf", eps=e, n_queries=10 * s, n_restarts=1, seed=0), forwards=lambda s, c: 10 * s,
    ),
    "BIM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s), grads=lambda s, c: s),
    "UPGD": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, random_start=True, loss="ce"),
                       grads=lambda s, c: s),
    "DIFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, decay=0.0), grads=lambda s, c: s),
    # The reference's TIFGSM needs 3 channels (it crashes on the 1-channel models); 7 taps fit 8x8 digits.
    "TIFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, len_kernel=7), grads=lambda s, c: s),
    "NIFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, decay=1.0), grads=lambda s, c: s),
    "SINIFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, m=5), grads=lambda s, c: 5 * s),
    "VMIFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, N=5), grads=lambda s, c: 6 * s),
    "VNIFGSM": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s, N=5), grads=lambda s, c: 6 * s),
    "DeepFool": AttackSpec(lambda s, c, e: dict(steps=s, overshoot=0.02), heavy=True),
    "AutoAttack": AttackSpec(
        lambda s, c, e: dict(norm="Linf", eps=e, version="standard", n_classes=c, seed=0),
        # fastadv.AutoAttack is the original's; torchattacks' AutoAttack runs other settings
        references=("pyautoattack",), heavy=True,
    ),
    "PIFGSM": AttackSpec(lambda s, c, e: dict(max_epsilon=2 * e, num_iter_set=s), grads=lambda s, c: s,
                         reference_channels=3),
    "PIFGSMPP": AttackSpec(lambda s, c, e: dict(max_epsilon=2 * e, num_iter_set=s), grads=lambda s, c: s,
                           reference_channels=3),
    "Jitter": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s), grads=lambda s, c: s),
    # the loss averages 5 noisy copies per image: 5 gradients' worth of model work per step
    "PGDRS": AttackSpec(lambda s, c, e: dict(eps=e, alpha=e / 4, steps=s), grads=lambda s, c: 5 * s),
    "PGDRSL2": AttackSpec(lambda s, c, e: dict(eps=0.5, alpha=0.1, steps=s), grads=lambda s, c: 5 * s),
    "GN": AttackSpec(lambda s, c, e: dict(std=0.1)),
    "VANILA": AttackSpec(lambda s, c, e: {}),
    # 16 directions, 2 forwards each (in batches of 8 copies of the batch): nb_iter=1 as the reference's default
    "SPSA": AttackSpec(lambda s, c, e: dict(eps=e, nb_iter=1, nb_sample=16, max_batch_size=8), forwards=lambda s, c: 32),
    # EAD without abort_early, so that its work is a fixed count: per iteration one gradient
    # (at y) and one forward (at x). JSMA and SparseFool run image by image in both libraries.
    "EADL1": AttackSpec(lambda s, c, e: dict(binary_search_steps=3, max_iterations=s, abort_early=False),
                        grads=lambda s, c: 3 * s, forwards=lambda s, c: 3 * s),
    "EADEN": AttackSpec(lambda s, c, e: dict(binary_search_steps=3, max_iterations=s, abort_early=False),
                        grads=lambda s, c: 3 * s, forwards=lambda s, c: 3 * s),
    "JSMA": AttackSpec(lambda s, c, e: dict(theta=1.0, gamma=0.1), heavy=True),
    "SparseFool": AttackSpec(lambda s, c, e: dict(steps=s, lam=3, overshoot=0.02), heavy=True),
    # Searches on the host, one image at a time (draws from numpy's RNG): heavy, run them with a small --batch.
    "OnePixel": AttackSpec(lambda s, c, e: dict(pixels=1, steps=s, popsize=10, inf_batch=128), heavy=True),
    "Pixle": AttackSpec(lambda s, c, e: dict(restarts=s, max_iterations=10), heavy=True),
}


def fastadv_class(name):
    """fastadv's attack class, or None when fastadv does not have it (yet)."""
    import fastadv

    try:
        return getattr(fastadv, name)
    except (AttributeError, ImportError):
        return None


FAST_OPTIONS = {"precision": "bf16", "channels_last": True}


def fast_kwargs(cls):
    """The options of fastadv's opt-in fast mode (bf16 autocast + channels_last), or None
    when this fastadv has none: explicit keyword arguments of the attack class, or
    fastadv.engine.EngineOptions fields taken through ``**engine`` / ``set_engine``."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    kw = {k: v for k, v in FAST_OPTIONS.items() if k in params}
    if kw:
        return kw
    try:
        from fastadv.engine import EngineOptions

        fields = {f.name for f in dataclasses.fields(EngineOptions)}
    except (ImportError, TypeError):
        return None
    takes_kwargs = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
    if takes_kwargs or hasattr(cls, "set_engine"):
        return {k: v for k, v in FAST_OPTIONS.items() if k in fields} or None
    return None


def make_fastadv(cls, model, kwargs, mode_kw, backend):
    """fastadv's attack with the shared kwargs, the mode's options and the backend."""
    kw = dict(kwargs)
    if backend is not None:
        kw["backend"] = backend
    if not mode_kw:
        return cls(model, **kw)
    try:
        return cls(model, **kw, **mode_kw)
    except TypeError:
        atk = cls(model, **kw)
        atk.set_engine(**mode_kw)
        return atk


def reference_call(lib, name, model, kwargs, device):
    """A zero-argument-style callable (x, y) -> adversarial images for a reference library, or None."""
    if lib == "torchattacks":
        try:
            import torchattacks
        except ImportError:
            return None
        cls = getattr(torchattacks, name, None)
        if cls is None:
            return None
        atk = cls(model, **kwargs)
        return lambda x, y: atk(x, y)
    if lib == "pyautoattack":
        try:
            import pyautoattack
            from pyautoattack.autopgd_base import APGDAttack
        except ImportError:
            return None
        if name == "APGD":
            atk = APGDAttack(
                model, n_iter=kwargs["steps"], norm=kwargs["norm"], n_restarts=kwargs["n_restarts"],
                eps=kwargs["eps"], seed=kwargs["seed"], loss=kwargs["loss"], eot_iter=1, rho=0.75, device=device,
            )
            return lambda x, y: atk.perturb(x, y)
        if name == "AutoAttack":
            atk = pyautoattack.AutoAttack(
                model, eps=kwargs["eps"], norm=kwargs["norm"], seed=kwargs["seed"], version=kwargs["version"],
                device=device,
            )
            return lambda x, y: atk.run_standard_evaluation(x, y, batch_size=x.shape[0])[0]
        return None
    raise ValueError(f"unknown reference library {lib!r}")


# -- the floor ---------------------------------------------------------------------------------


@contextlib.contextmanager
def no_param_grads(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def autocast_for(mode_kw, device):
    if mode_kw and mode_kw.get("precision") in ("bf16", "bfloat16"):
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if mode_kw and mode_kw.get("precision") in ("fp16", "float16"):
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.float16)
    return contextlib.nullcontext()


def floor_call(model, x, y, *, grads, forwards, mode_kw, device, frozen=False):
    """grads x (forward + CE + input-gradient backward), or forwards x forward, at the mode's precision.

    Each gradient evaluation is torchattacks' step without its update: a fresh leaf, the
    model's parameters as the caller left them, nn.CrossEntropyLoss, autograd.grad. (It used
    to freeze the parameters and differentiate the clean images under an extra grad-mode
    context; timed on an H200 that floor came out above both libraries, see benchmarks/fair.py,
    which times this one beside the old one.) frozen: the parameters' requires_grad off
    meanwhile, as fastadv runs the model.
    """
    if mode_kw and mode_kw.get("channels_last"):
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    loss = torch.nn.CrossEntropyLoss()

    def run():
        with no_param_grads(model) if frozen else contextlib.nullcontext():
            for _ in range(grads or 0):
                adv = x.clone()
                adv.requires_grad = True
                with autocast_for(mode_kw, device):
                    cost = loss(model(adv), y)
                torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)
            with torch.no_grad():
                for _ in range(forwards or 0):
                    with autocast_for(mode_kw, device):
                        model(x)

    return run


def floor_call_before(model, x, y, *, grads, forwards, mode_kw, device):
    """The floor as the first H200 runs timed it (kept for benchmarks/fair.py's comparison)."""
    if mode_kw and mode_kw.get("channels_last"):
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with no_param_grads(model):
            for _ in range(grads or 0):
                xa = x.detach().requires_grad_(True)
                with torch.enable_grad(), autocast_for(mode_kw, device):
                    loss = F.cross_entropy(model(xa), y)
                torch.autograd.grad(loss, xa)
            with torch.no_grad():
                for _ in range(forwards or 0):
                    with autocast_for(mode_kw, device):
                        model(x)

    return run


# -- one case ------------------------------------------------------------------------------------


def seeded(fn, seed):
    def run():
        torch.manual_seed(seed)  # seeds every device's generator
        np.random.seed(seed)  # OnePixel and Pixle draw from numpy's global RNG
        return fn()

    return run


@contextlib.contextmanager
def deterministic():
    """Deterministic algorithms (cuDNN and friends) for the bit-exactness re-run on CUDA."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def compare(a, b):
    if a is None or b is None:
        return None, None
    if isinstance(a, (tuple, list)):
        a = a[0]
    if isinstance(b, (tuple, list)):
        b = b[0]
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return False, None
    equal = bool(torch.equal(a, b))
    diff = 0.0 if equal else float((a.float() - b.float()).abs().max())
    return equal, diff


@torch.no_grad()
def success(model, y, adv):
    """Per sample: does the model misclassify adv (untargeted success)?"""
    if isinstance(adv, (tuple, list)):
        adv = adv[0]
    return model(adv).argmax(1) != y


def make_inputs(model, model_name, batch, device, seed):
    """(x, y): the model's real test data where it has some, else random images
    labelled with the model's own predictions (every point starts correctly classified)."""
    spec = bench_models.MODELS[model_name]
    if spec.data is not None:
        x, y = spec.data(batch, seed)
        return x.to(device), y.to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *spec.input_shape, generator=g).to(device)
    with torch.no_grad():
        return x, model(x).argmax(1)


def case_builders(cls, attack, x, y, kwargs, mode_kw, *, grads, forwards, device, backend, seed, refs):
    """[(name, build)] for fastadv, each reference library and the floor, where build(model)
    returns the zero-argument call to time on that model (None: that library lacks the attack)."""

    def fastadv_build(model):
        atk = make_fastadv(cls, model, kwargs, mode_kw, backend)
        return seeded(lambda: atk(x, y), seed)

    def reference_build(lib):
        def build(model):
            fn = reference_call(lib, attack, model, kwargs, device)
            return None if fn is None else seeded(lambda: fn(x, y), seed)
        return build

    def floor_build(model):
        from fastadv.calls import CallCounter

        # The floor's channels_last copy of the model would take a counter's counts with it;
        # the layout changes no call, so a counted floor runs in the model's own layout.
        kw = {k: v for k, v in mode_kw.items() if k != "channels_last"} if isinstance(model, CallCounter) else mode_kw
        return floor_call(model, x, y, grads=grads, forwards=forwards, mode_kw=kw, device=device)

    builders = [("fastadv", fastadv_build)] + [(lib, reference_build(lib)) for lib in refs]
    if grads or forwards:
        builders.append(("floor", floor_build))
    return builders


def count_calls(build, model, n):
    """{'forwards': ..., 'grads': ...} per sample of one untimed run of build(model), counted by
    wrapping the model (fastadv.calls.CallCounter), not derived from the attack's settings."""
    from fastadv.calls import CallCounter

    counter = CallCounter(model)
    fn = build(counter)
    if fn is not None:
        fn()
    fwd, bwd = counter.per_sample(n)
    return {"forwards": fwd, "grads": bwd}


def run_case(model, model_name, x, y, attack, mode, *, steps, repeats, warmup, device, backend, seed, refs,
             clock="wall", progress=None):
    """Rows (one per reference library) for one attack on one model/batch/mode; [] when skipped."""
    spec = ATTACKS[attack]
    cls = fastadv_class(attack)
    if cls is None:
        return [], f"{attack}: not in fastadv yet, skipped"
    mode_kw = {} if mode == "exact" else fast_kwargs(cls)
    if mode_kw is None:
        return [], f"{attack}: fastadv has no fast mode (no precision/channels_last options), 'fast' skipped"
    model_spec = bench_models.MODELS[model_name]
    num_classes = model_spec.num_classes
    kwargs = spec.kwargs(steps, num_classes, model_spec.eps)
    fa_kwargs = dict(kwargs, **mode_kw)
    grads = spec.grads(steps, num_classes) if spec.grads else None
    forwards = spec.forwards(steps, num_classes) if spec.forwards else None
    wanted = [r for r in spec.references if r in refs]
    if spec.reference_channels is not None and model_spec.input_shape[0] != spec.reference_channels:
        wanted = []  # the reference crashes on this channel count; fastadv runs alone
    builders = case_builders(cls, attack, x, y, kwargs, mode_kw, grads=grads, forwards=forwards, device=device,
                             backend=backend, seed=seed, refs=wanted)
    calls = [(name, fn) for name, build in builders if (fn := build(model)) is not None]
    counted = {name: count_calls(build, model, x.shape[0]) for name, build in builders if name in dict(calls)}

    wall = {name: [] for name, _ in calls}
    cpu = {name: [] for name, _ in calls}
    outputs = {}
    for _ in range(warmup):
        for name, fn in calls:
            fn()
    for r in range(repeats):
        # every other repeat runs in reverse order (A B F, F B A, ...): none always follows another
        for name, fn in (calls if r % 2 == 0 else calls[::-1]):
            out, ms, cpu_ms = timing.timed_call(fn, device)
            wall[name].append(ms)
            if cpu_ms is not None:
                cpu[name].append(cpu_ms)
            if r == 0 and name != "floor":
                outputs[name] = out
        if progress is not None:
            progress.update(1)
    if torch.device(device).type == "cuda":
        clock = "wall"  # CUDA events
    samples, other = (cpu, wall) if clock == "cpu" else (wall, cpu)
    other_clock = "wall" if clock == "cpu" else "cpu"
    if torch.device(device).type == "cuda":
        with deterministic():
            outputs = {name: fn() for name, fn in calls if name != "floor"}

    outcomes = {}
    if outputs.get("fastadv") is not None:
        fooled = success(model, y, outputs["fastadv"])
        outcomes["success_rate"] = fooled.float().mean().item()
        if mode != "exact":  # fast mode's effect on who gets fooled: exact mode, same seed
            exact = success(model, y, seeded(lambda: make_fastadv(cls, model, kwargs, {}, backend)(x, y), seed)())
            outcomes.update(exact_success_rate=exact.float().mean().item(),
                            exact_agreement=(exact == fooled).float().mean().item())

    fa_ms = timing.summary(samples["fastadv"])
    other_med = {k: round(timing.summary(v)[0], 4) for k, v in other.items() if v}
    floor_ms = timing.summary(samples["floor"])[0] if "floor" in samples else None
    from fastadv.backend import resolve

    base = {
        "bench": "attacks", "attack": attack, "model": model_name, "batch": int(x.shape[0]), "steps": steps,
        "mode": mode, "device_kind": torch.device(device).type, "backend": resolve(backend, torch.device(device)),
        "params": {k: v for k, v in fa_kwargs.items()}, "repeats": repeats, "warmup": warmup,
        "fastadv_ms": fa_ms[0], "fastadv_p20_ms": fa_ms[1], "fastadv_p80_ms": fa_ms[2],
        "floor_ms": floor_ms, "floor_grads": grads, "floor_forwards": forwards,
        "fastadv_floor_ratio": fa_ms[0] / floor_ms if floor_ms else None,
        "threads": torch.get_num_threads(),
        "clock": "cuda events" if torch.device(device).type == "cuda" else
                 ("perf_counter (wall)" if clock == "wall" else "process_time (CPU time)"),
        "samples_ms": {k: [round(v, 4) for v in vs] for k, vs in samples.items()},
    }
    base.update(outcomes)
    base["calls_per_sample"] = counted
    if other_med:
        base[f"{other_clock}_median_ms"] = other_med  # the same runs on the other clock
    if hasattr(os, "getloadavg"):
        base["load_avg_1m"] = round(os.getloadavg()[0], 2)
    rows = []
    ref_names = [n for n, _ in calls if n not in ("fastadv", "floor")] or [None]
    for lib in ref_names:
        row = dict(base, reference=lib or "none")
        row["case"] = f"{attack}/{model_name}/b{row['batch']}/s{steps}/{mode}/{row['device_kind']}/{row['backend']}/{row['reference']}"
        if lib is not None:
            ref_ms = timing.summary(samples[lib])
            row.update(reference_ms=ref_ms[0], reference_p20_ms=ref_ms[1], reference_p80_ms=ref_ms[2],
                       speedup=ref_ms[0] / fa_ms[0],
                       reference_floor_ratio=ref_ms[0] / floor_ms if floor_ms else None)
            row["equal"], row["max_abs_diff"] = compare(outputs.get("fastadv"), outputs.get(lib))
            if outputs.get(lib) is not None:
                row["reference_success_rate"] = success(model, y, outputs[lib]).float().mean().item()
            if other_med.get(lib) and other_med.get("fastadv"):
                row[f"speedup_{other_clock}"] = other_med[lib] / other_med["fastadv"]
        rows.append(row)
    return rows, None


# -- driver ----------------------------------------------------------------------------------------


def default_attacks(model_name, heavy_ok=False):
    names = [a for a, s in ATTACKS.items() if heavy_ok or not s.heavy]
    if model_name not in SMALL_MODELS:
        names = [a for a in names if a in ("PGD", "PGDL2")]
    return names


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_attacks", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None, help=f"comma list of {sorted(bench_models.MODELS)} "
                   "(default: smallcnn,linear,digits-cnn,robust-resnet18 with --quick or on CPU; all on CUDA)")
    heavy = "/".join(a for a, spec in ATTACKS.items() if spec.heavy)
    p.add_argument("--attacks", default=None, help=f"comma list of {list(ATTACKS)}, or 'all' (the heavy "
                   f"{heavy} too); default: every non-heavy attack fastadv has on small models, "
                   "PGD and PGDL2 on the others")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per library (default 5 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1 CPU, 2 CUDA)")
    p.add_argument("--modes", default="exact,fast", help="'exact' and/or 'fast'")
    p.add_argument("--refs", default="torchattacks,pyautoattack", help="reference libraries to run")
    p.add_argument("--backend", default=None, help="fastadv backend= for the attacks (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU only: which clock the reported times use: wall (perf_counter) or this process's CPU "
                        "time (process_time; steadier on a shared machine, use with --threads 1). Both are recorded.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CPUs and smoke runs")
    p.add_argument("--out-json", help="default benchmarks/results/<device-slug>.json")
    p.add_argument("--out-md", help="default: the JSON path with .md")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            p.error("--device cuda but torch.cuda.is_available() is False")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # for the deterministic re-run
    if args.threads:
        torch.set_num_threads(args.threads)
    model_names = (args.models.split(",") if args.models else
                   (list(bench_models.MODELS) if cuda and not args.quick else ["smallcnn", "linear", "digits-cnn", "robust-resnet18"]))
    model_names = [m.strip() for m in model_names if m.strip()]
    for m in model_names:
        if m not in bench_models.MODELS:
            p.error(f"unknown model {m!r}; expected {sorted(bench_models.MODELS)}")
    repeats = args.repeats or (10 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    refs = {r.strip() for r in args.refs.split(",") if r.strip()}

    plan = []
    for m in model_names:
        spec = bench_models.MODELS[m]
        batch = args.batch or (spec.batch_quick if args.quick else spec.batch_gpu if cuda else spec.batch_cpu)
        if args.attacks in (None, ""):
            names = default_attacks(m)
        elif args.attacks == "all":
            names = list(ATTACKS)
        else:
            names = [a.strip() for a in args.attacks.split(",") if a.strip()]
        for a in names:
            if a not in ATTACKS:
                p.error(f"unknown attack {a!r}; expected {list(ATTACKS)}")
        plan.append((m, batch, names))

    from tqdm import tqdm

    env = results.environment(device)
    print(f"{env['device']} | commit {env['commit']} | torch {env['torch']} | triton {env['triton']} | "
          f"python {env['python']} | {env['date']}", file=sys.stderr)
    total = sum(len(names) * len(modes) * repeats for _, _, names in plan)
    rows, notes = [], []
    with tqdm(total=total, desc="attacks", disable=args.quiet, file=sys.stderr) as bar:
        for m, batch, names in plan:
            try:
                model = bench_models.build(m, device, seed=args.seed)
            except (ImportError, OSError) as e:
                notes.append(f"{m}: {e}; skipped")
                bar.update(len(names) * len(modes) * repeats)
                continue
            x, y = make_inputs(model, m, batch, device, args.seed)
            for a in names:
                for mode in modes:
                    bar.set_postfix_str(f"{a} {m} b{batch} {mode}")
                    try:
                        new, note = run_case(model, m, x, y, a, mode, steps=args.steps, repeats=repeats,
                                             warmup=warmup, device=device, backend=args.backend, seed=args.seed,
                                             refs=refs, clock=args.clock, progress=bar)
                    except Exception as e:  # noqa: BLE001 - one broken attack must not end the run
                        new, note = [], f"{a} on {m} ({mode}): failed with {type(e).__name__}: {e}"
                    if note:
                        if note not in notes:
                            notes.append(note)
                        bar.update(repeats)
                    for r in new:
                        r.update(env)
                        rows.append(r)
            del model, x, y
            if cuda:
                torch.cuda.empty_cache()

    print()
    results.print_table(rows, "attacks")
    summ = results.summarize(rows)
    if summ:
        print("\nMedian over attacks of (reference time / fastadv time):\n")
        print(results.table(summ, results.SUMMARY_COLUMNS))
    if notes:
        print("\nSkipped:\n" + "\n".join(f"- {n}" for n in notes))
    if not args.no_write and rows:
        written = results.write_results(rows, args.out_json, args.out_md, device=device)
        print(f"\nwrote {written[0]} and {written[1]}")
    return rows


if __name__ == "__main__":
    main()
