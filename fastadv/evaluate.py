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
steps (``pgd-50``, ``apgd-ce-100``, ``square-1000`` queries). The cascade needs only
the robust flags, so on the CPU APGD, APGD-T and AutoAttack run with early_stop (a
point leaves an APGD run once fooled: the same flags, fewer gradient evaluations; see
fastadv.AutoAttack's early_stop); it is not part of an attack's params, since the
flags, and so the evaluation, are those of the run without it. On CUDA it stays off:
there a point's logits changed with the batch it was in (measured on an H200, see
benchmarks/results/batch_invariance_h200.md), so dropping points could move the others. Names resolve to the
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
import types
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from fastadv.data import DataError, as_source, check_batch, split_data_args
from fastadv.engine import model_device, model_guard
from fastadv.hints import Data, Model, PathLike
from fastadv.runstate import (  # noqa: F401  (atomic_*, data_digest, progress_bar: imported from here by callers)
    StateFileError, atomic_save, atomic_write_text, attack_view, broadcast_object, comm_device, data_digest,
    description_fingerprint, dist_info,
    model_digest, progress_bar, read_state_file, tensor_digest)

STATE_FORMAT = "fastadv-eval-state"
STATE_VERSION = 1


class EvaluationError(ValueError):
    """Bad input to an evaluation: unknown attack, labels outside the model's classes, ..."""


class AttackUnavailable(EvaluationError):
    """A known attack name whose fastadv implementation is not in this build."""


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
# Attacks whose flags early_stop leaves unchanged (a point is robust when no APGD iterate fooled
# it); PGD's flag is its final iterate's, which early stopping would change, so PGD is not here.
_FLAGS_ONLY_EARLY_STOP = {"apgd-ce", "apgd-dlr", "apgd-t", "autoattack"}


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
        if key in _FLAGS_ONLY_EARLY_STOP and model_device(model, torch.device("cpu")).type == "cpu":
            call["early_stop"] = True
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


# -- the state file ---------------------------------------------------------------------

def _checksum(fingerprint: str, flags: torch.Tensor, done: torch.Tensor) -> str:
    h = hashlib.sha256(fingerprint.encode())
    tensor_digest(h, flags)
    tensor_digest(h, done)
    return h.hexdigest()


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


def evaluate(model: Model, data: Data, *args: Union[torch.Tensor, Sequence[Union[str, AttackSpec]]], eps: float,
             batch_size: Optional[int] = None, state_path: Optional[PathLike] = None, seed: int = 0,
             progress: bool = False, log: Optional[Callable[[str], object]] = None) -> dict:
    """Robust accuracy of model on data under the cascade of attacks; returns a report dict.

    ``evaluate(model, data, attacks, eps=...)``, data a DataLoader, a map-style Dataset
    or an (images, labels) pair (see fastadv.data); today's ``evaluate(model, x, y,
    attacks, eps=...)`` works as well. model: classifier on inputs in [0, 1] returning
    logits; it is evaluated in eval mode (restored after) on its own device; batches
    move there. attacks: names (see ATTACKS) or AttackSpec objects. eps: the budget in
    each attack's norm. batch_size: the work unit (default: a DataLoader's batch size,
    else 128); the same batch size gives the same numbers for any form of the same
    data. state_path: the resumable state file (created, resumed, or refused; see the
    module docs). Under torch.distributed every rank passes the same arguments, reads
    only the batches dealt to it and gets the same report; only rank 0 writes the
    state file. A streamed batch with images outside [0, 1] or labels outside the
    model's classes raises EvaluationError naming the batch; under torch.distributed
    a rank whose batch fails stops every rank in the same round (the others raise
    EvaluationError naming that rank and batch) instead of leaving them waiting.
    """
    data, args = split_data_args(data, args, "evaluate")
    if len(args) != 1:
        raise TypeError("evaluate(model, data, attacks, *, eps, ...) takes the attack list after the data")
    specs = [attack_spec(a) for a in args[0]]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise EvaluationError(f"attack list has duplicates: {names}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise EvaluationError(f"eps must be a finite number >= 0, got {eps!r}")
    try:
        source = as_source(data, "evaluate's data")
    except DataError as e:
        raise EvaluationError(str(e)) from None
    batch_size = batch_size or source.batch_size or 128
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if not source.streamed:
        _check_tensors(source.x, source.y)
    n, n_units = len(source), len(specs) + 1
    if n == 0:
        raise EvaluationError("the dataset is empty")
    model = attack_view(model)  # a DDP-wrapped model is attacked through its module
    rank, world = dist_info()
    device = model_device(model, source.x.device if not source.streamed else torch.device("cpu"))
    n_batches = math.ceil(n / batch_size)
    log = log or (lambda msg: None)

    def read(index_lists, n_classes, k):
        """This rank's batches of unit k, checked (a streamed batch is validated as it arrives)."""
        for idx, (xb, yb) in zip(index_lists, source.batches(index_lists)):
            if source.streamed:
                where = f"batch of samples {int(idx[0])}..{int(idx[-1])} ({'clean pass' if k == 0 else specs[k - 1].name})"
                check_batch(xb, yb, n_classes, where, EvaluationError)
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True).long()

    with model_guard(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        first_x, first_y = next(iter(source.batches([[0]])))
        if source.streamed:
            check_batch(first_x, first_y, None, "the first sample", EvaluationError)
        with torch.no_grad():
            probe = model(first_x.to(device))
        if probe.dim() != 2:
            raise EvaluationError(f"the model must return logits [N, C], got shape {tuple(probe.shape)}")
        n_classes = probe.shape[1]
        if not source.streamed:
            lo, hi = source.y.min().item(), source.y.max().item()
            if lo < 0 or hi >= n_classes:
                raise EvaluationError(f"labels must lie in [0, {n_classes - 1}] for a model with {n_classes} classes, "
                                      f"got labels in [{lo}, {hi}]")
        # rank 0 identifies the data (a dataset without its own fingerprint is read whole,
        # and only when there is a state file to check); the other ranks read only their shards
        data_id = None
        if rank == 0:
            try:
                data_id = source.identity(read=state_path is not None)
            except Exception as e:  # a data set read whole can fail on rank 0 alone: every rank raises it
                if world == 1:
                    raise
                data_id = e
        if world > 1:
            data_id = broadcast_object(data_id)
            if isinstance(data_id, Exception):
                raise data_id
        description = {
            "attacks": names, "eps": float(eps), "batch_size": int(batch_size), "seed": int(seed), "n": int(n),
            "model_sha256": model_digest(model), "data_sha256": data_id,
            "params": [json.dumps(s.params, sort_keys=True, default=str) for s in specs],
        }
        description["fingerprint"] = description_fingerprint(description)
        fingerprint = description["fingerprint"]

        loaded = None
        if rank == 0 and state_path is not None and os.path.exists(state_path):
            try:
                loaded = load_state(state_path, description, n_units, n, n_batches)
            except StateFileError as e:
                loaded = e
        if world > 1:
            loaded = broadcast_object(loaded)
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
        t_start, images = time.perf_counter(), 0
        for k in range(n_units):
            spec = specs[k - 1] if k else None
            attack = None
            remaining = [b for b in range(n_batches) if not done[k, b]]
            bar.set_description("clean" if k == 0 else spec.name)
            mine_all = remaining[rank::world]  # the units this rank works on, one per round

            def todo(b):  # the samples of unit b this attack works on: all (clean pass) or the still robust
                rows = torch.arange(b * batch_size, min((b + 1) * batch_size, n))
                return rows if k == 0 else rows[flags[k - 1, rows]]

            work = [(b, todo(b)) for b in mine_all]
            batches = read([rows for _, rows in work if len(rows)], n_classes, k)
            work = iter(work)
            t0 = time.perf_counter()

            def unit(mine):
                """The per-sample flags of this rank's unit (batch mine) of attack k."""
                nonlocal attack, images
                b, rows = next(work)
                lo = b * batch_size
                if k == 0:
                    xb, yb = next(batches)
                    with torch.no_grad():
                        result = (model(xb).argmax(1) == yb).cpu()
                else:
                    result = flags[k - 1, lo:min(lo + batch_size, n)].clone()
                    if len(rows):
                        xb, yb = next(batches)
                        if attack is None:
                            attack = spec.build(model, eps, n_classes)
                        torch.manual_seed(_unit_seed(seed, k, mine))
                        result[result.clone()] = _still_correct(model, attack, spec, xb, yb, eps, device)
                images += len(rows)
                return result

            for r0 in range(0, len(remaining), world):
                mine = remaining[r0 + rank] if r0 + rank < len(remaining) else None
                if world == 1:
                    batch_ids, results = [mine], [unit(mine)]
                else:  # a rank that fails (a bad batch, say) tells the others, so that every rank stops
                    failure, result = None, None
                    try:
                        result = None if mine is None else unit(mine)
                    except Exception as e:
                        failure = e
                    batch_ids, results, failed = _gather_round(mine, result, batch_size, device, failure is not None)
                    if failed:
                        if failure is not None:
                            raise failure
                        r = failed[0]
                        raise EvaluationError(f"rank {r} failed on batch {batch_ids[r]} "
                                              f"({'clean pass' if k == 0 else spec.name}), so every rank stops; "
                                              f"rank {r}'s error says why")
                for b, res in zip(batch_ids, results):
                    if b is None:
                        continue
                    flags[k, b * batch_size:b * batch_size + len(res)] = res
                    done[k, b] = True
                save()
                bar.update(1)
                bar.set_postfix_str(f"{images / max(time.perf_counter() - t_start, 1e-9):.0f} img/s")
            seconds[k] += time.perf_counter() - t0
        bar.close()
        wall = time.perf_counter() - t_start

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
        "seconds": wall, "images_per_second": n / wall if wall > 0 else None,
    }
    if world > 1:  # seconds are per process; report the slowest rank
        t = torch.tensor([*seconds, wall], dtype=torch.float64, device=comm_device(device))
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        report["clean"]["seconds"] = t[0].item()
        for k, a in enumerate(report["attacks"]):
            a["seconds"] = t[k + 1].item()
        report["seconds"] = t[-1].item()
        report["images_per_second"] = n / report["seconds"] if report["seconds"] > 0 else None
    report["robust_flags"] = flags[-1]
    return report


def _check_tensors(x, y):
    """The whole (images, labels) pair at once, before any work."""
    if not x.is_floating_point() or x.dim() < 2:
        raise EvaluationError("x must be a float tensor [N, ...] of images in [0, 1]")
    if y.dtype != torch.long or y.shape != (len(x),):
        raise EvaluationError(f"y must be a long tensor of shape [{len(x)}]")
    if len(y) == 0:
        raise EvaluationError("the dataset is empty")
    if x.min().item() < 0 or x.max().item() > 1:
        raise EvaluationError(f"images must lie in [0, 1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]")


def _gather_round(mine, result, batch_size, device, failed=False):
    """All ranks' batch indices and flags of one round, and the ranks that failed
    (failed: this rank's unit raised; it sends its batch index and no flags)."""
    import torch.distributed as dist

    comm = comm_device(device)
    buf = torch.full((batch_size + 2,), -1, dtype=torch.int64, device=comm)
    if mine is not None:
        buf[0] = mine
        if failed:
            buf[1] = -2
        else:
            buf[1] = len(result)
            buf[2:2 + len(result)] = result.to(comm, torch.int64)
    bufs = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(bufs, buf)
    ids, results, failures = [], [], []
    for r, t in enumerate(bufs):
        t = t.cpu()
        b, m = int(t[0]), int(t[1])
        ids.append(None if b < 0 else b)
        results.append(None if b < 0 or m < 0 else t[2:2 + m].bool())
        if m == -2:
            failures.append(r)
    return ids, results, failures


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


class _CallableModule(types.ModuleType):
    """``fastadv.evaluate`` is this module (``from fastadv.evaluate import ...`` keeps
    working) and also the function: ``fastadv.evaluate(model, data, attacks, eps=...)``."""

    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
