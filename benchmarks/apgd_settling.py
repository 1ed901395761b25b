"""Do APGD's iterates settle on the points it leaves robust? (Why no exact exit applies there.)

An exact exit for a robust point needs its remaining iterates known without computing them.
For APGD that is a fixed point: an iterate equal to the previous one and to the best point,
which the momentum step maps to itself (then the checkpoints' restarts from the best point
and their halved step sizes leave it where it is). This runs APGD-CE on the digits test points
the model classifies correctly (the points `fastadv eval --attack apgd-ce` attacks) as one
batch of slots, and reports, over the points it leaves robust: how many reached such a fixed
point and when, how many of the 64 coordinates still moved at the last update, and the step
size then. (An exit at such a fixed point is not built: too few points reach one.)

    python -m benchmarks.apgd_settling            # results/apgd_settling_cpu.md
"""
import argparse

import numpy as np
import torch

from fastadv import slots
from fastadv.attacks.apgd import APGDSlots

from . import results
from .bench_slots import load


class WatchedAPGD(APGDSlots):
    """APGDSlots that records, after every update, which slots sit on a fixed point and how
    many coordinates moved."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_fixed = np.full(self.size, -1)  # the age at which each slot first sat on a fixed point
        self.moved = []

    def _update(self, age, live, fresh):
        s = self.s
        before, old, best = s.x_adv.clone(), s.x_old.clone(), s.x_best.clone()
        super()._update(age, live, fresh)
        flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
        moved = (flat(s.x_adv) != flat(before)).sum(1)
        fixed = (moved == 0) & (flat(before) == flat(old)).all(1) & (flat(before) == flat(best)).all(1)
        newly = fixed.numpy() & (self.first_fixed < 0)
        self.first_fixed[newly] = age[newly]
        if (age < self.n_iter).any():  # an update ran (none after the last iteration)
            self.moved.append((moved.numpy(), s.step.clone().numpy()))


def measure(name, eps, n_iter, seed=0):
    model, x, y = load(name, "cpu", 449)
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right], y[right]
    program = WatchedAPGD(model, size=x.shape[0], norm="Linf", n_iter=n_iter, n_restarts=1, loss="ce")
    unit = slots.Unit(x.shape[0], {"x": x, "y": y, "eps": torch.full((x.shape[0],), eps)}, seed=seed)
    slots.run(program, [unit])
    robust = unit.results["robust"].numpy()
    first = program.first_fixed[robust]
    moved, step = program.moved[-1]
    reached = first >= 0
    return {"model": name, "eps": eps, "iterations": n_iter, "points": int(x.shape[0]), "robust": int(robust.sum()),
            "fixed": int(reached.sum()), "first_fixed_median": float(np.median(first[reached])) if reached.any() else None,
            "moving_median": float(np.median(moved[robust])), "moving_min": int(moved[robust].min()),
            "step_median": float(np.median(step[robust]))}


COLUMNS = [("model", "model"), ("eps", "eps"), ("iterations", "iterations"), ("points attacked", "points"),
           ("left robust", "robust"), ("robust points on a fixed point", "fixed"),
           ("iteration reached (median)", "first_fixed_median"),
           ("coordinates moving at the last update: median / least", "moving"),
           ("step size then (median)", "step_median")]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.apgd_settling", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="digits-cnn,digits-cnn-plain")
    p.add_argument("--eps", default="0.2,0.05")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--out", default=str(results.RESULTS_DIR / "apgd_settling_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        for eps in map(float, args.eps.split(",")):
            r = measure(name, eps, args.iterations)
            r["moving"] = f"{r['moving_median']:g} / {r['moving_min']}"
            rows.append(r)
            print(r)
    env = results.environment("cpu")
    lines = ["# APGD-CE on the points it leaves robust: do the iterates settle? (CPU)", "",
             "Command: `python -m benchmarks.apgd_settling`. " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
             "", "A fixed point: the iterate equals the previous one and the best point, and the update leaves it "
             "unchanged (an exact exit could stop the point there). Digits images have 64 coordinates.", "",
             results.table(rows, COLUMNS), ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
