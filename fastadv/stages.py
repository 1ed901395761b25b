"""The stages of an evaluation: how each attack of the cascade runs on the points still robust.

A stage receives the points every earlier stage left robust, as units: consecutive chunks of
batch_size of them (the original AutoAttack chunks its robust points the same way), each
with its own seed. It returns, per point, whether the point is still robust after it.

- Iterative attacks with an exit run on batch_size fixed-shape slots (fastadv.slots): PGD
  (fastadv.slots.Iterations), APGD and APGD-T (fastadv.attacks.apgd.APGDSlots), and the
  APGD stages of AutoAttack. A point is fooled when any iterate of the attack fooled it (the
  rule of APGD and AutoAttack; PGD's last iterate could only report a higher robust
  accuracy). With exits, a point leaves its slot once it is fooled, and a PGD point once its
  iterates cycle; every model call keeps the shape [batch_size, ...], so the flags are those
  of the run without exits, bit for bit.
- The other attacks run unit by unit (their calls have the unit's shape); a point is fooled
  when the model misclassifies the adversarial example the attack returns.

AutoAttack is expanded into its sub-attacks, each a stage of its own, run as the original
runs them: the same chunks of robust points, every chunk seeded with the same seed, the
original's arithmetic. Its per-sample flags are the original's at the same chunk size.
"""
import dataclasses
import hashlib
from typing import Callable

import torch

from fastadv import ops, slots
from fastadv.engine import CYCLE_MIN_STEPS, CrossEntropyGradient


@dataclasses.dataclass
class Stage:
    """One stage: name (e.g. 'pgd-100', 'autoattack/apgd-t'), the attack it belongs to (the
    name in the cascade), its norm, and how it runs:

    - program(forward, size, n_classes, exits) -> a fastadv.slots program (slot stages), or
    - attack(model, n_classes) -> a callable (x, y) -> adversarial images (unit stages).

    seed(seed, index, unit): the seed of one unit of this stage.
    """

    name: str
    attack_name: str
    norm: str
    program: Callable = None
    attack: Callable = None
    seed: Callable = None

    @property
    def on_slots(self):
        return self.program is not None


def unit_seed(seed, stage_index, unit):
    """An evaluation's seed for (stage, unit): independent streams, the same in every process."""
    digest = hashlib.sha256(f"fastadv-eval/{seed}/{stage_index}/{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def pgd_stage(name, eps, steps, alpha):
    """PGD (Linf, random start) on slots: the flags of every iterate, the start and the last included."""

    def update(adv, g, out=None, x=None, **_):
        return ops.linf_step(adv, x, g, alpha=alpha, eps=eps, out=out, consume_grad=True)

    def prepare(unit):
        from fastadv.attacks.pgd import uniform_start

        x = unit.data["x"]
        torch.manual_seed(unit.seed)  # the global RNG, as PGD draws (the evaluation forks it)
        unit.data["adv"] = uniform_start(x, eps)

    def program(forward, size, n_classes, exits):
        # the cycle exit from CYCLE_MIN_STEPS steps: shorter runs settle too rarely to pay for the checks
        return slots.Iterations(
            size=size, steps=steps, update=update, result="flags", cycle_exit=exits and steps >= CYCLE_MIN_STEPS,
            fooled_exit=exits,
            prepare=prepare,
            make_grad=lambda bufs: CrossEntropyGradient(forward, bufs["y"], scale=size),
        )

    return Stage(name, name, "Linf", program=program, seed=unit_seed)


def apgd_stage(name, attack_name, *, norm, eps, steps, loss, n_restarts=1, n_target_classes=None,
               arithmetic="torchattacks", seed=None):
    """APGD or APGD-T on slots (APGDSlots). seed: a fixed seed for every unit (AutoAttack's
    way), else the evaluation's per-unit seed."""
    from fastadv.attacks.apgd import APGDSlots

    def program(forward, size, n_classes, exits):
        targets = None
        if loss == "dlr-targeted":
            targets = n_classes - 1 if n_target_classes is None else n_target_classes
        return APGDSlots(forward, size=size, norm=norm, n_iter=steps, n_restarts=n_restarts, loss=loss,
                         n_target_classes=targets, arithmetic=arithmetic, fooled_exit=exits, eps=eps)

    return Stage(name, attack_name, norm, program=program,
                 seed=unit_seed if seed is None else (lambda *_: seed))


def unit_stage(name, attack_name, norm, build, seed=None):
    """An attack run unit by unit: build(model, n_classes) -> callable (x, y) -> adversarial images."""
    return Stage(name, attack_name, norm, attack=build, seed=unit_seed if seed is None else (lambda *_: seed))


def autoattack_stages(name, *, norm, eps, version, seed, steps=None, n_queries=None):
    """AutoAttack's sub-attacks as stages, with the original's settings (steps and n_queries
    override its iteration and query counts) and seeding: every unit seeded with seed."""
    from fastadv.attacks.autoattack import VERSION_ATTACKS, default_settings

    if version not in VERSION_ATTACKS:
        raise ValueError(f"evaluate runs AutoAttack's 'standard', 'plus' or 'rand' version, got {version!r}")
    apgd, apgd_t, _, _ = default_settings(version, 10, steps, n_queries)  # the target count follows the model
    out = []
    for sub in VERSION_ATTACKS[version]:
        full = f"{name}/{sub}"
        s = apgd_t if sub == "apgd-t" else apgd
        if sub.startswith("apgd") and s.eot_iter == 1:
            loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}[sub]
            out.append(apgd_stage(full, name, norm=norm, eps=eps, steps=s.n_iter, n_restarts=s.n_restarts, loss=loss,
                                  arithmetic="original", seed=seed))
        else:  # FAB, Square, and the 'rand' version's EOT over a randomized model: unit by unit
            out.append(unit_stage(full, name, norm, _autoattack_unit(sub, norm, eps, version, seed, steps, n_queries),
                                  seed=seed))
    return out


def _autoattack_unit(sub, norm, eps, version, seed, steps, n_queries):
    """build(model, n_classes) for a sub-attack of AutoAttack run on one unit, as AutoAttack runs it."""

    def build(model, n_classes):
        from fastadv.attacks.autoattack import AutoAttack

        atk = AutoAttack(model, norm=norm, eps=eps, version=version, n_classes=n_classes, seed=seed, steps=steps,
                         n_queries=n_queries)

        def run(x, y):
            return atk._run_attack(sub, x, y, atk.get_logits)

        return run

    return build
