"""Robust-accuracy evaluation over a dataset: cascade, sharding, resumable state.

``evaluate(model, x, y, ["pgd-50", "apgd-ce", ...], eps=...)`` runs the attacks as a
cascade: the clean pass first, then each attack only on the points that are still
robust after the ones before it. A point is robust after attack k if the model
still classifies its adversarial example correctly.

Work units are fixed batches of the dataset (indices [b*B, (b+1)*B)), and before
each (attack, batch) unit the RNG is seeded from (seed, attack index, batch index).
A unit's result therefore depends on nothing but the unit, which gives:

- sharding: under torch.distributed the units of each attack are dealt out
  round-robin to the ranks (no sample is processed twice, no padding), and the
  per-sample flags are all-gathered after each round, so every rank holds the same
  state and the numbers equal a single process's with the same batch size;
- resuming: after each round the state (per-sample robust flags after the clean
  pass and after each attack, which units are done, and a fingerprint of model
  weights, data, attack list, eps, batch size and seed) is written atomically
  (temporary file + os.replace). Rerun with the same arguments, the evaluation
  skips the finished units and ends with exactly the numbers of an uninterrupted
  run. A state file of another evaluation, or one that is corrupt or truncated,
  raises StateFileError and is left as it is.

Attack names: see ``ATTACKS``; iterative attacks take a ``-N`` suffix for their
steps (``pgd-50``, ``apgd-ce-100``, ``square-1000`` queries). Names resolve to the
fastadv attack classes that exist in this build; one that does not exist yet is
an AttackUnavailable error, raised before any work.
"""
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from fastadv.engine import model_device, model_guard

STATE_FORMAT = "fastadv-eval-state"
STATE_VERSION = 1


class EvaluationError(ValueError):
    """Bad input to an evaluation: unknown attack, labels outside the model's classes, ..."""


class AttackUnavailable(EvaluationError):
    """A known attack name whose fastadv implementation is not in this build."""


class StateFileError(EvaluationError):
    """A state file that belongs to another evaluation, or is corrupt or truncated."""


# -- attacks by name -----------------------------------------------------------------------

@dataclass(frozen=True)
class AttackSpec:
    """An attack of the cascade: build(model, eps, n_classes) returns a callable
    (images, labels) -> adversarial images. params enter the fingerprint."""

    name: str
    norm: str
    build: Callable
    params: dict = field(default_factory=dict)


def fastadv_attack(class_name: str):
    """The fastadv attack class class_name, or AttackUnavailable if this build lacks it."""
    from fastadv.attacks import REGISTRY, resolve

    module = f"fastadv.attacks.{REGISTRY[class_name][0]}"
    try:
        return resolve(class_name, REGISTRY)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise AttackUnavailable(
            f"fastadv.{class_name} is not available in this build of fastadv (no module {module})"
        ) from None


# name -> (class, norm, default steps (None: no -N suffix), name of the steps argument, fixed kwargs)
ATTACKS = {
    "fgsm": ("FGSM", "Linf", None, None, {}),
    "pgd": ("PGD", "Linf", 20, "steps", {"random_start": True}),
    "pgdl2": ("PGDL2", "L2", 20, "steps", {"random_start": True}),
    "mifgsm": ("MIFGSM", "Linf", 10, "steps", {"decay": 1.0}),
    "apgd-ce": ("APGD", "Linf", 100, "steps", {"norm": "Linf", "loss": "ce", "n_restarts": 1, "seed": 0}),
    "apgd-dlr": ("APGD", "Linf", 100, "steps", {"norm": "Linf", "loss": "dlr", "n_restarts": 1, "seed": 0}),
    "apgd-t": ("APGDT", "Linf", 100, "steps", {"norm": "Linf", "n_restarts": 1, "n_classes": None, "seed": 0}),
    "fab": ("FAB", "Linf", 100, "steps", {"norm": "Linf", "n_restarts": 1, "multi_targeted": True, "n_classes": None, "seed": 0}),
    "square": ("Square", "Linf", 5000, "n_queries", {"norm": "Linf", "n_restarts": 1, "seed": 0}),
    "autoattack": ("AutoAttack", "Linf", None, None, {"norm": "Linf", "version": "standard", "n_classes": None, "seed": 0}),
}
_STEP_ALPHA = {"pgd", "pgdl2", "mifgsm"}  # alpha = 2.5 * eps / steps (Madry et al.'s rule)


def attack_spec(name) -> AttackSpec:
    """The AttackSpec for a name like 'pgd', 'pgd-50', 'apgd-t' or 'autoattack' (or a spec)."""
    if isinstance(name, AttackSpec):
        return name
    if not isinstance(name, str) or not name.strip():
        raise EvaluationError(f"attack names must be non-empty strings, got {name!r}")
    key = name.strip().lower()
    steps = None
    m = re.fullmatch(r"(.+?)-(\d+)", key)
    if key not in ATTACKS and m and m.group(1) in ATTACKS:
        key, steps = m.group(1), int(m.group(2))
    if key not in ATTACKS:
        raise EvaluationError(f"unknown attack {name!r}: expected one of {', '.join(ATTACKS)} "
                              "(iterative ones take a -N suffix for the steps, e.g. pgd-50)")
    class_name, norm, default_steps, steps_arg, fixed = ATTACKS[key]
    fastadv_attack(class_name)  # an attack this build lacks fails here, before any work
    if steps is not None and default_steps is None:
        raise EvaluationError(f"attack {key!r} takes no -N steps suffix (got {name!r})")
    if steps is not None and steps < 1:
        raise EvaluationError(f"{name!r}: the number of steps must be >= 1")
    kwargs = dict(fixed)
    canonical = key
    if default_steps is not None:
        steps = default_steps if steps is None else steps
        kwargs[steps_arg] = steps
        canonical = f"{key}-{steps}"
    params = {**kwargs, **({"alpha": "2.5*eps/steps"} if key in _STEP_ALPHA else {})}

    def build(model, eps, n_classes):
        call = {**kwargs, "eps": eps}
        if "n_classes" in call:
            call["n_classes"] = n_classes
        if key in _STEP_ALPHA:
            call["alpha"] = 2.5 * eps / steps
        try:
            return fastadv_attack(class_name)(model, **call)
        except TypeError as e:
            raise EvaluationError(f"fastadv.{class_name} does not accept {sorted(call)}: {e}") from None

    return AttackSpec(canonical, norm, build, params)


def available_attacks():
    """Names whose fastadv implementation exists in this build."""
    out = []
    for key, (class_name, *_rest) in ATTACKS.items():
        try:
            fastadv_attack(class_name)
            out.append(key)
        except AttackUnavailable:
            pass
    return out


def parse_attack_list(values):
    """['pgd,fgsm', 'apgd-ce'] -> ['pgd', 'fgsm', 'apgd-ce'] (repeatable or comma lists)."""
    names = [v.strip() for value in values for v in str(value).split(",")]
    if not names or any(not n for n in names):
        raise EvaluationError(f"empty attack name in {values!r}")
    return names


# -- fingerprints and the state file ------------------------------------------------------

def tensor_digest(h, t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        tensor_digest(h, t)
    return h.hexdigest()


def data_digest(x, y) -> str:
    h = hashlib.sha256()
    tensor_digest(h, x)
    tensor_digest(h, y)
    return h.hexdigest()


def _checksum(fingerprint: str, flags: torch.Tensor, done: torch.Tensor) -> str:
    h = hashlib.sha256(fingerprint.encode())
    tensor_digest(h, flags)
    tensor_digest(h, done)
    return h.hexdigest()


def atomic_save(obj, path):
    """torch.save to path.partial, fsync, then os.replace: path holds the old or the new
    content, never a partial one."""
    path = os.fspath(path)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text, path):
    path = os.fspath(path)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state_file(path, fmt: str, version: int, what: str, error=None):
    """A state file's dict, loaded with weights_only (no code runs) and checked for its
    format tag and version; returns (state, hint). Raises error (StateFileError by
    default) and leaves the file as it is otherwise."""
    error = error or StateFileError
    path = os.fspath(path)
    hint = f"delete {path} to start over, or pass another state file"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, empty file, ...
        raise error(f"{what} {path} is corrupt or truncated and cannot be read "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise error(f"{path} is not a fastadv {what}; {hint}")
    if state.get("version") != version:
        raise error(f"{what} {path} has version {state.get('version')!r}, this fastadv reads {version}; {hint}")
    return state, hint


def load_state(path, description: dict, n_units: int, n_samples: int, n_batches: int):
    """The (flags, done) of a state file written by this same evaluation.

    Raises StateFileError, leaving the file untouched, if it cannot be read, is not
    a fastadv evaluation state, fails its checksum, or has another fingerprint.
    """
    path = os.fspath(path)
    state, hint = read_state_file(path, STATE_FORMAT, STATE_VERSION, "evaluation state file")
    flags, done = state.get("flags"), state.get("done")
    shapes_ok = (isinstance(flags, torch.Tensor) and isinstance(done, torch.Tensor) and flags.dtype == torch.bool
                 and done.dtype == torch.bool and flags.dim() == 2 and done.dim() == 2)
    if not shapes_ok or state.get("checksum") != _checksum(str(state.get("fingerprint")), flags, done):
        raise StateFileError(f"state file {path} is corrupt (its checksum does not match its content); {hint}")
    theirs = state.get("description", {})
    if state["fingerprint"] != description["fingerprint"]:
        diffs = [f"{k}: state file has {theirs.get(k)!r}, this run {v!r}" for k, v in description.items()
                 if k != "fingerprint" and theirs.get(k) != v]
        raise StateFileError(
            f"state file {path} belongs to another evaluation ("
            + ("; ".join(diffs) if diffs else "different fingerprint") + f"); {hint}")
    if tuple(flags.shape) != (n_units, n_samples) or tuple(done.shape) != (n_units, n_batches):
        raise StateFileError(f"state file {path} has flags {tuple(flags.shape)} and done {tuple(done.shape)}, expected "
                             f"{(n_units, n_samples)} and {(n_units, n_batches)}; {hint}")
    return flags, done


# -- distributed helpers ---------------------------------------------------------------------

def dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(model_dev):
    import torch.distributed as dist

    return model_dev if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast_object(obj, src=0):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, desc):
        pass

    def close(self):
        pass


def progress_bar(total, enabled=True, **kwargs):
    """A tqdm bar on stderr when enabled (and tqdm is installed), else a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, **kwargs)
        except ImportError:  # pragma: no cover
            pass
    return _NoBar()


def _unit_seed(seed, k, b):
    digest = hashlib.sha256(f"fastadv-eval/{seed}/{k}/{b}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# -- the evaluation ------------------------------------------------------------------------

def _check_adversarial(spec, adv, x, eps):
    """The attack kept to its threat model: inside [0, 1] and the eps-ball (with float slack)."""
    if adv.shape != x.shape:
        raise EvaluationError(f"attack {spec.name} returned shape {tuple(adv.shape)} for inputs {tuple(x.shape)}")
    d = (adv.float() - x.float()).flatten(1)
    dist = d.abs().amax(1) if spec.norm == "Linf" else d.norm(dim=1)
    worst = dist.max().item() if len(d) else 0.0
    lo, hi = (adv.min().item(), adv.max().item()) if adv.numel() else (0.0, 1.0)
    if not math.isfinite(worst) or worst > eps * (1 + 1e-5) + 1e-6 or lo < -1e-6 or hi > 1 + 1e-6:
        raise EvaluationError(f"attack {spec.name} returned points outside its threat model "
                              f"({spec.norm} distance {worst:.6g} for eps {eps}, values in [{lo:.4g}, {hi:.4g}])")


def _still_correct(model, attack, spec, x, y, eps, device):
    """Per sample: does the model still classify the attack's adversarial example correctly?"""
    x, y = x.to(device), y.to(device)
    adv = attack(x, y)
    _check_adversarial(spec, adv, x, eps)
    with torch.no_grad():
        return (model(adv).argmax(1) == y).cpu()


def evaluate(model, x, y, attacks, *, eps, batch_size=128, state_path=None, seed=0, progress=False, log=None):
    """Robust accuracy of model on (x, y) under the cascade of attacks; returns a report dict.

    model: classifier on inputs in [0, 1] returning logits; it is evaluated in eval
    mode (restored after) on its own device. x, y: the whole dataset (CPU tensors
    are fine; batches move to the model's device). attacks: names (see ATTACKS) or
    AttackSpec objects. eps: the budget in each attack's norm. state_path: the
    resumable state file (created, resumed, or refused; see the module docs).
    Under torch.distributed every rank passes the same arguments and gets the same
    report; only rank 0 writes the state file.
    """
    specs = [attack_spec(a) for a in attacks]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise EvaluationError(f"attack list has duplicates: {names}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise EvaluationError(f"eps must be a finite number >= 0, got {eps!r}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise EvaluationError("x must be a float tensor [N, ...] of images in [0, 1]")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != (len(x),):
        raise EvaluationError(f"y must be a long tensor of shape [{len(x)}]")
    if len(y) == 0:
        raise EvaluationError("the dataset is empty")
    if x.min().item() < 0 or x.max().item() > 1:
        raise EvaluationError(f"images must lie in [0, 1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
    from fastadv.train import attack_view

    model = attack_view(model)  # a DDP-wrapped model is attacked through its module
    rank, world = dist_info()
    device = model_device(model, x.device)
    n, n_units = len(y), len(specs) + 1
    n_batches = math.ceil(n / batch_size)
    log = log or (lambda msg: None)

    with model_guard(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.no_grad():
            probe = model(x[:1].to(device))
        if probe.dim() != 2:
            raise EvaluationError(f"the model must return logits [N, C], got shape {tuple(probe.shape)}")
        n_classes = probe.shape[1]
        lo, hi = y.min().item(), y.max().item()
        if lo < 0 or hi >= n_classes:
            raise EvaluationError(f"labels must lie in [0, {n_classes - 1}] for a model with {n_classes} classes, "
                                  f"got labels in [{lo}, {hi}]")
        description = {
            "attacks": names, "eps": float(eps), "batch_size": int(batch_size), "seed": int(seed), "n": int(n),
            "model_sha256": model_digest(model), "data_sha256": data_digest(x, y),
            "params": [json.dumps(s.params, sort_keys=True, default=str) for s in specs],
        }
        description["fingerprint"] = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
        fingerprint = description["fingerprint"]

        loaded = None
        if rank == 0 and state_path is not None and os.path.exists(state_path):
            try:
                loaded = load_state(state_path, description, n_units, n, n_batches)
            except StateFileError as e:
                loaded = e
        if world > 1:
            loaded = _broadcast_object(loaded)
        if isinstance(loaded, StateFileError):
            raise loaded
        resumed = loaded is not None
        if resumed:
            flags, done = loaded
            log(f"resuming from {state_path}: {int(done.sum())}/{done.numel()} units done")
        else:
            flags = torch.zeros(n_units, n, dtype=torch.bool)
            done = torch.zeros(n_units, n_batches, dtype=torch.bool)

        def save():
            if rank == 0 and state_path is not None:
                atomic_save({"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint,
                             "description": description, "flags": flags, "done": done,
                             "checksum": _checksum(fingerprint, flags, done)}, state_path)

        if not resumed:
            save()
        seconds = [0.0] * n_units
        total_rounds = sum(math.ceil(int((~done[k]).sum()) / world) for k in range(n_units))
        bar = progress_bar(total_rounds, enabled=progress and rank == 0, desc="eval", unit="batch")
        for k in range(n_units):
            spec = specs[k - 1] if k else None
            attack = None
            remaining = [b for b in range(n_batches) if not done[k, b]]
            bar.set_description("clean" if k == 0 else spec.name)
            for r0 in range(0, len(remaining), world):
                mine = remaining[r0 + rank] if r0 + rank < len(remaining) else None
                t0 = time.perf_counter()
                result = None
                if mine is not None:
                    rows = slice(mine * batch_size, min((mine + 1) * batch_size, n))
                    if k == 0:
                        with torch.no_grad():
                            result = (model(x[rows].to(device)).argmax(1) == y[rows].to(device)).cpu()
                    else:
                        result = flags[k - 1, rows].clone()
                        if result.any():
                            if attack is None:
                                attack = spec.build(model, eps, n_classes)
                            torch.manual_seed(_unit_seed(seed, k, mine))
                            result[result.clone()] = _still_correct(model, attack, spec, x[rows][result], y[rows][result],
                                                                    eps, device)
                seconds[k] += time.perf_counter() - t0
                batch_ids = [mine]
                results = [result]
                if world > 1:
                    batch_ids, results = _gather_round(mine, result, batch_size, device)
                for b, res in zip(batch_ids, results):
                    if b is None:
                        continue
                    flags[k, b * batch_size:b * batch_size + len(res)] = res
                    done[k, b] = True
                save()
                bar.update(1)
        bar.close()

    counts = flags.sum(1).tolist()
    report = {
        "n": n, "eps": float(eps), "batch_size": batch_size, "seed": seed, "world_size": world,
        "n_classes": n_classes, "fingerprint": fingerprint, "resumed": resumed,
        "clean": {"correct": counts[0], "accuracy": counts[0] / n, "seconds": seconds[0]},
        "attacks": [
            {"name": s.name, "norm": s.norm, "params": s.params, "robust": counts[k + 1],
             "robust_accuracy": counts[k + 1] / n, "seconds": seconds[k + 1]}
            for k, s in enumerate(specs)
        ],
        "robust": counts[-1], "robust_accuracy": counts[-1] / n,
    }
    if world > 1:  # seconds are per process; report the slowest rank
        t = torch.tensor(seconds, dtype=torch.float64, device=_comm_device(device))
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        report["clean"]["seconds"] = t[0].item()
        for k, a in enumerate(report["attacks"]):
            a["seconds"] = t[k + 1].item()
    report["robust_flags"] = flags[-1]
    return report


def _gather_round(mine, result, batch_size, device):
    """All ranks' (batch index, flags) of one round."""
    import torch.distributed as dist

    comm = _comm_device(device)
    buf = torch.full((batch_size + 2,), -1, dtype=torch.int64, device=comm)
    if mine is not None:
        buf[0], buf[1] = mine, len(result)
        buf[2:2 + len(result)] = result.to(comm, torch.int64)
    bufs = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(bufs, buf)
    ids, results = [], []
    for t in bufs:
        t = t.cpu()
        b, m = int(t[0]), int(t[1])
        ids.append(None if b < 0 else b)
        results.append(None if b < 0 else t[2:2 + m].bool())
    return ids, results


def to_json(report) -> str:
    out = {k: v for k, v in report.items() if k != "robust_flags"}
    return json.dumps(out, indent=2, default=str)


def to_markdown(report, title="Robust accuracy") -> str:
    n = report["n"]
    lines = [f"### {title}", "",
             f"{n} samples, eps {report['eps']:g}, batch size {report['batch_size']}, world size {report['world_size']}"
             + (" (resumed)" if report.get("resumed") else ""), "",
             "| stage | norm | still correct | accuracy | seconds |", "|---|---|---:|---:|---:|",
             f"| clean | - | {report['clean']['correct']}/{n} | {100 * report['clean']['accuracy']:.2f}% | "
             f"{report['clean']['seconds']:.1f} |"]
    for a in report["attacks"]:
        lines.append(f"| + {a['name']} | {a['norm']} | {a['robust']}/{n} | {100 * a['robust_accuracy']:.2f}% | {a['seconds']:.1f} |")
    lines += ["", f"**Robust accuracy: {100 * report['robust_accuracy']:.2f}%** ({report['robust']}/{n})"]
    return "\n".join(lines)
