"""Robust-accuracy evaluation over a dataset: cascade, fixed-shape slots, sharding, resumable state.

``evaluate(model, x, y, ["pgd-50", "apgd-ce", ...], eps=...)`` runs the attacks as a
cascade: the clean pass first, then each attack only on the points that are still
robust after the ones before it. A point is fooled by an iterative attack when any of its
iterates fooled the model (APGD's and AutoAttack's rule), by the others when the model
misclassifies the adversarial example they return (fastadv.stages).

Each stage takes the points the stage before left robust, in order, as units of
batch_size (the chunks the original AutoAttack makes), every unit seeded from (seed,
stage, unit). PGD, APGD, APGD-T and AutoAttack's APGD stages run on batch_size fixed-shape
slots (fastadv.slots; fewer when the stage has fewer points): a point leaves its slot once it
is fooled, or, for PGD, once its iterates cycle, and the next point takes the slot; every
model call of a stage has the same shape. The flags are those of the same slots without exits (``exits=False``,
``fastadv eval --no-exits``), bit for bit, on any device where a sample's numbers depend on
the batch's shape and not on the other samples (PyTorch's CPU kernels; CUDA: see
``benchmarks/gpu.sh``). A point's result depends only on its unit, which gives:

- sharding: under torch.distributed the units of each stage are dealt out round-robin to
  the ranks, each rank streams its own through its slots, and the flags are all-gathered
  after each round of units, so every rank holds the same state and the report equals a
  single process's at any world size;
- resuming: the state (per sample, its robust flag after the clean pass and after each
  stage and whether that stage is done with it, and a fingerprint of model weights, data,
  attack list, eps, batch size and seed) is written atomically (temporary file +
  os.replace) as units finish. Rerun with the same arguments, the evaluation skips the
  finished units and ends with exactly the numbers of an uninterrupted run. A state file
  of another evaluation, or one that is corrupt or truncated, raises StateFileError and is
  left as it is.

Attack names: see ``ATTACKS``; iterative attacks take a ``-N`` suffix for their
steps (``pgd-50``, ``apgd-ce-100``, ``square-1000`` queries). ``autoattack`` runs the
original's standard version as four stages (its APGD-CE, APGD-T, FAB-T and Square, every
chunk seeded with 0): its per-sample flags are the original's at the same chunk size.
Names resolve to the fastadv attack classes that exist in this build; one that does not
exist yet is an AttackUnavailable error, raised before any work.
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

from fastadv import slots
from fastadv.data import DataError, as_source, check_batch, split_data_args
from fastadv.engine import model_device, model_guard
from fastadv.hints import Data, Model, PathLike
from fastadv.runstate import (  # noqa: F401  (atomic_*, data_digest, progress_bar: imported from here by callers)
    StateFileError, atomic_save, atomic_write_text, attack_view, broadcast_object, comm_device, data_digest,
    description_fingerprint, dist_info,
    model_digest, progress_bar, read_state_file, tensor_digest)

STATE_FORMAT = "fastadv-eval-state"
STATE_VERSION = 2  # 2: flags and done per sample and stage (1: done per dataset batch)


class EvaluationError(ValueError):
    """Bad input to an evaluation: unknown attack, labels outside the model's classes, ..."""


class AttackUnavailable(EvaluationError):
    """A known attack name whose fastadv implementation is not in this build."""


# -- attacks by name -----------------------------------------------------------------------

@dataclass(frozen=True)
class AttackSpec:
    """An attack of the cascade: build(model, eps, n_classes) returns a callable
    (images, labels) -> adversarial images. params enter the fingerprint. key and steps name
    one of ATTACKS (a spec made by attack_spec); a spec of your own runs unit by unit."""

    name: str
    norm: str
    build: Callable
    params: dict = field(default_factory=dict)
    key: str = None
    steps: int = None


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
    "apgd-ce": ("APGD", "Linf", 100, "steps", {"norm": "Linf", "loss": "ce", "n_restarts": 1}),
    "apgd-dlr": ("APGD", "Linf", 100, "steps", {"norm": "Linf", "loss": "dlr", "n_restarts": 1}),
    "apgd-t": ("APGDT", "Linf", 100, "steps", {"norm": "Linf", "n_restarts": 1, "n_classes": None}),
    "fab": ("FAB", "Linf", 100, "steps", {"norm": "Linf", "n_restarts": 1, "multi_targeted": True, "n_classes": None, "seed": 0}),
    "square": ("Square", "Linf", 5000, "n_queries", {"norm": "Linf", "n_restarts": 1, "seed": 0}),
    "autoattack": ("AutoAttack", "Linf", None, None, {"norm": "Linf", "version": "standard", "n_classes": None, "seed": 0}),
    "autoattack-l2": ("AutoAttack", "L2", None, None, {"norm": "L2", "version": "standard", "n_classes": None, "seed": 0}),
}
_STEP_ALPHA = {"pgd", "pgdl2", "mifgsm"}  # alpha = 2.5 * eps / steps (Madry et al.'s rule)
FOOLED_RULE = ("any iterate: PGD, APGD, APGD-T and AutoAttack's APGD stages flag a point fooled when any of "
               "their iterates fooled it; the other attacks when the model misclassifies their result")


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

    return AttackSpec(canonical, norm, build, params, key=key, steps=steps)


def spec_stages(spec: AttackSpec, eps) -> list:
    """The stages (fastadv.stages) an attack of the cascade runs as."""
    from fastadv import stages

    if spec.key == "pgd":
        return [stages.pgd_stage(spec.name, eps, spec.steps, 2.5 * eps / spec.steps)]
    if spec.key in ("apgd-ce", "apgd-dlr", "apgd-t"):
        loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}[spec.key]
        return [stages.apgd_stage(spec.name, spec.name, norm=spec.norm, eps=eps, steps=spec.steps, loss=loss)]
    if spec.key in ("autoattack", "autoattack-l2"):
        p = spec.params  # steps and n_queries: the original's unless a spec overrides them
        return stages.autoattack_stages(spec.name, norm=spec.norm, eps=eps, version=p["version"], seed=p["seed"],
                                        steps=p.get("steps"), n_queries=p.get("n_queries"))
    return [stages.unit_stage(spec.name, spec.name, spec.norm, lambda model, n_classes: spec.build(model, eps, n_classes))]


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


def load_state(path, description: dict, n_stages: int, n_samples: int):
    """The (flags, done) of a state file written by this same evaluation: [n_stages, n_samples]
    bool each (done: the stage has finished with the sample).

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
    if tuple(flags.shape) != (n_stages, n_samples) or tuple(done.shape) != (n_stages, n_samples):
        raise StateFileError(f"state file {path} has flags {tuple(flags.shape)} and done {tuple(done.shape)}, expected "
                             f"{(n_stages, n_samples)} each; {hint}")
    return flags, done


# -- the evaluation ------------------------------------------------------------------------

# Under torch.distributed, each rank runs this many of its units through its slots between two
# exchanges of flags (a round); one process runs a whole stage as one stream.
ROUND_UNITS = 8


def _check_adversarial(name, norm, adv, x, eps):
    """The attack kept to its threat model: inside [0, 1] and the eps-ball (with float slack)."""
    if adv.shape != x.shape:
        raise EvaluationError(f"attack {name} returned shape {tuple(adv.shape)} for inputs {tuple(x.shape)}")
    d = (adv.float() - x.float()).flatten(1)
    dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    worst = dist.max().item() if len(d) else 0.0
    lo, hi = (adv.min().item(), adv.max().item()) if adv.numel() else (0.0, 1.0)
    if not math.isfinite(worst) or worst > eps * (1 + 1e-5) + 1e-6 or lo < -1e-6 or hi > 1 + 1e-6:
        raise EvaluationError(f"attack {name} returned points outside its threat model "
                              f"({norm} distance {worst:.6g} for eps {eps}, values in [{lo:.4g}, {hi:.4g}])")


def evaluate(model: Model, data: Data, *args: Union[torch.Tensor, Sequence[Union[str, AttackSpec]]], eps: float,
             batch_size: Optional[int] = None, state_path: Optional[PathLike] = None, seed: int = 0,
             progress: bool = False, log: Optional[Callable[[str], object]] = None, exits: bool = True) -> dict:
    """Robust accuracy of model on data under the cascade of attacks; returns a report dict.

    ``evaluate(model, data, attacks, eps=...)``, data a DataLoader, a map-style Dataset
    or an (images, labels) pair (see fastadv.data); ``evaluate(model, x, y, attacks,
    eps=...)`` works as well. model: classifier on inputs in [0, 1] returning logits; it
    is evaluated in eval mode (restored after) on its own device; batches move there.
    attacks: names (see ATTACKS) or AttackSpec objects. eps: the budget in each attack's
    norm. batch_size: the unit, and the slot count of the slot stages (at most a stage's points; default: a
    DataLoader's batch size, else 128); the same batch size gives the same numbers for any
    form of the same data. exits: let points leave their slots once fooled (or, in PGD,
    once their iterates cycle); False runs the same slots to the end, with the same flags.
    state_path: the resumable state file (created, resumed, or refused; see the module
    docs). Under torch.distributed every rank passes the same arguments, reads only the
    units dealt to it and gets the same report; only rank 0 writes the state file. A
    streamed batch with images outside [0, 1], labels outside the model's classes or the
    wrong shape raises EvaluationError naming the batch; under torch.distributed a rank
    whose unit fails stops every rank at the end of the round (the others raise
    EvaluationError naming that rank and batch) instead of leaving them waiting.

    The report: counts and accuracies per attack, the per-sample robust flags, and for each
    stage its time, model calls (forwards and gradient evaluations, padding slots
    counted), gradient evaluations per attacked point and, for the slot stages, the slots'
    occupancy (useful slot-steps over all, while points waited to be admitted and in the
    tail after the last one was admitted).
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
    if not isinstance(exits, bool):
        raise EvaluationError(f"exits must be True or False, got {exits!r}")
    try:
        source = as_source(data, "evaluate's data")
    except DataError as e:
        raise EvaluationError(str(e)) from None
    batch_size = batch_size if batch_size is not None else (source.batch_size or 128)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not source.streamed:
        _check_tensors(source.x, source.y)
    n = len(source)
    if n == 0:
        raise EvaluationError("the dataset is empty")
    stages = [st for spec in specs for st in spec_stages(spec, eps)]
    model = attack_view(model)  # a DDP-wrapped model is attacked through its module
    rank, world = dist_info()
    device = model_device(model, source.x.device if not source.streamed else torch.device("cpu"))
    log = log or (lambda msg: None)
    run = _Run(model, source, stages, eps=eps, batch_size=batch_size, seed=seed, exits=exits, device=device,
               rank=rank, world=world)

    with model_guard(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        run.probe()
        description = run.describe(specs, state_path)
        flags, done, resumed = _open_state(state_path, description, len(stages) + 1, n, rank, world)
        if resumed:
            log(f"resuming from {state_path}: {int(done.all(1).sum())}/{len(stages) + 1} stages done")
        writer = _StateWriter(state_path, description, flags, done, enabled=rank == 0)
        if not resumed:
            writer.save()
        bar = progress_bar(None, enabled=progress and rank == 0, desc="eval", unit="unit")
        t_start = time.perf_counter()
        for k in range(len(stages) + 1):
            bar.set_description("clean" if k == 0 else stages[k - 1].name)
            run.stage(k, flags, done, writer, bar)
        bar.close()
        wall = time.perf_counter() - t_start
    return run.report(specs, flags, wall, description["fingerprint"], resumed)


def _open_state(state_path, description, n_stages, n, rank, world):
    """(flags, done, resumed): a state file of this evaluation, read by rank 0 and shared."""
    loaded = None
    if rank == 0 and state_path is not None and os.path.exists(state_path):
        try:
            loaded = load_state(state_path, description, n_stages, n)
        except StateFileError as e:
            loaded = e
    if world > 1:
        loaded = broadcast_object(loaded)
    if isinstance(loaded, StateFileError):
        raise loaded
    if loaded is not None:
        return loaded[0], loaded[1], True
    return torch.zeros(n_stages, n, dtype=torch.bool), torch.zeros(n_stages, n, dtype=torch.bool), False


class _StateWriter:
    def __init__(self, path, description, flags, done, enabled):
        self.path, self.description, self.flags, self.done = path, description, flags, done
        self.enabled = enabled and path is not None

    def save(self):
        if self.enabled:
            fingerprint = self.description["fingerprint"]
            atomic_save({"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint,
                         "description": self.description, "flags": self.flags, "done": self.done,
                         "checksum": _checksum(fingerprint, self.flags, self.done)}, self.path)


class _Run:
    """One evaluation's stages over one data source: the clean pass, then each stage's units."""

    def __init__(self, model, source, stages, *, eps, batch_size, seed, exits, device, rank, world):
        from fastadv.calls import CallCounter

        self.model, self.source, self.stages = model, source, stages
        self.eps, self.size, self.seed, self.exits = eps, batch_size, seed, exits
        self.device, self.rank, self.world = device, rank, world
        self.counter = CallCounter(model)  # every model call of the attacks, padding slots counted
        self.records = [{"seconds": 0.0, "forwards": 0, "backwards": 0, "attacked": 0, "slots": None}
                        for _ in range(len(stages) + 1)]
        self.n_classes = None

    # -- before the stages -------------------------------------------------------------------

    def probe(self):
        """The model's class count, from one sample; the labels' range for tensor data."""
        source = self.source
        first_x, first_y = next(iter(source.batches([[0]])))
        if source.streamed:
            check_batch(first_x, first_y, None, "the first sample", EvaluationError)
        with torch.no_grad():
            out = self.model(first_x.to(self.device))
        if out.dim() != 2:
            raise EvaluationError(f"the model must return logits [N, C], got shape {tuple(out.shape)}")
        self.n_classes = out.shape[1]
        if not source.streamed:
            lo, hi = source.y.min().item(), source.y.max().item()
            if lo < 0 or hi >= self.n_classes:
                raise EvaluationError(f"labels must lie in [0, {self.n_classes - 1}] for a model with "
                                      f"{self.n_classes} classes, got labels in [{lo}, {hi}]")

    def describe(self, specs, state_path):
        """The evaluation's description and fingerprint (rank 0 identifies the data; a data set
        without its own fingerprint is read whole, and only when there is a state file to check)."""
        data_id = None
        if self.rank == 0:
            try:
                data_id = self.source.identity(read=state_path is not None)
            except Exception as e:  # a data set read whole can fail on rank 0 alone: every rank raises it
                data_id = e if isinstance(e, (DataError, EvaluationError)) else EvaluationError(
                    f"reading the data set to fingerprint it failed: {type(e).__name__}: {e}")
                if self.world == 1:
                    raise data_id from e
        if self.world > 1:
            data_id = broadcast_object(data_id)
            if isinstance(data_id, Exception):
                raise data_id
        description = {
            "attacks": [s.name for s in specs], "eps": float(self.eps), "batch_size": int(self.size),
            "seed": int(self.seed), "n": int(len(self.source)), "model_sha256": model_digest(self.model),
            "data_sha256": data_id, "params": [json.dumps(s.params, sort_keys=True, default=str) for s in specs],
        }
        description["fingerprint"] = description_fingerprint(description)
        return description

    # -- one stage -----------------------------------------------------------------------------

    def stage(self, k, flags, done, writer, bar):
        """Stage k (0: the clean pass) on the points robust after stage k - 1, unit by unit."""
        stream = torch.arange(len(self.source)) if k == 0 else flags[k - 1].nonzero().flatten()
        units = [(u, stream[lo:lo + self.size]) for u, lo in enumerate(range(0, len(stream), self.size))]
        todo = [(u, idx) for u, idx in units if not bool(done[k, idx].all())]
        if not units:
            done[k] = True
            return
        mine = todo[self.rank::self.world]
        rounds = [mine] if self.world == 1 else [mine[i:i + ROUND_UNITS] for i in range(0, len(mine), ROUND_UNITS)]
        n_rounds = max(1, math.ceil(max(len(todo[r::self.world]) for r in range(self.world)) / ROUND_UNITS)) \
            if self.world > 1 else 1
        rec = self.records[k]
        stage = self.stages[k - 1] if k else None
        program = None
        for r in range(n_rounds):
            chunk = rounds[r] if r < len(rounds) else []
            marks = self.counter.mark()
            t0 = time.perf_counter()
            results, failure = [], None

            def finished(unit, robust):
                flags[k, unit.key[1]] = robust
                done[k, unit.key[1]] = True
                results.append((unit.key[1], robust))
                bar.update(1)
                if self.world == 1:
                    writer.save()

            try:
                if k == 0:
                    self._clean(chunk, finished)
                elif stage.on_slots:
                    if program is None:
                        # never more slots than the stage's points (the same count on every rank)
                        program = stage.program(self.counter, min(self.size, len(stream)), self.n_classes, self.exits)
                    stats = slots.run(program, self._units(k, chunk), device=self.device,
                                      on_unit_done=lambda unit: finished(unit, unit.results["robust"].cpu()))
                    rec["slots"] = stats if rec["slots"] is None else rec["slots"].add(stats)
                else:
                    self._unit_by_unit(k, stage, chunk, finished)
            except Exception as e:
                if self.world == 1:
                    raise
                failure = (e, chunk[len(results)][1] if len(results) < len(chunk) else None)
            rec["seconds"] += time.perf_counter() - t0
            rec["forwards"] += self.counter.forwards - marks[0]
            rec["backwards"] += self.counter.backwards - marks[1]
            rec["attacked"] += sum(len(idx) for _, idx in chunk)
            if self.world > 1:
                self._exchange(k, results, failure, flags, done)
                writer.save()
        done[k] = True  # every unit of the stage has been run somewhere
        writer.save()

    def _units(self, k, chunk):
        """The Units of a slot stage, read as the slots ask for them."""
        stage = self.stages[k - 1]
        for (u, idx), (xb, yb) in self._read(k, chunk):
            data = {"x": xb, "y": yb}
            yield slots.Unit(len(idx), data, key=(u, idx), seed=stage.seed(self.seed, k, u))

    def _read(self, k, chunk):
        """(unit, (images, labels)) for each unit of chunk, on the device, checked as they arrive."""
        lists = [idx for _, idx in chunk]
        batches = self.source.batches(lists)
        for u, idx in chunk:
            where = f"batch of samples {int(idx[0])}..{int(idx[-1])} ({'clean pass' if k == 0 else self.stages[k - 1].name})"
            try:
                xb, yb = next(batches)
            except StopIteration:
                raise EvaluationError(f"the data ended early: no data for the {where}") from None
            except (DataError, EvaluationError):
                raise
            except Exception as e:  # a data set that fails to read: name the batch
                raise EvaluationError(f"reading the {where} failed: {type(e).__name__}: {e}") from e
            if self.source.streamed or xb.shape[0] != len(idx):
                check_batch(xb, yb, self.n_classes, where, EvaluationError)
                if xb.shape[0] != len(idx):
                    raise EvaluationError(f"the {where} has {xb.shape[0]} images, expected {len(idx)}")
            yield (u, idx), (xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True).long())

    def _clean(self, chunk, finished):
        for (u, idx), (xb, yb) in self._read(0, chunk):
            with torch.no_grad():
                robust = (self.model(xb).argmax(1) == yb).cpu()
            finished(slots.Unit(len(idx), key=(u, idx)), robust)

    def _unit_by_unit(self, k, stage, chunk, finished):
        attack = stage.attack(self.counter, self.n_classes)
        for (u, idx), (xb, yb) in self._read(k, chunk):
            torch.manual_seed(stage.seed(self.seed, k, u))
            adv = attack(xb, yb)
            _check_adversarial(stage.name, stage.norm, adv, xb, self.eps)
            with torch.no_grad():
                robust = (self.model(adv).argmax(1) == yb).cpu()
            finished(slots.Unit(len(idx), key=(u, idx)), robust)

    def _exchange(self, k, results, failure, flags, done):
        """All ranks' results of a round (and whether one failed), so every rank holds the same state."""
        import torch.distributed as dist

        where = None if failure is None else (int(failure[1][0]), int(failure[1][-1])) if failure[1] is not None else ()
        mine = ([(idx.tolist(), robust.tolist()) for idx, robust in results], where)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine)
        for r, (rows, failed) in enumerate(gathered):
            for idx, robust in rows:
                flags[k, idx] = torch.tensor(robust, dtype=torch.bool)
                done[k, idx] = True
        failed = [r for r, (_, f) in enumerate(gathered) if f is not None]
        if failed:
            if failure is not None:
                raise failure[0]
            r = failed[0]
            what = gathered[r][1]
            batch = f"the batch of samples {what[0]}..{what[1]}" if what else "a batch"
            raise EvaluationError(f"rank {r} failed on {batch} ({'clean pass' if k == 0 else self.stages[k - 1].name}), "
                                  f"so every rank stops; rank {r}'s error says why")

    # -- the report ------------------------------------------------------------------------------

    def report(self, specs, flags, wall, fingerprint, resumed):
        n = len(self.source)
        recs = self.records
        if self.world > 1:  # seconds are per process; report the slowest rank; calls are summed
            import torch.distributed as dist

            t = torch.tensor([r["seconds"] for r in recs] + [wall], dtype=torch.float64,
                             device=comm_device(self.device))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            calls = torch.tensor([[r["forwards"], r["backwards"], r["attacked"]] for r in recs], dtype=torch.int64,
                                 device=comm_device(self.device))
            dist.all_reduce(calls)
            for r, sec, (f, b, a) in zip(recs, t.tolist(), calls.tolist()):
                r["seconds"], r["forwards"], r["backwards"], r["attacked"] = sec, f, b, a
            wall = t[-1].item()
        counts = flags.sum(1).tolist()

        def stage_entry(k):
            st, r = self.stages[k - 1], recs[k]
            entry = {"name": st.name, "robust": counts[k], "attacked": r["attacked"], "seconds": r["seconds"],
                     "forwards": r["forwards"], "backwards": r["backwards"],
                     "gradients_per_sample": r["backwards"] / r["attacked"] if r["attacked"] else 0.0,
                     "slots": r["slots"].as_dict() if r["slots"] is not None else None}
            return entry

        attacks, k = [], 1
        for spec in specs:
            ks = [j for j in range(k, len(self.stages) + 1) if self.stages[j - 1].attack_name == spec.name]
            last = ks[-1]
            entries = [stage_entry(j) for j in ks]
            attacks.append({
                "name": spec.name, "norm": spec.norm, "params": spec.params, "robust": counts[last],
                "robust_accuracy": counts[last] / n, "attacked": entries[0]["attacked"],
                "seconds": sum(e["seconds"] for e in entries),
                "forwards": sum(e["forwards"] for e in entries), "backwards": sum(e["backwards"] for e in entries),
                "gradients_per_sample": entries[0]["gradients_per_sample"] if len(entries) == 1 else None,
                "slots": entries[0]["slots"] if len(entries) == 1 else None,
                **({"stages": entries} if len(entries) > 1 else {}),
            })
            k = last + 1
        report = {
            "n": n, "eps": float(self.eps), "batch_size": self.size, "seed": self.seed, "world_size": self.world,
            "n_classes": self.n_classes, "fingerprint": fingerprint, "resumed": resumed, "exits": self.exits,
            "fooled": FOOLED_RULE,
            "clean": {"correct": counts[0], "accuracy": counts[0] / n, "seconds": recs[0]["seconds"]},
            "attacks": attacks,
            "robust": counts[-1], "robust_accuracy": counts[-1] / n,
            "seconds": wall, "images_per_second": n / wall if wall > 0 else None,
        }
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
